"""Generation with the stock SDXL pipeline around our IP-Adapter-Plus: same numbers as the training model."""

from __future__ import annotations

import argparse

import pytest
import torch
from PIL import Image

from patchdpo_fast.generation import (
    build_pipeline,
    generate,
    image_prompt_tokens,
    model_identity,
    models_from_args,
)
from patchdpo_fast.models import build_models


@pytest.fixture(scope="module")
def models():
    return build_models(tiny=True, seed=0)


@pytest.fixture(scope="module")
def pipe(models):
    return build_pipeline(models, scheduler="euler")


def refs(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, 40 + 8 * i, 48, generator=g) for i in range(n)]


def test_pipeline_is_our_model(pipe, models) -> None:
    """A 2-step pipeline run equals the same sampler driven by ``models.predict_noise`` (the training forward)."""
    from diffusers import StableDiffusionXLPipeline

    assert type(pipe) is StableDiffusionXLPipeline and pipe.unet is models.unet
    ref = refs(1)[0]
    latents = generate(pipe, [ref], ["a red dog"], steps=2, guidance=1.0, resolution=64, seed=5, output_type="latent")

    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(2)
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5)) * sched.init_noise_sigma
    embeds, pooled = models.encode_prompts(["a red dog"])
    feats = models.encode_reference_images(ref[None])
    with torch.no_grad():
        for t in sched.timesteps:
            eps = models.predict_noise(sched.scale_model_input(x, t), t.expand(1), embeds, pooled,
                                       models.add_time_ids(1, 64), feats)  # fmt: skip
            x = sched.step(eps, t, x).prev_sample
    torch.testing.assert_close(latents, x, rtol=1e-5, atol=1e-6)


def test_seeds_per_image_and_outputs(pipe, models) -> None:
    a, b = refs(2)
    kw = {"steps": 1, "guidance": 3.0, "resolution": 64, "num_images_per_prompt": 2}
    both = generate(pipe, [a, b], ["a dog", "a cat"], seed=[11, 12, 13, 14], output_type="pt", **kw)
    assert both.shape == (4, 3, 64, 64) and both.min() >= 0 and both.max() <= 1
    second = generate(pipe, [b], ["a cat"], seed=[13, 14], output_type="pt", **kw)
    torch.testing.assert_close(second, both[2:], rtol=0, atol=1e-4)  # an image depends on its own seed only
    assert not torch.allclose(both[2], both[3])
    images = generate(pipe, a, ["a dog", "a cat"], steps=1, guidance=3.0, resolution=64)
    assert len(images) == 2 and all(isinstance(im, Image.Image) and im.size == (64, 64) for im in images)
    scales = {p.scale for p in models.ip_unet.ip_processors.values()}
    generate(pipe, [a], ["a dog"], ip_scale=0.3, steps=1, guidance=1.0, resolution=64, output_type="latent")
    assert {p.scale for p in models.ip_unet.ip_processors.values()} == scales  # restored
    with pytest.raises(ValueError, match="seeds"):
        generate(pipe, [a], ["a dog"], seed=[1, 2], steps=1, resolution=64)


def test_reference_modes_and_unconditional_tokens(models) -> None:
    a, b = refs(2)
    single_a, uncond = image_prompt_tokens(models, [a])
    single_b, _ = image_prompt_tokens(models, [b])
    averaged, _ = image_prompt_tokens(models, [[a, b]], reference_mode="all")
    torch.testing.assert_close(averaged, (single_a + single_b) / 2)
    first, _ = image_prompt_tokens(models, [[a, b]], reference_mode="single")
    torch.testing.assert_close(first, single_a)
    assert uncond.shape == (1, models.num_ip_tokens, models.unet.config.cross_attention_dim)
    _, black = image_prompt_tokens(models, [a], uncond_image="black")
    assert not torch.allclose(black, uncond)


def test_model_arguments() -> None:
    args = argparse.Namespace(tiny=False, tiny_seed=0, pretrained=None, image_encoder=None, ip_adapter=None, vae=None,
                              dtype=None, device="cpu", scheduler="euler")  # fmt: skip
    with pytest.raises(ValueError, match="--tiny"):
        models_from_args(args)
    args.tiny = True
    assert model_identity(args) == {"tiny": True, "tiny_seed": 0, "ip_adapter": None, "dtype": "fp32",
                                    "scheduler": "euler"}  # fmt: skip


def test_decoding_matches_the_stock_vae_path(pipe, models) -> None:
    a = refs(1)[0]
    kw = {"steps": 1, "guidance": 3.0, "resolution": 64, "seed": 4}
    latents = generate(pipe, [a], ["a dog"], output_type="latent", **kw)
    with torch.no_grad():
        stock = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    torch.testing.assert_close(generate(pipe, [a], ["a dog"], output_type="pt", **kw), (stock / 2 + 0.5).clamp(0, 1))


def test_half_precision_model_generates() -> None:
    """bf16 UNet / encoders with the fp32 VAE (the GPU setup) run end to end."""
    half = build_models(tiny=True, seed=0, weight_dtype=torch.bfloat16)
    images = generate(build_pipeline(half), refs(1), ["a dog"], steps=1, guidance=3.0, resolution=64, output_type="pt")
    assert images.shape == (1, 3, 64, 64) and images.dtype == torch.float32 and torch.isfinite(images).all()
