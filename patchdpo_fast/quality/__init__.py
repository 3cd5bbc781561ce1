"""Patch quality estimation (DESIGN.md section 1, step 2): nearest-patch matching of backbone features."""

from patchdpo_fast.quality.estimator import (
    TINY_TRAINED_DIR,
    Calibration,
    PatchQualityEstimator,
    QualityMaps,
    resize_to_latent,
)
from patchdpo_fast.quality.matching import patch_match, patch_match_reference

__all__ = [
    "TINY_TRAINED_DIR",
    "Calibration",
    "PatchQualityEstimator",
    "QualityMaps",
    "patch_match",
    "patch_match_reference",
    "resize_to_latent",
]
