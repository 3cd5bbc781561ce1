"""Raw-pixel nearest-patch matching: the baseline every quality benchmark result is printed beside.

The "feature" of a patch is its pixels (the image resized so that the estimator's patch grid has ``patch_px``-pixel
cells, normalized per channel like the backbones' inputs, one cell flattened to a ``3 * patch_px**2`` vector); the
quality of a generated patch is its best cosine similarity to the reference patches, exactly as the estimator does
with backbone features. What a backbone scores above this is what its features add. With ``reference_views``
(:mod:`.reference_views`) the generated cells are matched against the same re-sampled views of the reference as the
estimator's (and the reference cells against the generated image's views at the reciprocal scales), so that
comparison stays about the features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from patchdpo_fast.quality.backbone import IMAGENET_MEAN, IMAGENET_STD
from patchdpo_fast.quality.estimator import Calibration, QualityMaps
from patchdpo_fast.quality.matching import patch_match_reference
from patchdpo_fast.quality.reference_views import ReferenceViews, view_images, view_masks

__all__ = ["RawPixelMatcher"]


class RawPixelMatcher:
    """Quality maps from raw-pixel nearest-patch matching on a ``grid`` (same interface as
    :meth:`PatchQualityEstimator.estimate <patchdpo_fast.quality.estimator.PatchQualityEstimator.estimate>`).

    Args:
        grid: ``(gh, gw)`` patch grid (use the estimator's ``grid_size`` to compare with it).
        patch_px: pixels per cell side after resizing.
        image_mean, image_std: per-channel normalization of [0, 1] pixels.
        reference_views: :class:`~.reference_views.ReferenceViews` (or its dict) of the reference to match against
            (default: the reference alone).
    """

    def __init__(
        self,
        grid: tuple[int, int] | Sequence[int] = (16, 16),
        *,
        patch_px: int = 16,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        reference_views: ReferenceViews | dict[str, Any] | None = None,
    ) -> None:
        if len(grid) != 2 or min(int(v) for v in grid) <= 0 or patch_px <= 0:
            raise ValueError(f"RawPixelMatcher: need a positive (gh, gw) grid and patch_px, got {grid}, {patch_px}")
        self.grid_size = (int(grid[0]), int(grid[1]))
        self.patch_px = int(patch_px)
        self._mean = torch.tensor([float(v) for v in image_mean]).view(1, 3, 1, 1)
        self._std = torch.tensor([float(v) for v in image_std]).view(1, 3, 1, 1)
        self.calibration = Calibration()
        self.reference_views = ReferenceViews.from_any(reference_views)

    def config_dict(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"kind": "raw-pixel", "grid": list(self.grid_size), "patch_px": self.patch_px}
        if not self.reference_views.is_identity:
            cfg["reference_views"] = self.reference_views.to_dict()
        return cfg

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, gh, gw, 3 * patch_px**2)`` pixel vectors of ``(B, 3, H, W)`` images in [0, 1]."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"RawPixelMatcher: images must be (B, 3, H, W), got {getattr(images, 'shape', images)}")
        gh, gw = self.grid_size
        p = self.patch_px
        x = images.float()
        if tuple(x.shape[-2:]) != (gh * p, gw * p):
            x = F.interpolate(x, size=(gh * p, gw * p), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self._mean.to(x)) / self._std.to(x)
        cells = x.reshape(x.shape[0], 3, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
        return cells.reshape(x.shape[0], gh, gw, 3 * p * p)

    @torch.no_grad()
    def estimate(self, reference: torch.Tensor, generated: torch.Tensor, **_: Any) -> QualityMaps:
        """Maps of ``(B, 3, H, W)`` reference (or one reference) and generated images in [0, 1]."""
        gh, gw = self.grid_size
        views = self.reference_views
        rf = self.features(reference).flatten(1, 2)
        gf = self.features(generated).flatten(1, 2)
        keys, key_mask = (rf, None) if views.is_identity else self._view_keys(reference, views)
        if rf.shape[0] == 1 and gf.shape[0] > 1:
            rf, keys = rf.expand(gf.shape[0], -1, -1), keys.expand(gf.shape[0], -1, -1)
            key_mask = None if key_mask is None else key_mask.expand(gf.shape[0], -1)
        sim_gen = patch_match_reference(gf, keys, key_mask).view(-1, gh, gw)
        # the reference side: the generated image's views at the reciprocal scales
        gen_keys, gen_mask = (gf, None) if views.is_identity else self._view_keys(generated, views.inverse())
        sim_ref = patch_match_reference(rf, gen_keys, gen_mask).view(-1, gh, gw)
        return QualityMaps(self.calibration(sim_gen), self.calibration(sim_ref), sim_gen, sim_ref, None)

    def _view_keys(self, images: torch.Tensor, views: ReferenceViews) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell vectors of every view of ``images`` side by side ``(B, V * gh * gw, D)`` and their candidate mask."""
        gh, gw = self.grid_size
        p = self.patch_px
        x = images.float()
        if tuple(x.shape[-2:]) != (gh * p, gw * p):
            x = F.interpolate(x, size=(gh * p, gw * p), mode="bilinear", align_corners=False, antialias=True)
        keys = torch.cat([self.features(v).flatten(1, 2) for v in view_images(x, views, (p, p))], dim=1)
        return keys, view_masks(views, (gh * p, gw * p), self.grid_size, batch=x.shape[0]).flatten(1)
