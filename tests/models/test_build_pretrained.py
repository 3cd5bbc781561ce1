"""Building from local pretrained folders (saved tiny components) and the errors for missing paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from patchdpo_fast.models import build_models
from patchdpo_fast.models.tiny import build_tiny_components


def tiny_resampler_config() -> dict[str, int]:
    return build_models(tiny=True).image_proj.config


def test_pretrained_resampler_defaults_are_sdxl_plus(pretrained_dirs) -> None:
    sdxl, clip = pretrained_dirs
    cfg = build_models(pretrained_model_path=sdxl, image_encoder_path=clip).image_proj.config
    assert (cfg["dim"], cfg["heads"], cfg["dim_head"], cfg["depth"], cfg["num_queries"]) == (1280, 20, 64, 4, 16)
    assert cfg["embedding_dim"] == 32 and cfg["output_dim"] == 64  # read from the encoder / UNet configs


@pytest.fixture(scope="module")
def pretrained_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """An SDXL-layout diffusers folder and a CLIP image-encoder folder, saved from the tiny components."""
    from diffusers import StableDiffusionXLPipeline

    root = tmp_path_factory.mktemp("pretrained")
    comps = build_tiny_components(seed=0)
    image_encoder, feature_extractor = comps.pop("image_encoder"), comps.pop("feature_extractor")
    StableDiffusionXLPipeline(**comps).save_pretrained(root / "sdxl")
    image_encoder.save_pretrained(root / "clip_vision")
    feature_extractor.save_pretrained(root / "clip_vision")
    return root / "sdxl", root / "clip_vision"


def test_build_from_folders_matches_tiny(pretrained_dirs, batch_factory) -> None:
    sdxl, clip = pretrained_dirs
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (sdxl / sub).is_dir()
    loaded = build_models(
        pretrained_model_path=sdxl, image_encoder_path=clip, seed=0, resampler_dim=32, resampler_heads=2
    )
    assert loaded.image_proj.config == tiny_resampler_config()
    tiny = build_models(tiny=True, seed=0)
    assert loaded.tokenizer.model_max_length == 77
    assert type(loaded.noise_scheduler).__name__ == "DDPMScheduler"
    assert loaded.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert loaded.vae.dtype == torch.float32 and loaded.vae_scale_factor == 8
    trainable = [n for n, p in loaded.unet.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("to_k_ip.weight", "to_v_ip.weight")) for n in trainable)

    batch = batch_factory(tiny)
    other = batch_factory(loaded)
    for a, b in zip(batch.args(), other.args(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_noise(*batch.args()), tiny.predict_noise(*batch.args()))


def test_image_norm_from_preprocessor_config(pretrained_dirs, tmp_path) -> None:
    sdxl, clip = pretrained_dirs
    custom = tmp_path / "clip_custom"
    shutil.copytree(clip, custom)
    cfg = json.loads((custom / "preprocessor_config.json").read_text())
    cfg["image_mean"], cfg["image_std"] = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    (custom / "preprocessor_config.json").write_text(json.dumps(cfg))
    models = build_models(pretrained_model_path=sdxl, image_encoder_path=custom)
    assert models.image_mean == (0.5, 0.5, 0.5) and models.image_std == (0.25, 0.25, 0.25)


def test_bf16_frozen_weights(pretrained_dirs, batch_factory) -> None:
    sdxl, clip = pretrained_dirs
    models = build_models(pretrained_model_path=sdxl, image_encoder_path=clip, weight_dtype=torch.bfloat16)
    assert models.unet.conv_in.weight.dtype == torch.bfloat16
    assert models.text_encoder.dtype == torch.bfloat16 and models.image_encoder.dtype == torch.bfloat16
    assert models.vae.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in models.trainable_parameters())
    batch = batch_factory(models, batch=1)
    eps = models.predict_noise(*batch.args())
    eps.float().square().mean().backward()
    assert eps.dtype == torch.bfloat16
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in models.trainable_parameters())


def test_missing_paths_name_the_path(pretrained_dirs, tmp_path) -> None:
    sdxl, clip = pretrained_dirs
    with pytest.raises(FileNotFoundError, match="no_such_sdxl"):
        build_models(pretrained_model_path=tmp_path / "no_such_sdxl", image_encoder_path=clip)
    with pytest.raises(FileNotFoundError, match="no_such_clip"):
        build_models(pretrained_model_path=sdxl, image_encoder_path=tmp_path / "no_such_clip")
    broken = tmp_path / "sdxl_broken"
    shutil.copytree(sdxl, broken)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(FileNotFoundError, match="tokenizer_2"):
        build_models(pretrained_model_path=broken, image_encoder_path=clip)
    with pytest.raises(FileNotFoundError, match=r"no_adapter\.bin"):
        build_models(pretrained_model_path=sdxl, image_encoder_path=clip, ip_adapter_path=tmp_path / "no_adapter.bin")


def test_argument_errors(pretrained_dirs) -> None:
    sdxl, clip = pretrained_dirs
    with pytest.raises(ValueError, match="tiny=True"):
        build_models()
    with pytest.raises(ValueError, match="tiny=True"):
        build_models(pretrained_model_path=sdxl)
    with pytest.raises(ValueError, match="tiny=True"):
        build_models(tiny=True, pretrained_model_path=sdxl, image_encoder_path=clip)
