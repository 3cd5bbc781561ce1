"""scripts/quality_scoring_variants.py: its plain variant reads the similarities exactly as the estimator does, and
the spatial verification scores what it says (docs/quality.md, "What the scoring cannot add")."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "quality_scoring_variants.py"


@pytest.fixture(scope="module")
def variants_module():
    spec = importlib.util.spec_from_file_location("quality_scoring_variants", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_base_variant_is_the_estimators_similarity(variants_module, photos):
    from patchdpo_fast.quality import PatchQualityEstimator

    est = PatchQualityEstimator.tiny(seed=0, sharpness_weight=0.3)
    ref, gen = photos[:2], photos[2:4].flip(-1)
    want = est.estimate(ref, gen).generated_similarity
    got = variants_module.Scorer(est).estimate(ref, gen).generated_similarity
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the layer variant with the final layer twice is the base feature again
    layer = variants_module.Scorer(est, "layer", layer=-1, weight=1.0).estimate(ref, gen).generated_similarity
    torch.testing.assert_close(layer, want, atol=1e-5, rtol=0)
    # a views variant is the estimator with those reference views, and leaves the estimator's own views as they were
    from patchdpo_fast.quality.reference_views import ReferenceViews

    views = ReferenceViews((1.0, 1.2), crops=2, shift=0.5)
    got = variants_module.Scorer(est, "views", views=views).estimate(ref, gen).generated_similarity
    want = PatchQualityEstimator(est.backbone, sharpness_weight=0.3, reference_views=views).estimate(ref, gen)
    torch.testing.assert_close(got, want.generated_similarity, atol=1e-5, rtol=0)
    assert (
        est.reference_views.is_identity
        and (got >= variants_module.Scorer(est).estimate(ref, gen).generated_similarity - 1e-5).all()
    )


def test_neighbour_scores(variants_module):
    h, w = 4, 5
    n = h * w
    identity = torch.eye(n)[None]  # every patch matches its own cell perfectly and nothing else
    scores = variants_module.neighbour_scores(identity, (h, w), mu=0.5, radius=0)
    torch.testing.assert_close(scores, torch.ones(1, n))  # every neighbour finds its match next to the match
    torch.testing.assert_close(variants_module.neighbour_scores(identity, (h, w), 0.0, 0), torch.ones(1, n))

    # a duplicated patch: cell 7 matches cell 18 perfectly (its own cell not at all); its neighbours do not follow
    dup = identity.clone()
    dup[0, 7] = 0.0
    dup[0, 7, 18] = 1.0
    scores = variants_module.neighbour_scores(dup, (h, w), mu=0.5, radius=0)
    assert scores[0, 7] < 0.6 and torch.all(scores[0, :7] >= 0.9 - 1e-6)
    # searching one cell around the expected place forgives a neighbour that landed one cell off
    shifted = identity.clone()
    shifted[0, 8] = 0.0
    shifted[0, 8, 9] = 1.0  # cell 8 (row 1, col 3) matches one cell to the right
    exact = variants_module.neighbour_scores(shifted, (h, w), mu=0.5, radius=0)
    loose = variants_module.neighbour_scores(shifted, (h, w), mu=0.5, radius=1)
    assert loose[0, 8] > exact[0, 8]
