"""Training on an SD1.5-class UNet (no added conditioning, one text encoder) and with a v-prediction scheduler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixed_batch import FixedBatch, fixed_batch_cfg

import patchdpo_fast.training.step as step_mod
from patchdpo_fast.config import load_config
from patchdpo_fast.train import train

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_cpu.yaml"
SD15 = ["model.tiny_architecture=sd15"]


@pytest.mark.parametrize(
    ("mode", "loss", "learn"),
    [
        ("ip_adapter", "patch_weighted_mse", ["optim.lr=1e-3"]),
        ("ip_adapter", "patch_dpo", ["optim.lr=1e-3", "loss.beta=1000"]),
        ("unet_lora", "patch_dpo", ["optim.lr=1e-3", "loss.beta=1000"]),
        ("unet_lora", "diffusion_dpo", ["optim.lr=1e-3", "loss.beta=200"]),
    ],
)
def test_sd15_loss_falls_on_a_fixed_batch(mode, loss, learn):
    run = FixedBatch(fixed_batch_cfg(*SD15, f"model.trainable={mode}", f"loss.type={loss}", *learn))
    assert not run.models.added_conditioning and run.x["pooled"] is None
    start = float(run.loss().loss)
    if loss.endswith("dpo"):
        assert start == pytest.approx(0.6931471805599453, abs=1e-6)  # policy == reference at step 0
    run.step(3)
    end = float(run.loss().loss)
    assert end < start, (start, end)


def test_sd15_run_with_the_input_cache_trains_and_exports_for_stock_diffusers(tmp_path):
    """A whole run (cached inputs hold no pooled text) exports an adapter and a LoRA that stock SD1.5 loads."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from patchdpo_fast.models.tiny import build_tiny_components

    cfg = load_config(TINY, [*SD15, "model.trainable=ip_adapter+unet_lora", "model.lora.rank=4",
                             "data.procedural.num_pairs=4", "train.max_steps=2", "train.checkpoint_every=2",
                             f"train.output_dir={tmp_path / 'run'}", f"cache.dir={tmp_path / 'cache'}",
                             "loss.type=patch_dpo", "loss.beta=1000"], check_paths=False)  # fmt: skip
    result = train(cfg)
    assert result.final_step == 2
    with safe_open(str(tmp_path / "cache" / "shard_00000.safetensors"), framework="pt") as f:
        assert "pooled" not in set(f.keys()) and "prompt_embeds" in set(f.keys())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["trainable"] == "ip_adapter+unet_lora"
    pipe = StableDiffusionPipeline(**build_tiny_components(0, "sd15"), safety_checker=None,
                                   requires_safety_checker=False)  # fmt: skip
    pipe.load_ip_adapter(str(tmp_path / "run"), subfolder="", weight_name="ip_adapter.safetensors",
                         local_files_only=True)  # fmt: skip
    pipe.load_lora_weights(str(tmp_path / "run" / "unet_lora"))
    assert len([p for p in pipe.unet.attn_processors.values() if hasattr(p, "to_k_ip")]) == 6
    # resuming the SD1.5 run from its checkpoint continues (the cache is reused)
    more = load_config(TINY, [*SD15, "model.trainable=ip_adapter+unet_lora", "model.lora.rank=4",
                              "data.procedural.num_pairs=4", "train.max_steps=3", "train.checkpoint_every=2",
                              f"train.output_dir={tmp_path / 'run'}", f"cache.dir={tmp_path / 'cache'}",
                              "loss.type=patch_dpo", "loss.beta=1000"], check_paths=False)  # fmt: skip
    assert train(more, resume="latest").final_step == 3


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_v_prediction_trains_against_the_velocity(arch, monkeypatch):
    """model.prediction_type=v_prediction: the target is the scheduler's velocity, not the noise; the loss falls."""
    seen = []
    real = step_mod.compute_loss

    def spy(loss_type, pred, target, *args, **kwargs):
        seen.append(target)
        return real(loss_type, pred, target, *args, **kwargs)

    monkeypatch.setattr(step_mod, "compute_loss", spy)
    runs = {}
    for kind in ("epsilon", "v_prediction"):
        cfg = fixed_batch_cfg(f"model.tiny_architecture={arch}", f"model.prediction_type={kind}", "loss.type=mse",
                              "optim.lr=1e-3")  # fmt: skip
        run = FixedBatch(cfg)
        assert run.models.noise_scheduler.config.prediction_type == kind
        seen.clear()
        start = float(run.loss().loss)
        latents = torch.cat([run.x["lat_ref"], run.x["lat_gen"]])
        noise, t = run.rnd.noise.repeat(2, 1, 1, 1), run.rnd.timesteps.repeat(2)
        expected = run.models.noise_scheduler.get_velocity(latents, noise, t) if kind == "v_prediction" else noise
        assert torch.equal(seen[0], expected)
        run.step(3)
        assert float(run.loss().loss) < start
        runs[kind] = seen[0]
    assert not torch.allclose(runs["epsilon"], runs["v_prediction"])
