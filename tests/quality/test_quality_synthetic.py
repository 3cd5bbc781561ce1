"""Synthetic pairs: known correspondence, labels where the pixels changed, reproducibility; ranking metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchdpo_fast.quality.metrics import auroc, average_precision
from patchdpo_fast.quality.synthetic import (
    IDENTITY,
    Corruptions,
    Geometry,
    make_pairs,
    map_cells,
    sample_affine,
)


def test_identity_views_and_clean_cells_untouched(photos):
    g = torch.Generator().manual_seed(0)
    pairs = make_pairs(photos, (16, 16), g, gen_geometry=IDENTITY, gen_photometric=None)
    torch.testing.assert_close(pairs.reference, photos)
    assert pairs.labels.shape == pairs.kinds.shape == (4, 16, 16)
    assert (pairs.labels == 1).any(), "every image gets at least one corrupted rectangle"
    # outside the corrupted rectangles the generated image is the reference (identity resampling: float rounding)
    touched = (pairs.labels != 0).repeat_interleave(8, 1).repeat_interleave(8, 2)
    same = (pairs.generated - photos).abs().amax(1) < 1e-5
    assert same[~touched].all()
    # corrupted cells carry their kind, clean cells kind 0
    assert ((pairs.kinds > 0) == (pairs.labels == 1)).all()
    # identity geometry: every cell maps onto itself
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    torch.testing.assert_close(pairs.gen_to_ref[0], torch.stack([rows, cols], -1), atol=1e-4, rtol=0)


def test_flip_correspondence():
    flip = Geometry(flip_p=1.0, zoom=(1.0, 1.0), rotate_deg=0.0)
    g = torch.Generator().manual_seed(0)
    theta = sample_affine(1, flip, g)
    coords = map_cells(theta, sample_affine(1, IDENTITY, g), (4, 6))
    torch.testing.assert_close(coords[0, 2, 1], torch.tensor([2.0, 4.0]), atol=1e-5, rtol=0)


def test_zoomed_view_maps_into_the_reference_and_partly_outside():
    g = torch.Generator().manual_seed(1)
    theta_ref = sample_affine(8, Geometry(flip_p=0.0, zoom=(1.5, 1.5), rotate_deg=0.0), g)
    coords = map_cells(sample_affine(8, IDENTITY, g), theta_ref, (16, 16))
    assert torch.isnan(coords).any(), "the full photo reaches outside a zoomed-in reference crop"
    inside = coords[torch.isfinite(coords)]
    assert inside.min() >= -0.5 - 1e-4 and inside.max() <= 15.5 + 1e-4


def test_pairs_are_reproducible_and_kinds_selectable(photos):
    a = make_pairs(photos, (16, 16), torch.Generator().manual_seed(7))
    b = make_pairs(photos, (16, 16), torch.Generator().manual_seed(7))
    torch.testing.assert_close(a.generated, b.generated)
    assert torch.equal(a.labels, b.labels)
    blur_only = make_pairs(photos, (16, 16), torch.Generator().manual_seed(7), corruptions=Corruptions(kinds=("blur",)))
    assert set(blur_only.kinds.unique().tolist()) <= {0, 2}
    with pytest.raises(ValueError, match="unknown kinds"):
        Corruptions(kinds=("smudge",))


def test_size_and_no_corruption(photos):
    pairs = make_pairs(photos[:2], (8, 8), torch.Generator().manual_seed(0), corruptions=None, size=(64, 64))
    assert pairs.generated.shape == (2, 3, 64, 64) and not pairs.labels.any()


def test_auroc_and_ap_against_brute_force():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 300).astype(float)  # many ties
    labels = rng.random(300) < 0.3
    pos, neg = scores[labels], scores[~labels]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (pos.size * neg.size)
    assert auroc(scores, labels) == pytest.approx(brute)
    assert auroc(np.array([0.1, 0.9]), np.array([0, 1])) == 1.0
    assert np.isnan(auroc(np.ones(3), np.zeros(3)))
    # AP: ranking [1, 0, 1] -> precision 1 at recall 1/2, 2/3 at recall 1
    assert average_precision(np.array([3.0, 2.0, 1.0]), np.array([1, 0, 1])) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # ties are one threshold: [1, 1] tied with a negative -> precision 2/3 at recall 1
    assert average_precision(np.array([1.0, 1.0, 1.0]), np.array([1, 1, 0])) == pytest.approx(2 / 3)
    assert np.isnan(average_precision(np.ones(2), np.zeros(2)))
    with pytest.raises(ValueError, match="same size"):
        auroc(np.ones(3), np.ones(2))
