"""ZeRO-3 with the UNet modes (model.trainable=unet_lora / unet) on CPU ranks over gloo."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from ds_launch import REPO, launch, run_trainer, zero3_config
from safetensors.torch import load_file

pytest.importorskip("deepspeed")
pytest.importorskip("peft")
pytestmark = pytest.mark.slow

TINY = REPO / "configs" / "tiny_cpu.yaml"
LOG2_FP32 = float(torch.tensor(math.log(2.0), dtype=torch.float32))  # -logsigmoid(0) in fp32


def _train(tmp_path: Path, name: str, ranks: int, pairs_per_rank: int, mode: str, *extra: str) -> Path:
    out = tmp_path / name
    ds_json = tmp_path / "zero3.json"
    if not ds_json.exists():
        zero3_config(ds_json, stage3_param_persistence_threshold=0)
    overrides = [
        f"deepspeed.config={ds_json}",
        f"train.output_dir={out}",
        f"cache.dir={tmp_path / 'cache'}",
        "cache.on_stale=rebuild",
        f"model.trainable={mode}",
        "model.lora.rank=4",
        "data.procedural.num_pairs=4",
        f"data.pairs_per_batch={pairs_per_rank}",
        "loss.type=patch_dpo",
        "loss.beta=5000",
        "optim.lr=1e-4",
        "optim.warmup_steps=0",
        "train.max_steps=3",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=null",
        "train.log_every=1",
        "train.export_dtype=fp32",
        "train.unet_export_dtype=fp32",
        *extra,
    ]
    run_trainer(TINY, overrides, ranks, tmp_path)
    return out


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _exports(out: Path, mode: str) -> dict[str, torch.Tensor]:
    tensors = {f"adapter:{k}": v for k, v in load_file(str(out / "ip_adapter.safetensors")).items()}
    if mode == "unet_lora":
        file = out / "unet_lora" / "pytorch_lora_weights.safetensors"
    else:
        file = out / "unet" / "diffusion_pytorch_model.safetensors"
    tensors.update(load_file(str(file)))
    return tensors


def _unet_side(ckpt: Path, mode: str) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / ("unet_lora.safetensors" if mode == "unet_lora" else "unet.safetensors")))


@pytest.mark.parametrize("mode", ["unet_lora", "unet"])
def test_zero3_two_ranks_match_one_rank_and_resume_exactly(tmp_path, mode):
    """2 ranks x 1 pair against 1 rank x 2 pairs, both ZeRO-3 with every parameter partitioned, then a resume.

    The runs see the same pairs, noise and timesteps; they differ in the order of fp32 reductions only (a gradient
    averaged over ranks by an all-reduce vs. summed over the batch in one backward; ~1e-7 relative). Step 1 is
    therefore equal to that precision. Later steps inherit it through AdamW, whose update ``g / (|g| + eps)``
    turns that noise into a visible fraction of ``lr`` wherever a clipped gradient entry is near ``eps``, and
    through ``beta / 2 = 2500`` in the sigmoid: losses and gradient norms agree to 1e-3 and the weights to 1% of
    one step's update. A missing or misrouted rank contribution changes the update itself, a doubled one the
    gradient norm (2x, where step 1 must agree to 1e-5).
    """
    two = _train(tmp_path, "two", 2, 1, mode)  # 2 ranks x 1 pair
    one = _train(tmp_path, "one", 1, 2, mode)  # 1 rank x 2 pairs: the same global batch, pairs and noise
    m2, m1 = _metrics(two), _metrics(one)
    assert [r["step"] for r in m2] == [r["step"] for r in m1] == [1, 2, 3]
    for r in (m2[0], m1[0]):  # policy == reference at step 0, exactly: the LoRA toggle / the frozen copy
        assert r["loss"] == LOG2_FP32 and r["log_ratio"] == 0.0
    assert m2[0]["grad_norm"] == pytest.approx(m1[0]["grad_norm"], rel=1e-5)  # reduction order only
    for r2, r1 in zip(m2[1:], m1[1:], strict=True):
        for key in ("loss", "log_ratio", "model_mse", "grad_norm"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-3, abs=1e-9), (r2["step"], key, r2[key], r1[key])
    for out in (two, one):
        summary = json.loads((out / "summary.json").read_text())
        assert summary["fixed_batch_loss_start"] == LOG2_FP32 and summary["trainable"] == mode

    a, b = _exports(two, mode), _exports(one, mode)
    assert a.keys() == b.keys()
    # the UNet side's last update (step 2 -> 3) measures "one step" in the checkpoints' keys
    last = _unet_side(two / "checkpoints" / "step_00000003", mode)
    prev = _unet_side(two / "checkpoints" / "step_00000002", mode)
    step_norm = torch.linalg.vector_norm(torch.cat([(last[k] - prev[k]).flatten() for k in last]))
    keys = [k for k in a if not k.startswith("adapter:")]
    diff_norm = torch.linalg.vector_norm(torch.cat([(a[k] - b[k]).flatten() for k in keys]))
    for k in a:  # an entry whose clipped gradient is near eps may move by up to ~lr (1e-4) differently
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    # overall the runs agree to 1% of one step's update (measured: 1.7e-4 unet_lora, 2.7e-4 unet)
    assert step_norm > 0 and diff_norm <= 1e-2 * step_norm, (float(diff_norm), float(step_norm))

    # resume the 2-rank run from its step-2 checkpoint: the ZeRO-3 partitions of the UNet side restore exactly
    shutil.copytree(two, tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000003")
    resumed = _train(tmp_path, "resumed", 2, 1, mode, "train.resume_from=latest")
    ckpt = "checkpoints/step_00000003"
    unet_file = "unet_lora.safetensors" if mode == "unet_lora" else "unet.safetensors"
    for name in ("adapter.safetensors", unet_file, "engine_rank0.safetensors", "engine_rank1.safetensors"):
        x, y = load_file(str(two / ckpt / name)), load_file(str(resumed / ckpt / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    c = _exports(resumed, mode)
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert _metrics(resumed)[-1]["loss"] == m2[-1]["loss"]


def test_zero3_partitions_the_reference_and_the_lora_toggle_gives_the_reference(tmp_path):
    """In-process ZeRO-3 facts on 2 ranks (tests/train/zero3_worker.py), every parameter released after use.

    unet_lora: the LoRA toggle gives the reference (step-0 log-ratio exactly 0, loss exactly log 2) and, after
    training, the LoRA-off forward still reproduces the initial UNet bit for bit while the policy moved. unet: the
    frozen reference is a DeepSpeed engine of its own whose parameters are ZeRO-3 partitioned (each rank holds a
    1/world_size share, nothing left materialized), it reproduces the initial model after training and its gathered
    weights are unchanged; with bf16 training it keeps model.reference_dtype=fp32.
    """
    ds_json = zero3_config(tmp_path / "zero3.json", stage3_param_persistence_threshold=0)
    launch(Path(__file__).with_name("zero3_worker.py"), [str(ds_json), str(tmp_path)], 2, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for res in ranks:
        for mode in ("unet_lora", "unet"):
            r = res[mode]
            assert r["log_ratio0"] == [0.0] and r["loss0"] == LOG2_FP32, mode
            assert r["step0_policy_eq_reference"] and r["reference_after_eq_initial"], mode
            assert r["policy_moved"] > 1e-3, mode  # the policy trained, so the equality above is the reference's
            policy = r["policy"]
            assert policy["zero3"] == policy["params"] and policy["share_ok"], mode
            assert policy["local"] == pytest.approx(policy["total"] / 2, rel=1e-3), mode
        lora = res["unet_lora"]["lora"]
        assert lora["params"] > 0 and lora["zero3"] == lora["params"] and lora["share_ok"]
        assert res["unet_lora"]["reference_kind"] is None  # no second model: the same UNet with the LoRA off
        full = res["unet"]
        ref = full["reference"]
        assert full["reference_kind"] == "DeepSpeedEngine"
        assert ref["zero3"] == ref["params"] and ref["share_ok"] and ref["materialized"] == 0
        assert ref["local"] == pytest.approx(ref["total"] / 2, rel=1e-3)
        assert full["reference_gathered_numel"] == ref["total"] == full["policy"]["total"]
        assert full["reference_unchanged"]
        assert full["policy_dtype"] == full["reference_dtype"] == "torch.float32"
        bf16 = res["unet_bf16"]  # model.reference_dtype=fp32 is kept although DeepSpeed trains in bf16
        assert bf16["policy_dtype"] == "torch.bfloat16" and bf16["reference_dtype"] == "torch.float32"
        assert bf16["reference_after_eq_before"] and bf16["reference_unchanged"] and bf16["policy_moved"] > 1e-3
        assert bf16["reference"]["zero3"] == bf16["reference"]["params"] and bf16["reference"]["materialized"] == 0
