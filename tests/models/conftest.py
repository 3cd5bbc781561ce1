"""Shared helpers for the model tests: a deterministic tiny batch for the tiny SDXL IP-Adapter-Plus."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from patchdpo_fast.models import PatchDPOModels, build_models


@dataclass
class TinyBatch:
    """Conditioning and noisy latents for one denoiser call."""

    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor
    image_features: torch.Tensor

    def args(self) -> tuple[torch.Tensor, ...]:
        return (
            self.noisy_latents,
            self.timesteps,
            self.prompt_embeds,
            self.pooled,
            self.time_ids,
            self.image_features,
        )


def make_batch(models: PatchDPOModels, batch: int = 2, resolution: int = 64, seed: int = 0) -> TinyBatch:
    """Encode a random image/prompt batch with ``models`` and noise it (deterministic in ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, resolution, resolution, generator=g)
    latents = models.encode_images(images * 2 - 1, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, models.noise_scheduler.config.num_train_timesteps, (batch,), generator=g)
    noisy = models.noise_scheduler.add_noise(latents, noise, timesteps)
    prompts = ["a photo of sks dog", "a red toy on the beach", "a cat wearing a hat", "a blue backpack"]
    prompt_embeds, pooled = models.encode_prompts([prompts[i % len(prompts)] for i in range(batch)])
    features = models.encode_reference_images(torch.rand(batch, 3, 40, 48, generator=g))
    return TinyBatch(noisy, timesteps, prompt_embeds, pooled, models.add_time_ids(batch, resolution), features)


@pytest.fixture
def batch_factory():
    """``make_batch`` as a fixture, for tests that build their own models."""
    return make_batch


@pytest.fixture
def tiny_models() -> PatchDPOModels:
    return build_models(tiny=True, seed=0)


@pytest.fixture
def tiny_batch(tiny_models: PatchDPOModels) -> TinyBatch:
    return make_batch(tiny_models)
