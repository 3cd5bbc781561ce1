"""Relative local sharpness (quality/sharpness.py) and the estimator's ``sharpness_weight``."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from patchdpo_fast.quality import PatchQualityEstimator
from patchdpo_fast.quality.sharpness import local_sharpness, sharpness_embedding
from patchdpo_fast.quality.synthetic import gaussian_blur


def _texture(n: int = 2, size: int = 128, seed: int = 0) -> torch.Tensor:
    """Textured images: smoothed noise (sigma 0.7 px) on a colour gradient, every cell holding fine detail."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, 3, size, size, generator=g)
    noise = torch.stack([gaussian_blur(x, 0.7) for x in noise])
    ramp = torch.linspace(0.2, 0.8, size).view(1, 1, 1, -1)
    return (0.5 * ramp + 0.5 * noise).clamp(0, 1)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.stack([gaussian_blur(im, sigma, max_radius=x.shape[-1] - 1) for im in x])


def test_local_blur_lowers_relative_sharpness_and_global_blur_does_not():
    x = _texture()
    grid = (8, 8)
    s0 = local_sharpness(x, grid)
    assert s0.shape == (2, 8, 8, 2) and s0.abs().max() <= 2.0
    # a blur of the whole image (a global change) leaves the relative values about unchanged ...
    s_global = local_sharpness(_blur(x, 0.8), grid)
    assert (s_global - s0).abs().mean() < 0.15
    # ... while the same blur (stronger: 2 px) of a 4 x 4-cell block drops them there, and only there
    local = x.clone()
    local[..., 32:96, 32:96] = _blur(x, 2.0)[..., 32:96, 32:96]
    s_local = local_sharpness(local, grid)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[2:6, 2:6] = True
    drop = (s0 - s_local).mean(-1)  # (2, 8, 8), mean over the bands
    assert drop[:, inside].min() > 1.0
    assert drop[:, ~inside].abs().max() < 0.3


def test_local_sharpness_bad_inputs():
    with pytest.raises(ValueError, match="multiple of the grid"):
        local_sharpness(torch.rand(1, 3, 30, 32), (4, 4))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        local_sharpness(torch.rand(3, 32, 32), (4, 4))


def test_sharpness_embedding_dot_product():
    a = torch.rand(5, 2) * 4 - 2
    b = torch.rand(5, 2) * 4 - 2
    ea, eb = sharpness_embedding(a), sharpness_embedding(b)
    assert torch.allclose(ea.norm(dim=-1), torch.ones(5))
    expected = torch.cos(math.pi / 4 * (a - b)).mean(-1)
    assert torch.allclose((ea * eb).sum(-1), expected, atol=1e-6)
    # monotone: the agreement falls from 1 (equal) to -1 (the largest difference, 2 * clamp)
    z = torch.zeros(1, 2)
    assert float((sharpness_embedding(z) * sharpness_embedding(z + 2)).sum()) == pytest.approx(0.0, abs=1e-6)
    assert float((sharpness_embedding(z - 2) * sharpness_embedding(z + 2)).sum()) == pytest.approx(-1.0, abs=1e-6)


def test_estimator_similarity_mixes_features_and_sharpness():
    x = _texture(2, size=256)
    y = x.flip(0)  # another image as the "generated" one
    lam = 0.3
    plain = PatchQualityEstimator.tiny(seed=0)
    mixed = PatchQualityEstimator.tiny(seed=0, sharpness_weight=lam)
    fx, fy = mixed.features(x), mixed.features(y)
    assert fx.shape[-1] == 128 + 4 and torch.allclose(fx.norm(dim=-1), torch.ones(2, 16, 16), atol=1e-5)
    ax, ay = F.normalize(plain.features(x), dim=-1), F.normalize(plain.features(y), dim=-1)
    sx, sy = sharpness_embedding(local_sharpness(x, (16, 16))), sharpness_embedding(local_sharpness(y, (16, 16)))
    cos = (fx * fy).sum(-1)
    assert torch.allclose(cos, (1 - lam) * (ax * ay).sum(-1) + lam * (sx * sy).sum(-1), atol=1e-4)
    # an image against itself is still perfect
    maps = mixed.estimate(x, x)
    assert torch.allclose(maps.generated_similarity, torch.ones(2, 16, 16), atol=1e-4)


def test_sharpness_weight_makes_a_local_blur_visible():
    """An untrained backbone barely sees a 2 px blur of a textured block; with the sharpness channel the blurred
    cells drop clearly below the clean ones."""
    x = _texture(2, size=256, seed=3)
    gen = x.clone()
    gen[..., 64:160, 96:192] = _blur(x, 2.0)[..., 64:160, 96:192]
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[4:10, 6:12] = True
    gaps = {}
    for lam in (0.0, 0.3):
        sim = PatchQualityEstimator.tiny(seed=0, sharpness_weight=lam).estimate(x, gen).generated_similarity
        gaps[lam] = float(sim[:, ~inside].mean() - sim[:, inside].mean())
    assert gaps[0.3] > gaps[0.0] + 0.1


def test_sharpness_weight_validation_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match="sharpness_weight"):
        PatchQualityEstimator.tiny(sharpness_weight=1.0)
    with pytest.raises(ValueError, match="sharpness_weight"):
        PatchQualityEstimator.tiny(sharpness_weight=-0.1)
    # without the channel the config (and the manifest map tags derived from it) stay as before
    assert "sharpness_weight" not in PatchQualityEstimator.tiny().config_dict()
    est = PatchQualityEstimator.tiny(sharpness_weight=0.25)
    est.save_pretrained(tmp_path / "e")
    assert json.loads((tmp_path / "e" / "quality_config.json").read_text())["sharpness_weight"] == 0.25
    back = PatchQualityEstimator.from_pretrained(tmp_path / "e")
    assert back.sharpness_weight == 0.25
    x = _texture(1, size=256)
    assert torch.allclose(back.features(x), est.features(x))
