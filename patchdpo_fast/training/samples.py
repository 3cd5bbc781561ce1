"""Sample grids during training (``samples:`` in the config): what the model draws, next to its references.

One row per reference image: the reference, then one sample per prompt, drawn with the current (policy) adapter by
the same stock diffusers pipeline as :mod:`patchdpo_fast.generation`. Image ``(row, column)`` always starts from the
noise of seed ``samples.seed + row * len(prompts) + column``, so grids of different steps show the same draws.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["write_sample_grid"]


def _grid(rows: list[list[torch.Tensor]], cell: int, pad: int = 2) -> np.ndarray:
    """Images ``(3, h, w)`` in [0, 1], row by row, each resized (nearest) to ``cell`` x ``cell``, on white."""
    height = len(rows) * (cell + pad) + pad
    width = max(len(r) for r in rows) * (cell + pad) + pad
    canvas = np.full((height, width, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            x = torch.nn.functional.interpolate(image[None].float(), size=(cell, cell), mode="nearest")[0]
            tile = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
            y0, x0 = pad + r * (cell + pad), pad + c * (cell + pad)
            canvas[y0 : y0 + cell, x0 : x0 + cell] = tile
    return canvas


@torch.no_grad()
def write_sample_grid(samples_cfg: Any, models: Any, resolution: int, path: str | Path) -> Path:
    """Draw every reference of ``samples_cfg.references`` with every prompt and write the grid PNG to ``path``.

    Args:
        samples_cfg: a :class:`~patchdpo_fast.config.SamplesConfig` with ``references`` set.
        models: the :class:`~patchdpo_fast.models.PatchDPOModels` being trained (the policy adapter draws).
        resolution: image side in pixels (the training resolution).
        path: the PNG to write (atomically).
    """
    from patchdpo_fast.data.build_pairs import discover_subjects
    from patchdpo_fast.data.files import load_image, save_image_atomic
    from patchdpo_fast.generation import build_pipeline, generate

    subjects = discover_subjects(samples_cfg.references)[: samples_cfg.max_references]
    refs = [load_image(s.references[0], resolution) for s in subjects]
    prompts = list(samples_cfg.prompts)
    pipe = build_pipeline(models, scheduler=samples_cfg.scheduler)
    images = generate(
        pipe,
        [ref for ref in refs for _ in prompts],
        prompts * len(refs),
        steps=samples_cfg.steps,
        guidance=samples_cfg.guidance,
        seed=[samples_cfg.seed + i for i in range(len(refs) * len(prompts))],
        resolution=resolution,
        negative_prompt=samples_cfg.negative_prompt,
        output_type="pt",
    )
    rows = [[ref, *images[i * len(prompts) : (i + 1) * len(prompts)]] for i, ref in enumerate(refs)]
    cell = max(resolution, 96)
    return save_image_atomic(_grid(rows, cell), path)
