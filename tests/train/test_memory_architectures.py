"""The memory plan follows the configured architecture: tiny SD1.5, no IP-Adapter, a pretrained folder's configs, and
the built-in SD1.5 / SDXL chosen by ``model.base_architecture`` / ``--architecture`` (never guessed from a name)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from patchdpo_fast.cli import main as cli_main
from patchdpo_fast.config import ConfigError, load_config
from patchdpo_fast.models.sd15_config import SD15_TEXT_ENCODER_PARAMETERS, SD15_UNET_PARAMETERS
from patchdpo_fast.models.sdxl_config import SDXL_UNET_PARAMETERS
from patchdpo_fast.models.tiny import build_tiny_components
from patchdpo_fast.training.build import build_engine, build_models
from patchdpo_fast.training.distributed import setup_distributed
from patchdpo_fast.training.memory import (
    AllocationTracker,
    estimate_memory,
    held_bytes,
    log_startup_plan,
    resolve_architecture,
    tensor_bytes,
)
from patchdpo_fast.training.trainable import setup_trainable

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_cpu.yaml"
SD15_CONFIG = REPO / "configs" / "sd15_ipadapter_plus.yaml"
SD15 = "model.tiny_architecture=sd15"
NO_IP = ["model.use_ip_adapter=false", "model.trainable=unet_lora"]


def _cfg(*overrides: str):
    return load_config(TINY, ["data.resolution=64", "data.pairs_per_batch=1", "model.lora.rank=4", *overrides],
                       check_paths=False)  # fmt: skip


def _inputs(models, n: int, resolution: int) -> tuple:
    """Random step inputs built here from the models' own configs (independently of the memory module)."""
    g = torch.Generator().manual_seed(0)
    unet_cfg = models.unet.config
    pooled = time_ids = features = None
    if unet_cfg.addition_embed_type == "text_time":
        width = unet_cfg.projection_class_embeddings_input_dim - 6 * unet_cfg.addition_time_embed_dim
        pooled, time_ids = torch.randn(n, width, generator=g), models.add_time_ids(n, resolution)
    if models.image_encoder is not None:
        enc = models.image_encoder.config
        tokens = (enc.image_size // enc.patch_size) ** 2 + 1
        features = torch.randn(n, tokens, enc.hidden_size, generator=g)
    return (torch.randn(n, 4, resolution // 8, resolution // 8, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randn(n, 77, unet_cfg.cross_attention_dim, generator=g), pooled, time_ids, features)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# The start-up plan of the trainer
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "model"),
    [
        ([SD15, "loss.type=patch_dpo"], "tiny sd15 + IP-Adapter-Plus"),
        ([*NO_IP, "loss.type=diffusion_dpo"], "tiny sdxl, no IP-Adapter"),
        ([SD15, *NO_IP, "loss.type=diffusion_dpo"], "tiny sd15, no IP-Adapter"),
    ],
)
def test_startup_plan_is_logged_for_every_architecture(overrides, model, caplog):
    cfg = _cfg(*overrides)
    env = setup_distributed(False)
    models = build_models(cfg, env)
    trainable = setup_trainable(cfg, models)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="patchdpo_fast.train"):
        log_startup_plan(cfg, models, 1, trainable.reference)
    text = caplog.text
    ours = [r for r in caplog.records if r.name.startswith("patchdpo_fast")]
    assert "not available" not in text and not [r for r in ours if r.levelno >= logging.WARNING], text
    assert f"memory plan per GPU ({cfg.model.trainable}" in text and f"; {model})" in text
    assert "activations (1 pairs)" in text and "total" in text and "activations not measured" not in text
    encoders = next(line for line in text.splitlines() if line.strip().startswith("encoders"))
    assert ("image encoder" in encoders) == ("+ IP" in model) and ("2 text encoders" in encoders) == ("sdxl" in model)


# ---------------------------------------------------------------------------------------------------------------
# The estimate against a real tiny optimizer step
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "optimizer"),
    [
        ([SD15, "model.trainable=ip_adapter", "loss.type=patch_dpo"], "adamw"),
        (
            [SD15, "model.trainable=ip_adapter", "model.train_resampler=true", "loss.type=patch_weighted_mse"],
            "adamw8bit",
        ),
        ([SD15, "model.trainable=unet", "loss.type=diffusion_dpo"], "adamw"),
        ([SD15, *NO_IP, "loss.type=diffusion_dpo"], "adamw8bit"),
        ([*NO_IP, "loss.type=diffusion_dpo"], "adamw"),
    ],
)
def test_estimate_matches_a_real_tiny_step(overrides, optimizer):
    cfg = _cfg(*overrides, f"optim.optimizer={optimizer}")
    plan = estimate_memory(cfg)  # on meta: no weights, nothing allocated
    env = setup_distributed(False)
    models = build_models(cfg, env)
    trainable = setup_trainable(cfg, models)
    engine = build_engine(cfg, models, env, trainable)
    ip_unet = models.ip_unet
    assert plan.settings["architecture"] == ("sd15" if SD15 in overrides else "sdxl")
    assert plan.settings["ip_adapter"] == ip_unet.has_ip_adapter == ("model.use_ip_adapter=false" not in overrides)

    args = _inputs(models, 2, 64)
    with AllocationTracker() as tracker:
        pred = engine.forward(*args)
    assert tracker.live_bytes() == plan["activations (1 pairs)"].bytes  # the meta count of the same forward
    engine.backward(pred.float().square().mean())
    grads = tensor_bytes(p.grad for p in ip_unet.parameters() if p.requires_grad)
    del pred
    engine.step()
    real = {"gradients": grads, **held_bytes(ip_unet, engine.optimizer, trainable.reference)}
    est = {"weights": plan.weights_bytes, "gradients": plan.gradients_bytes, "optimizer": plan.optimizer_bytes,
           "reference": plan.reference_bytes}  # fmt: skip
    assert real["optimizer"] > 0 and real["gradients"] > 0
    both = est["weights"] + est["optimizer"], real["weights"] + real["optimizer"]
    assert abs(both[0] - both[1]) <= 0.10 * both[1], both  # the criterion: weights + optimizer states
    assert est == real  # in fact byte for byte, every category
    encoders = [models.vae, models.text_encoder, models.text_encoder_2, models.image_encoder]
    assert plan["encoders"].bytes == tensor_bytes(t for m in encoders if m is not None
                                                  for t in (*m.parameters(), *m.buffers()))  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Real-size architectures: built-in, and read from a folder's config.json files
# ---------------------------------------------------------------------------------------------------------------


def test_sd15_config_plans_sd15_at_its_real_size():
    cfg = load_config(SD15_CONFIG, check_paths=False)
    plan = estimate_memory(cfg, world_size=8, activations=False)
    s = plan.settings
    assert (s["architecture"], s["architecture_source"], s["ip_adapter"]) == ("sd15", "builtin", True)
    params = s["parameters"]
    assert params["unet"] == SD15_UNET_PARAMETERS == 859_520_964  # diffusers' SD1.5 UNet
    assert params["text_encoder"] == SD15_TEXT_ENCODER_PARAMETERS and "text_encoder_2" not in params
    assert abs(params["image_encoder"] - 632.08e6) < 0.01e6  # OpenCLIP ViT-H/14 vision tower
    # ip-adapter-plus_sd15: Resampler 768 wide (1280 -> 768 in, 4 x (attention + FF), 768 -> 768 out, 16 queries) +
    # 16 IP K/V pairs reading 768-wide tokens into the blocks' widths (down 2x320 2x640 2x1280, mid 1280, up 3 each)
    d, e = 768, 1280
    layer = 2 * 2 * d + d * d + 2 * d * d + d * d + 2 * d + d * 4 * d + 4 * d * d  # norms, q, kv, out, FF
    resampler = 16 * d + e * d + d + 4 * layer + d * d + d + 2 * d
    kv = 2 * d * (2 * 320 + 2 * 640 + 2 * 1280 + 1280 + 3 * 1280 + 3 * 640 + 3 * 320)
    assert params["ip_adapter"] == resampler + kv
    assert plan["trainable weights"].bytes == 2 * kv  # bf16 under DeepSpeed, IP K/V only
    assert not any("assumed" in n for n in plan.notes)


def test_cli_reports_the_sd15_parameter_count(capsys):
    assert cli_main(["estimate-memory", "--config", str(SD15_CONFIG), "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    head = "model: SD1.5-class + IP-Adapter-Plus (built-in SD1.5 architecture, built-in ViT-H/14 image encoder): "
    assert head + "UNet 859.52 M" in out
    assert "text encoder 123.06 M" in out and "text encoder 2" not in out and "8 GPUs, ZeRO-2" in out


def test_nothing_said_assumes_sdxl_and_says_so(capsys):
    cfg = load_config(SD15_CONFIG, ["model.base_architecture=auto"], check_paths=False)
    plan = estimate_memory(cfg, activations=False)
    assert plan.settings["architecture_source"] == "assumed"
    assert plan.settings["parameters"]["unet"] == SDXL_UNET_PARAMETERS
    assert plan.notes[0].startswith("architecture assumed: SDXL base 1.0")
    assert "model.base_architecture" in plan.notes[0] and "--architecture" in plan.notes[0]
    # --architecture overrides the config's setting
    assert estimate_memory(cfg, activations=False, architecture="sd15").settings["parameters"]["unet"] == 859_520_964


def test_no_ip_adapter_plans_no_image_encoder_or_adapter():
    no_ip = ["model.use_ip_adapter=false", "model.trainable=unet_lora", "model.ip_adapter_path=null"]
    cfg = load_config(SD15_CONFIG, [*no_ip, "loss.type=diffusion_dpo"], check_paths=False)
    plan = estimate_memory(cfg, activations=False)
    params = plan.settings["parameters"]
    assert "image_encoder" not in params and "ip_adapter" not in params and params["unet_lora"] > 0
    assert plan["encoders"].detail.startswith("VAE + text encoder;")
    assert plan["trainable weights"].detail.startswith("UNet LoRA")
    with_ip = estimate_memory(load_config(SD15_CONFIG, check_paths=False), activations=False)
    assert plan["encoders"].bytes < with_ip["encoders"].bytes - 2 * 600e6  # no ViT-H/14 (bf16)


def _config_only_folder(root: Path, architecture: str) -> tuple[Path, Path, dict]:
    """A diffusers base-model folder and an image-encoder folder holding config.json files only (no weights)."""
    comps = build_tiny_components(0, architecture)
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if architecture == "sdxl" else [])
    for name in names:
        module = comps[name]
        if hasattr(module, "save_config"):  # diffusers
            module.save_config(root / "base" / name)
        else:  # transformers
            module.config.save_pretrained(root / "base" / name)
    comps["image_encoder"].config.save_pretrained(root / "image")
    assert not [p for p in root.rglob("*") if p.is_file() and p.suffix != ".json"]
    counts = {name: sum(p.numel() for p in comps[name].parameters()) for name in [*names, "image_encoder"]}
    return root / "base", root / "image", counts


@pytest.mark.parametrize("architecture", ["sd15", "sdxl"])
def test_a_pretrained_folder_decides_from_its_config_files(tmp_path, architecture):
    base, image, counts = _config_only_folder(tmp_path, architecture)
    cfg = _cfg("model.tiny=false", f"model.pretrained_path={base}", f"model.image_encoder_path={image}")
    arch = resolve_architecture(cfg)
    assert (arch.family, arch.source, arch.folder, arch.image_encoder_folder) == (architecture, "folder", base, image)
    plan = estimate_memory(cfg)
    params = plan.settings["parameters"]
    assert {k: params[k] for k in counts} == counts
    assert f"configs of {base}, image encoder configs of {image})" in plan.settings["model"]
    assert not any("assumed" in n for n in plan.notes)
    other = "sdxl" if architecture == "sd15" else "sd15"
    with pytest.raises(ValueError, match=rf"base architecture {other} asked for, but .*unet.config\.json is an"):
        estimate_memory(cfg, architecture=other, activations=False)
    wrong = _cfg("model.tiny=false", f"model.pretrained_path={base}", f"model.image_encoder_path={image}",
                 f"model.base_architecture={other}")  # fmt: skip
    with pytest.raises(ValueError, match="the folder's UNet decides"):  # the trainer refuses it before loading
        build_models(wrong, setup_distributed(False))


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def test_unknown_architecture_is_one_clear_line(capsys, tmp_path):
    cfg = load_config(SD15_CONFIG, check_paths=False)
    with pytest.raises(ValueError, match=re.escape("unknown base architecture 'sd3' (--architecture); choose one "
                                                   "of sdxl, sd15 or auto")):  # fmt: skip
        estimate_memory(cfg, architecture="sd3", activations=False)
    assert cli_main(["estimate-memory", "--config", str(SD15_CONFIG), "--architecture", "sd3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("patchdpo estimate-memory: unknown base architecture 'sd3'"), err
    with pytest.raises(ConfigError, match=r"model\.base_architecture"):
        load_config(SD15_CONFIG, ["model.base_architecture=sd3"], check_paths=False)
    with pytest.raises(ConfigError, match=r"model\.base_architecture: applies to a pretrained model only"):
        _cfg("model.base_architecture=sd15")
    with pytest.raises(ValueError, match=r"model\.tiny_architecture .* chooses the tiny model's"):
        estimate_memory(_cfg(), architecture="sd15", activations=False)
    (tmp_path / "empty").mkdir()
    cfg = load_config(SD15_CONFIG, [f"model.pretrained_path={tmp_path / 'empty'}"], check_paths=False)
    with pytest.raises(ValueError, match=r"has no unet/config\.json: not a diffusers base-model folder"):
        estimate_memory(cfg, activations=False)
    json.dumps(estimate_memory(_cfg(SD15), activations=False).to_dict())  # the settings stay JSON-able
