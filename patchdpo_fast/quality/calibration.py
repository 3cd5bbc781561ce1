"""Fitting the similarity -> quality calibration of a :class:`~.estimator.PatchQualityEstimator`.

The calibration is linear with clamping, ``q = clamp((s - low) / (high - low), 0, 1)``. The anchors are fitted on
synthetic pairs made from photos the estimator is meant for: each photo against a copy with the training recipe's
global change and off-grid defects (:mod:`.defects`; the first version's grid corruptions of :mod:`.synthetic` with
``recipe="grid"``); the corrupted patches are the cells more than half covered. ``high`` is the median best-match
similarity of the clean generated patches (so typical correct patches get quality ~1) and ``low`` the median
similarity of the corrupted ones (so typical wrong patches get quality ~0).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from patchdpo_fast.quality.defects import TRAIN_CHANGE, TRAIN_RECIPE, DefectRecipe, make_defect_pairs
from patchdpo_fast.quality.estimator import Calibration
from patchdpo_fast.quality.synthetic import make_pairs

if TYPE_CHECKING:
    from patchdpo_fast.quality.estimator import PatchQualityEstimator

__all__ = ["collect_similarities", "fit_calibration"]


def collect_similarities(
    estimator: PatchQualityEstimator,
    images: torch.Tensor,
    *,
    pairs_per_image: int = 2,
    seed: int = 0,
    batch_size: int = 16,
    recipe: str | DefectRecipe = "offgrid",
    **pair_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw generated-side similarities of clean and of corrupted patches on synthetic pairs of ``images``:
    off-grid defects of the training recipe (``recipe="offgrid"`` or a :class:`~.defects.DefectRecipe`; positives the
    cells more than half covered) or the first version's grid-aligned corruptions (``recipe="grid"``)."""
    g = torch.Generator().manual_seed(seed)
    clean, bad = [], []
    src = images.float().cpu()
    for _ in range(pairs_per_image):
        for i in range(0, src.shape[0], batch_size):
            batch = src[i : i + batch_size]
            if recipe == "grid":
                pairs = make_pairs(batch, estimator.grid_size, g, **pair_kwargs)
            else:
                rec = TRAIN_RECIPE if recipe == "offgrid" else recipe
                pairs = make_defect_pairs(
                    batch, estimator.grid_size, g, recipe=rec, gen_change=TRAIN_CHANGE, **pair_kwargs
                )
            sim = estimator.estimate(pairs.reference, pairs.generated).generated_similarity.cpu()
            clean.append(sim[pairs.labels == 0])
            bad.append(sim[pairs.labels == 1])
    return torch.cat(clean), torch.cat(bad)


def fit_calibration(
    estimator: PatchQualityEstimator,
    images: torch.Tensor,
    *,
    pairs_per_image: int = 2,
    seed: int = 0,
    max_images: int = 64,
    batch_size: int = 16,
    recipe: str | DefectRecipe = "offgrid",
) -> Calibration:
    """Fit ``low``/``high`` on synthetic pairs of (at most ``max_images`` of) ``images`` ``(N, 3, H, W)`` in [0, 1].

    Raises ValueError when the pairs hold no corrupted or no clean patch, or when the corrupted patches are not
    less similar than the clean ones (an estimator whose features cannot tell them apart cannot be calibrated).
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"fit_calibration: `images` must be a non-empty (N, 3, H, W) batch, got {tuple(images.shape)}")
    clean, bad = collect_similarities(
        estimator, images[:max_images], pairs_per_image=pairs_per_image, seed=seed, batch_size=batch_size,
        recipe=recipe,
    )  # fmt: skip
    if clean.numel() == 0 or bad.numel() == 0:
        raise ValueError("fit_calibration: the synthetic pairs hold no clean or no corrupted patch; use more images")
    high = float(clean.median())
    low = float(bad.median())
    if not high > low:
        raise ValueError(
            f"fit_calibration: corrupted patches are not less similar than clean ones (median {low:.4f} vs "
            f"{high:.4f}); the backbone cannot be calibrated"
        )
    info = {
        "method": "median similarity of corrupted (low) and clean (high) patches on synthetic pairs",
        "recipe": recipe if isinstance(recipe, str) else "custom",
        "images": int(min(max_images, images.shape[0])),
        "pairs_per_image": pairs_per_image,
        "seed": seed,
        "clean_patches": int(clean.numel()),
        "corrupted_patches": int(bad.numel()),
        "clean_quantiles_10_50_90": [float(v) for v in torch.quantile(clean, torch.tensor([0.1, 0.5, 0.9]))],
        "corrupted_quantiles_10_50_90": [float(v) for v in torch.quantile(bad, torch.tensor([0.1, 0.5, 0.9]))],
    }
    return Calibration(low=low, high=high, info=info)
