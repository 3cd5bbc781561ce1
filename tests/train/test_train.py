"""End-to-end training on the CPU with the tiny model: learning, resume, 8-bit AdamW, NaN handling, export."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import patchdpo_fast.train as train_mod
import patchdpo_fast.training.step as step_mod
import patchdpo_fast.training.trainer as trainer_mod
from patchdpo_fast.config import load_config
from patchdpo_fast.train import train

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_cpu.yaml"


def tiny_cfg(tmp_path: Path, *overrides: str, name: str = "run"):
    base = [
        f"train.output_dir={tmp_path / name}",
        f"cache.dir={tmp_path / 'cache'}",
        "cache.on_stale=rebuild",
        "data.procedural.num_pairs=4",
        "train.max_steps=6",
        "train.log_every=2",
        "train.checkpoint_every=3",
        "train.keep_checkpoints=null",
    ]
    return load_config(TINY, [*base, *overrides])


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter.safetensors"))


# Settings under which each loss learns on the tiny random model within a short run (beta and lr per loss: a random
# tiny UNet gives per-sample errors ~1, so the paper's beta=5000 makes plain Diffusion-DPO jumpy at this scale).
LEARNS = {
    "patch_weighted_mse": ["optim.lr=5e-4"],
    "mse": ["optim.lr=5e-4"],
    "patch_dpo": ["optim.lr=3e-4", "loss.beta=1000"],
    "diffusion_dpo": ["optim.lr=1e-3", "loss.beta=200"],
}


@pytest.mark.slow
@pytest.mark.parametrize("loss", list(LEARNS))
def test_each_loss_learns_on_a_fixed_batch(tmp_path, loss):
    # no conditioning dropout: the fixed batch is judged with full conditioning, and what is checked is that the
    # optimizer moves the loss the right way, not how the unconditional branch happens to move a random network
    cfg = tiny_cfg(tmp_path, f"loss.type={loss}", "data.procedural.num_pairs=2", "train.max_steps=60",
                   "train.checkpoint_every=60", "data.drop_image=0", "data.drop_text=0", "data.drop_both=0",
                   *LEARNS[loss])  # fmt: skip
    result = train(cfg)
    assert result.final_step == 60 and result.nan_skips == 0
    if loss in ("patch_dpo", "diffusion_dpo"):
        assert result.fixed_batch_loss_start == pytest.approx(math.log(2.0), abs=1e-6)  # policy == reference
    assert result.fixed_batch_loss_end < result.fixed_batch_loss_start
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["fixed_batch_loss_end"] == pytest.approx(result.fixed_batch_loss_end)
    lines = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(2, 61, 2))
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 for r in lines)
    if loss.endswith("dpo"):
        assert all(0.0 <= r["implicit_acc"] <= 1.0 for r in lines)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_resume_is_bit_exact(tmp_path, optimizer):
    """2N steps straight == N steps, 'crash', resume, N more steps (weights, optimizer and metrics)."""
    opts = [
        f"optim.optimizer={optimizer}",
        "loss.type=patch_dpo",
        "train.max_steps=6",
        "train.checkpoint_every=3",
        "train.log_every=3",
    ]
    straight = train(tiny_cfg(tmp_path, *opts, name="straight"))
    ref_final = adapter(straight.last_checkpoint)

    # the same run, interrupted after its step-3 checkpoint: drop everything written after it
    shutil.copytree(straight.output_dir, tmp_path / "resumed")
    ckpts = tmp_path / "resumed" / "checkpoints"
    shutil.rmtree(ckpts / "step_00000006")
    (ckpts / "latest").write_text("step_00000006\n")  # a stale pointer must not matter
    (tmp_path / "resumed" / "ip_adapter.safetensors").unlink()
    resumed = train(tiny_cfg(tmp_path, *opts, name="resumed"), resume="latest")
    assert resumed.final_step == 6

    got = adapter(resumed.last_checkpoint)
    assert got.keys() == ref_final.keys()
    for key in ref_final:
        assert torch.equal(got[key], ref_final[key]), key
    a = load_file(str(straight.output_dir / "ip_adapter.safetensors"))
    b = load_file(str(resumed.output_dir / "ip_adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    opt_a = load_file(str(straight.last_checkpoint / "trainer.safetensors"))
    opt_b = load_file(str(resumed.last_checkpoint / "trainer.safetensors"))
    for key in opt_a:
        if ".rng." not in key:
            assert torch.equal(opt_a[key], opt_b[key]), key
    ma = (straight.output_dir / "metrics.jsonl").read_text().splitlines()
    mb = (resumed.output_dir / "metrics.jsonl").read_text().splitlines()
    drop = ("time", "steps_per_s", "pairs_per_s")
    strip = [{k: v for k, v in json.loads(x).items() if k not in drop} for x in ma]
    assert strip == [{k: v for k, v in json.loads(x).items() if k not in drop} for x in mb]
    if optimizer == "adamw8bit":  # the 8-bit path really keeps 8-bit (uint8) optimizer states
        assert any(t.dtype == torch.uint8 for t in opt_a.values())


def test_gradient_accumulation_matches_larger_batch(tmp_path):
    big = train(tiny_cfg(tmp_path, "data.pairs_per_batch=4", "train.max_steps=3", name="big"))
    acc = train(tiny_cfg(tmp_path, "data.pairs_per_batch=2", "train.gradient_accumulation_steps=2",
                         "train.max_steps=3", name="acc"))  # fmt: skip
    a, b = adapter(big.last_checkpoint), adapter(acc.last_checkpoint)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_uncached_training_runs_the_encoders_each_step(tmp_path):
    result = train(tiny_cfg(tmp_path, "cache.enabled=false", "train.max_steps=2", "train.checkpoint_every=2"))
    assert result.final_step == 2
    assert not (tmp_path / "cache").exists()


def test_nan_loss_is_skipped_counted_and_logged(tmp_path, monkeypatch, caplog):
    real = step_mod.compute_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in (3, 5):  # two training micro-batches (call 1 is the start-of-run evaluation)
            return type(out)(**{**out.__dict__, "loss": out.loss * float("nan")})
        return out

    monkeypatch.setattr(step_mod, "compute_loss", flaky)
    result = train(tiny_cfg(tmp_path, "train.max_steps=6"))
    assert result.nan_skips == 2
    assert "non-finite loss, step skipped" in caplog.text
    records = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["nan_skips"] == 2
    for t in adapter(result.last_checkpoint).values():
        assert torch.isfinite(t).all()


def test_nan_policy_error_and_skip_limit(tmp_path, monkeypatch):
    real = step_mod.compute_loss

    def always_nan(*args, **kwargs):
        out = real(*args, **kwargs)
        return type(out)(**{**out.__dict__, "loss": out.loss * float("nan")})

    monkeypatch.setattr(step_mod, "compute_loss", always_nan)
    with pytest.raises(FloatingPointError, match="nan_policy=error"):
        train(tiny_cfg(tmp_path, "train.nan_policy=error", name="err"))
    with pytest.raises(FloatingPointError, match="max_nan_skips=1"):
        train(tiny_cfg(tmp_path, "train.max_nan_skips=1", name="limit"))


def test_interrupted_checkpoint_save_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, "train.max_steps=6", "train.checkpoint_every=3")
    real_dump = trainer_mod.dump_config

    def crash_on_second_checkpoint(cfg_, path=None):
        if path is not None and str(path).endswith("step_00000006.tmp/config.yaml"):
            raise KeyboardInterrupt("simulated kill during checkpoint write")
        return real_dump(cfg_, path)

    monkeypatch.setattr(trainer_mod, "dump_config", crash_on_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    root = tmp_path / "run" / "checkpoints"
    from patchdpo_fast.training.checkpoint import find_checkpoint

    assert find_checkpoint(tmp_path / "run", "latest") == root / "step_00000003"
    assert (root / "latest").read_text().strip() == "step_00000003"
    monkeypatch.setattr(trainer_mod, "dump_config", real_dump)
    resumed = train(cfg, resume="latest")  # the half-written step-6 directory is ignored and replaced
    assert resumed.final_step == 6 and not (root / "step_00000006.tmp").exists()


def test_resume_from_a_missing_checkpoint_is_a_clear_error(tmp_path):
    from patchdpo_fast.training.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        train(tiny_cfg(tmp_path), resume=str(tmp_path / "nope"))
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        train(tiny_cfg(tmp_path), resume=str(tmp_path / "half"))


def test_exported_adapter_loads_into_stock_diffusers(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from patchdpo_fast.models.tiny import build_tiny_components

    result = train(tiny_cfg(tmp_path, "train.max_steps=2", "train.checkpoint_every=2"))
    pipe = StableDiffusionXLPipeline(**build_tiny_components(0))
    pipe.load_ip_adapter(str(result.adapter_path.parent), subfolder="", weight_name=result.adapter_path.name,
                         local_files_only=True)  # fmt: skip
    exported = load_file(str(result.adapter_path))
    assert all(v.dtype == torch.float16 for v in exported.values())  # train.export_dtype defaults to fp16
    stock = [p for p in pipe.unet.attn_processors.values() if hasattr(p, "to_k_ip")]
    assert len(stock) == sum(1 for k in exported if k.endswith("to_k_ip.weight")) > 0
    assert torch.equal(stock[0].to_k_ip[0].weight, exported["ip_adapter.1.to_k_ip.weight"].float())
    final = adapter(result.last_checkpoint)  # the fp32 master weights, rounded once on export
    assert torch.equal(exported["ip_adapter.1.to_k_ip.weight"], final["ip_adapter.1.to_k_ip.weight"].half())


def test_export_dtype_option_in_config_and_cli(tmp_path):
    result = train(tiny_cfg(tmp_path, "train.max_steps=1", "train.checkpoint_every=1", "train.export_dtype=fp32"))
    exported = load_file(str(result.adapter_path))
    final = adapter(result.last_checkpoint)
    assert all(v.dtype == torch.float32 for v in exported.values())
    assert all(torch.equal(exported[k], final[k]) for k in exported if k in final)
    out = tmp_path / "cli"
    args = ["--config", str(TINY), "--export-dtype", "bf16", "--set", f"train.output_dir={out}",
            "--set", f"cache.dir={tmp_path / 'cache'}", "--set", "data.procedural.num_pairs=2",
            "--set", "train.max_steps=1", "--set", "cache.on_stale=rebuild"]  # fmt: skip
    assert train_mod.main(args) == 0
    assert all(v.dtype == torch.bfloat16 for v in load_file(str(out / "ip_adapter.safetensors")).values())


def test_cli_config_error_names_the_key(tmp_path, capsys):
    from patchdpo_fast.cli import run_command

    def main(argv):
        return run_command("train", train_mod.main, argv)

    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("max_steps: 40", "max_step: 40"))
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "train.max_step" in err
    assert main(["--config", str(TINY), "--set", "optim.lr=fast"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
