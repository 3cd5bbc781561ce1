"""Patch quality estimation (DESIGN.md section 1, step 2): nearest-patch matching of backbone features."""

from typing import Any

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
    "ManifestMapsSummary",
    "PatchQualityEstimator",
    "QualityMaps",
    "compute_manifest_maps",
    "patch_match",
    "patch_match_reference",
    "resize_to_latent",
]

_LAZY = {"ManifestMapsSummary", "compute_manifest_maps"}  # from .manifest_maps, imported on first use


def __getattr__(name: str) -> Any:
    # lazily, so that ``python -m patchdpo_fast.quality.manifest_maps`` does not import its own module twice
    if name in _LAZY:
        from patchdpo_fast.quality import manifest_maps

        return getattr(manifest_maps, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
