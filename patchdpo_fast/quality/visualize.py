"""Heatmap panels of quality maps: ``reference | generated | generated quality | reference quality``.

Quality is drawn as a red (0) -> yellow (0.5) -> green (1) overlay on the darkened image, so a person sees at a
glance which generated patches are wrong and which reference parts were missed. Only numpy and Pillow are used.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from patchdpo_fast.quality.estimator import QualityMaps

__all__ = ["quality_colors", "quality_panel"]


def quality_colors(q: np.ndarray) -> np.ndarray:
    """RGB ``(..., 3)`` in [0, 1] for quality values in [0, 1]: red -> yellow -> green."""
    q = np.clip(q, 0.0, 1.0)[..., None]
    red = np.array([0.85, 0.1, 0.1])
    yellow = np.array([0.95, 0.85, 0.1])
    green = np.array([0.1, 0.75, 0.2])
    low = red + (yellow - red) * np.clip(q * 2, 0, 1)
    return np.where(q < 0.5, low, yellow + (green - yellow) * np.clip(q * 2 - 1, 0, 1))


def _overlay(image: torch.Tensor, q: torch.Tensor, size: int, alpha: float) -> np.ndarray:
    img = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    img = img[0].permute(1, 2, 0).clamp(0, 1).cpu().numpy()
    cells = F.interpolate(q[None, None].float(), size=(size, size), mode="nearest")[0, 0].cpu().numpy()
    return (1 - alpha) * img * 0.8 + alpha * quality_colors(cells)


def quality_panel(
    reference: torch.Tensor,
    generated: torch.Tensor,
    maps: QualityMaps,
    index: int = 0,
    *,
    size: int = 256,
    alpha: float = 0.55,
    gap: int = 4,
):
    """One PIL image for pair ``index`` of a batch: the two images, then the generated and reference quality
    overlays (each ``size`` px square, ``gap`` px apart on white)."""
    from PIL import Image

    tiles = [
        F.interpolate(x[index][None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)[
            0
        ]
        .permute(1, 2, 0)
        .clamp(0, 1)
        .cpu()
        .numpy()
        for x in (reference, generated)
    ]
    tiles.append(_overlay(generated[index], maps.generated[index], size, alpha))
    tiles.append(_overlay(reference[index], maps.reference[index], size, alpha))
    width = len(tiles) * size + (len(tiles) - 1) * gap
    canvas = np.ones((size, width, 3))
    for i, tile in enumerate(tiles):
        x0 = i * (size + gap)
        canvas[:, x0 : x0 + size] = tile
    return Image.fromarray((canvas * 255).round().astype(np.uint8))
