"""The DPO reference adapter exists only for the DPO losses, is recorded (not stored) in checkpoints, and resume stays
exact; with the input cache built the encoders are released, on the CPU too."""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from patchdpo_fast.config import load_config
from patchdpo_fast.errors import UserError
from patchdpo_fast.models import build_models
from patchdpo_fast.train import train
from patchdpo_fast.training.build import build_models as build_run_models
from patchdpo_fast.training.build import reference_record
from patchdpo_fast.training.distributed import setup_distributed
from patchdpo_fast.training.inputs import ModelInputs, build_data, collate

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_cpu.yaml"
LOSSES = ["patch_weighted_mse", "mse", "patch_dpo", "diffusion_dpo"]


def tiny_cfg(tmp_path: Path, *overrides: str, name: str = "run"):
    base = [
        f"train.output_dir={tmp_path / name}",
        f"cache.dir={tmp_path / 'cache'}",
        "cache.on_stale=rebuild",
        "data.procedural.num_pairs=4",
        "train.max_steps=4",
        "train.log_every=2",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=null",
    ]
    return load_config(TINY, [*base, *overrides])


def _metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("train_resampler", [False, True])
def test_reference_adapter_only_for_dpo_losses(tmp_path, loss, train_resampler):
    cfg = tiny_cfg(tmp_path, f"loss.type={loss}", f"model.train_resampler={str(train_resampler).lower()}")
    env = setup_distributed(False)
    models = build_run_models(cfg, env)
    n_ref = sum(p.numel() for n, p in models.ip_unet.named_parameters() if ".ref_" in n or n.startswith("ref_"))
    n_trainable = sum(p.numel() for p in models.trainable_parameters())
    if cfg.loss.uses_reference_model:
        assert n_ref == n_trainable > 0  # exactly one frozen copy of what trains
    else:
        assert n_ref == 0, f"{loss} never reads the reference, yet {n_ref} reference parameters were allocated"
        assert reference_record(cfg, models) is None


@pytest.mark.parametrize("loss", ["patch_weighted_mse", "patch_dpo"])
def test_checkpoints_record_the_reference_and_resume_exactly(tmp_path, loss):
    """2N steps straight == N steps, 'crash', resume, N more: with the reference adapter rebuilt, not stored."""
    straight = train(tiny_cfg(tmp_path, f"loss.type={loss}", name="straight"))
    final = straight.last_checkpoint / "adapter.safetensors"
    keys = set(load_file(str(final)))
    assert keys and not any("ref_" in k for k in keys)  # the policy only
    meta = _metadata(final)
    if loss == "patch_dpo":
        record = json.loads(meta["reference"])
        fresh = build_models(tiny=True, seed=0)  # the initial adapter of the run
        assert record["sha256"] == fresh.ip_unet.reference_fingerprint()
        assert record["origin"]["tiny_seed"] == 0 and record["kind"] == "initial adapter"
    else:
        assert "reference" not in meta

    shutil.copytree(straight.output_dir, tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000004")
    (tmp_path / "resumed" / "ip_adapter.safetensors").unlink()
    resumed = train(tiny_cfg(tmp_path, f"loss.type={loss}", name="resumed"), resume="latest")
    assert resumed.final_step == 4
    a, b = load_file(str(final)), load_file(str(resumed.last_checkpoint / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt_a = load_file(str(straight.last_checkpoint / "trainer.safetensors"))
    opt_b = load_file(str(resumed.last_checkpoint / "trainer.safetensors"))
    assert all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a if ".rng." not in k)
    la = [json.loads(x) for x in (straight.output_dir / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (resumed.output_dir / "metrics.jsonl").read_text().splitlines()]
    drop = ("time", "steps_per_s", "pairs_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in la] == [
        {k: v for k, v in r.items() if k not in drop} for r in lb
    ]


def test_resume_refuses_another_reference(tmp_path):
    """A DPO run started from an adapter file cannot resume once that file changed: the reference would differ."""
    start = build_models(tiny=True, seed=0)
    with torch.no_grad():
        for p in start.trainable_parameters():
            p.add_(0.01)
    path = start.export_ip_adapter(tmp_path / "start.safetensors", dtype=torch.float32)
    original = path.read_bytes()
    opts = ["loss.type=patch_dpo", f"model.ip_adapter_path={path}", "train.max_steps=2", "train.checkpoint_every=1"]
    train(tiny_cfg(tmp_path, *opts))

    with torch.no_grad():
        for p in start.trainable_parameters():
            p.add_(0.01)
    start.export_ip_adapter(path, dtype=torch.float32)  # the starting adapter file was overwritten
    with pytest.raises(UserError, match="reference adapter"):
        train(tiny_cfg(tmp_path, *opts, "train.max_steps=3"), resume="latest")
    path.write_bytes(original)  # restored: the same reference, the run resumes
    assert train(tiny_cfg(tmp_path, *opts, "train.max_steps=3"), resume="latest").final_step == 3


def test_full_unet_resume_refuses_another_reference_unet(tmp_path, monkeypatch):
    """Full UNet finetuning with a DPO loss records the frozen reference UNet's hash; a resumed run whose rebuilt
    reference differs (e.g. the pretrained folder changed) is refused, the same one resumes."""
    import patchdpo_fast.training.trainer as trainer_mod

    opts = ["model.trainable=unet", "loss.type=patch_dpo", "loss.beta=1000", "train.max_steps=2",
            "train.checkpoint_every=1"]  # fmt: skip
    first = train(tiny_cfg(tmp_path, *opts))
    record = json.loads(_metadata(first.last_checkpoint / "adapter.safetensors")["reference"])
    assert record["kind"] == "initial UNet" and record["origin"]["reference_dtype"] == "float32"

    real_setup = trainer_mod.setup_trainable
    seen = []

    def changed_reference(cfg, models):
        setup = real_setup(cfg, models)
        seen.append(setup.reference_fingerprint())
        with torch.no_grad():
            next(setup.reference.parameters()).add_(1e-3)  # another initial UNet than the run's
        return setup

    monkeypatch.setattr(trainer_mod, "setup_trainable", changed_reference)
    with pytest.raises(UserError, match="reference UNet"):
        train(tiny_cfg(tmp_path, *opts, "train.max_steps=3"), resume="latest")
    assert seen == [record["sha256"]]  # the same configuration rebuilds the recorded reference
    monkeypatch.setattr(trainer_mod, "setup_trainable", real_setup)
    assert train(tiny_cfg(tmp_path, *opts, "train.max_steps=3"), resume="latest").final_step == 3


def test_encoders_released_once_the_cache_serves_every_input_on_the_cpu(tmp_path):
    cfg = tiny_cfg(tmp_path)
    env = setup_distributed(False)
    assert env.device.type == "cpu"
    models = build_run_models(cfg, env)
    encoders = [models.vae, models.text_encoder, models.text_encoder_2, models.image_encoder]
    refs = [weakref.ref(m) for m in encoders]
    del encoders
    dataset, cached = build_data(cfg, models, env)
    gc.collect()
    assert cached is not None and len(dataset) == 4
    assert [r() for r in refs] == [None] * 4, "the VAE and the encoders are still alive after the cache was built"
    assert models.encoders_released
    with pytest.raises(RuntimeError, match="released"):
        models.encode_prompts(["a"])
    # training from the cache does not need them
    inputs = ModelInputs(cfg, models, env, cached)
    assert inputs(collate([dataset[0], dataset[1]]), 0)["lat_ref"].shape[0] == 2

    # without a cache the encoders run every step and stay
    raw_cfg = tiny_cfg(tmp_path, "cache.enabled=false")
    kept = build_run_models(raw_cfg, env)
    build_data(raw_cfg, kept, env)
    assert kept.vae is not None and not kept.encoders_released
