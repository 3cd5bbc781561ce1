"""Shared fixtures of the quality tests: small synthetic photos (always available) and the real-photo folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from quality_helpers import synthetic_photos

#: Real photos (20 DreamBench subjects, 256 px): $PATCHDPO_DREAMBENCH, else ../shared/data/dreambench256 next to
#: the checkout. Tests that need them skip when the folder is absent; nothing is copied into the repository.
DREAMBENCH = Path(
    os.environ.get("PATCHDPO_DREAMBENCH", Path(__file__).resolve().parents[3] / "shared" / "data" / "dreambench256")
)


@pytest.fixture(scope="session")
def photos() -> torch.Tensor:
    return synthetic_photos(4)


@pytest.fixture(scope="session")
def tiny_estimator():
    from patchdpo_fast.quality import PatchQualityEstimator

    return PatchQualityEstimator.tiny(seed=0)


@pytest.fixture(scope="session")
def dreambench() -> Path:
    if not DREAMBENCH.is_dir():
        pytest.skip(f"real photos not available: {DREAMBENCH} does not exist (shared/data/dreambench256)")
    return DREAMBENCH


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Run the quality tests with one intra-op thread, restoring the previous setting afterwards.

    Their tensors are small; on a shared 2-core machine two OpenMP threads contending with other jobs made them 2-4x
    slower than one (spin-waiting workers), and the folder must stay well under a minute.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
