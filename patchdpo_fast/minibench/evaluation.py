"""Generating and grading held-out subjects with one adapter (the ``evaluate`` stage of ``patchdpo minibench``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchdpo_fast.minibench.metrics import score_images, summarize
from patchdpo_fast.utils import atomic_write_json

__all__ = ["evaluate_adapter", "generate_heldout", "save_grid"]


@torch.no_grad()
def generate_heldout(bench: Any, models: Any, seed: int) -> tuple[torch.Tensor, list[str], list[Any]]:
    """Every held-out subject in every evaluation scene (``samples_per_prompt`` each), as ``(N, 3, H, W)`` in [0, 1].

    Image ``i`` starts from the noise of seed ``seed * 1_000_003 + i``: for a given seed every model starts from
    the same noise, so models are compared image by image.
    """
    from patchdpo_fast.generation import build_pipeline, generate

    e, world = bench.settings.eval, bench.world
    pipe = build_pipeline(models, scheduler="ddim")
    subjects, scenes, refs = [], [], []
    for subject in world.heldout_subjects:
        ref = torch.from_numpy(world.render_reference(subject).image).permute(2, 0, 1)
        for scene in world.eval_scenes():
            for _ in range(e.samples_per_prompt):
                subjects.append(subject.name)
                scenes.append(scene)
                refs.append(ref)
    images = []
    for start in range(0, len(subjects), e.batch_size):
        stop = min(len(subjects), start + e.batch_size)
        images.append(
            generate(
                pipe,
                refs[start:stop],
                [s.prompt for s in scenes[start:stop]],
                ip_scale=1.0,
                steps=e.sampler_steps,
                guidance=e.guidance,
                seed=[seed * 1_000_003 + i for i in range(start, stop)],
                resolution=world.resolution,
                negative_prompt="",
                output_type="pt",
            )
        )
    return torch.cat(images), subjects, scenes


def save_grid(images: torch.Tensor, rows: int, path: str | Path, scale: int = 3) -> Path:
    """Images ``(N, 3, H, W)`` as a PNG grid with ``rows`` rows (nearest-neighbour upscaled by ``scale``)."""
    from patchdpo_fast.data.files import save_image_atomic

    n, _, h, w = images.shape
    cols = (n + rows - 1) // rows
    canvas = torch.ones(3, rows * (h + 1), cols * (w + 1))
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[:, r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = images[i]
    array = (canvas.permute(1, 2, 0).numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
    array = array.repeat(scale, 0).repeat(scale, 1)
    return save_image_atomic(array, path)


def evaluate_checkpoint(bench: Any, judges: Any, checkpoint: str | Path, seed: int) -> dict[str, float]:
    """Grade a pretraining checkpoint (its UNet and adapter on the initial model folder): the learning curve."""
    from safetensors.torch import load_file

    from patchdpo_fast.models import build_models

    init = bench.path("model_init")
    checkpoint = Path(checkpoint)
    models = build_models(
        pretrained_model_path=init / "base",
        image_encoder_path=init / "image_encoder",
        ip_adapter_path=init / "ip_adapter_init.safetensors",
        train_resampler=True,
        train_unet=True,
    )
    models.load_adapter_state_dict(load_file(str(checkpoint / "adapter.safetensors")))
    models.ip_unet.load_unet_state_dict(load_file(str(checkpoint / "unet.safetensors")))
    models.ip_unet.requires_grad_(False)
    images, subjects, scenes = generate_heldout(bench, models, seed)
    return summarize(score_images(judges, bench.world, images, subjects, scenes))


def evaluate_adapter(
    bench: Any, judges: Any, base: str | Path, adapter: str | Path, seed: int, target: str | Path
) -> dict[str, Any]:
    """Generate the held-out set with the model folder ``base`` + ``adapter``, grade it, write ``metrics.json``,
    the samples (uint8 safetensors) and a grid."""
    from safetensors.torch import save_file

    from patchdpo_fast.models import build_models

    m = bench.base_model
    models = build_models(pretrained_model_path=base, image_encoder_path=m["image_encoder"], ip_adapter_path=adapter)
    images, subjects, scenes = generate_heldout(bench, models, seed)
    per_image = score_images(judges, bench.world, images, subjects, scenes)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    save_file(
        {"images": (images * 255 + 0.5).clamp(0, 255).to(torch.uint8).contiguous()}, str(target / "samples.safetensors")
    )
    save_grid(images, len(bench.world.heldout_subjects), target / "samples.png")
    result = {"adapter": str(adapter), "seed": seed, "summary": summarize(per_image), "per_image": per_image}
    atomic_write_json(target / "metrics.json", result)
    return result
