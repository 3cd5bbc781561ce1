"""Local sharpness of every patch, relative to the image's own sharpness: the statistic the matching features lack.

A self-supervised backbone trained to match patches across global changes that include blurs of the whole image
learns to ignore blur (docs/quality.md, "Why blur-like defects are hard"): a smeared patch keeps a feature close to
its sharp source. This module measures what such features discard, per cell of the patch grid:

* the luminance of the image is split into two fine frequency bands, ``L - G_1(L)`` and ``G_1(L) - G_2(L)``
  (``G_s``: Gaussian blur of sigma ``s`` pixels at the estimator's input size);
* the **log energy** of each band over the cell, ``log(mean(band**2) + eps)`` (``eps`` keeps flat cells, where
  noise and JPEG dominate, at a common floor);
* **relative** to the image: minus the ``quantile`` (75 %) of the cells' log energies, so a blur, zoom or JPEG of the
  whole image (a global change that is not a defect) shifts every cell alike and leaves the relative value about
  unchanged, while a locally smeared part drops against the rest of its own image; clamped to ``[-clamp, clamp]``.

:func:`sharpness_embedding` turns the ``K`` values of a cell into a unit vector whose dot product with another
cell's vector is ``mean_k cos(scale * (s_k - s'_k))``: appended to L2-normalized matching features with weight
``lambda`` (``PatchQualityEstimator(sharpness_weight=lambda)``), the cosine similarity of two cells becomes
``(1 - lambda) * cos_features + lambda * sharpness_agreement``, and nearest-patch matching (the Triton kernel
included) needs no change. ``scale`` is ``pi / (2 * clamp)``, so the agreement falls monotonically from 1 (same
relative sharpness) to -1 (the largest possible difference).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

__all__ = ["LUMA", "local_sharpness", "sharpness_embedding"]

#: Rec. 601 luma weights of RGB in [0, 1].
LUMA = (0.299, 0.587, 0.114)
#: Gaussian sigmas (pixels at the input size) whose differences define the bands.
BAND_SIGMAS = (1.0, 2.0)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, 1, H, W)`` with replicate padding (radius ``3 sigma``)."""
    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))


def local_sharpness(
    images: torch.Tensor,
    grid: tuple[int, int],
    *,
    eps: float = (1.0 / 255.0) ** 2,
    quantile: float = 0.75,
    clamp: float = 2.0,
) -> torch.Tensor:
    """Relative log band energies ``(B, gh, gw, 2)`` of ``(B, 3, H, W)`` images in [0, 1] (module docstring).

    ``H`` and ``W`` must be multiples of the grid (the estimator's input size and patch grid)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"local_sharpness: images must be (B, 3, H, W), got {tuple(images.shape)}")
    gh, gw = grid
    h, w = images.shape[-2:]
    if h % gh or w % gw or min(h, w) < 4:
        raise ValueError(f"local_sharpness: image size {(h, w)} is not a multiple of the grid {grid}")
    luma = torch.tensor(LUMA, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    lum = (images.float() * luma).sum(1, keepdim=True)
    levels = [lum] + [_blur(lum, s) for s in BAND_SIGMAS]
    energies = [F.avg_pool2d((a - b) ** 2, (h // gh, w // gw)) for a, b in itertools.pairwise(levels)]
    log_e = torch.log(torch.cat(energies, dim=1) + eps)  # (B, K, gh, gw)
    ref = torch.quantile(log_e.flatten(2), quantile, dim=-1)[..., None, None]
    return (log_e - ref).clamp(-clamp, clamp).permute(0, 2, 3, 1).contiguous()


def sharpness_embedding(values: torch.Tensor, clamp: float = 2.0) -> torch.Tensor:
    """Unit vectors ``(..., 2K)`` of relative sharpness values ``(..., K)`` in ``[-clamp, clamp]``: the dot product
    of two embeddings is ``mean_k cos(pi / (2 clamp) * (a_k - b_k))``."""
    angle = values * (math.pi / (2.0 * clamp))
    k = values.shape[-1]
    return torch.cat([angle.cos(), angle.sin()], dim=-1) / math.sqrt(k)
