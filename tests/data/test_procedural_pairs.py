"""Tests of the procedural pair set: determinism, shapes, and quality maps that mark the corrupted patches."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import default_collate

from patchdpo_fast.config import DataConfig
from patchdpo_fast.data import ProceduralPairDataset, ProceduralPairs, build_pair_dataset


def assert_pairs_equal(a, b) -> None:
    assert a.prompt == b.prompt and a.subject == b.subject and a.index == b.index
    for name in ("ref_pixels", "gen_pixels", "q_ref", "q_gen", "corrupted"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_deterministic_and_order_independent() -> None:
    first = ProceduralPairs(12, resolution=64, seed=3)
    second = ProceduralPairs(12, resolution=64, seed=3)
    forward = [first[i] for i in range(12)]
    backward = [second[i] for i in reversed(range(12))][::-1]
    for a, b in zip(forward, backward, strict=True):
        assert_pairs_equal(a, b)
    other = ProceduralPairs(12, resolution=64, seed=4)
    assert any(not torch.equal(other[i].gen_pixels, forward[i].gen_pixels) for i in range(12))
    assert len({p.prompt for p in forward}) > 6  # varied subjects and contexts


def test_shapes_ranges_and_prompt() -> None:
    pairs = ProceduralPairs(6, resolution=64, seed=0, patch_size=8)
    for i in range(len(pairs)):
        pair = pairs[i]
        assert pair.ref_pixels.shape == pair.gen_pixels.shape == (3, 64, 64)
        assert pair.ref_pixels.dtype == torch.float32
        for img in (pair.ref_pixels, pair.gen_pixels):
            assert img.min() >= 0.0 and img.max() <= 1.0
        assert pair.q_ref.shape == pair.q_gen.shape == pair.corrupted.shape == (8, 8)
        for q in (pair.q_ref, pair.q_gen):
            assert q.dtype == torch.float32 and q.min() >= 0.0 and q.max() <= 1.0
        s = pair.subject
        assert pair.prompt.startswith(("a photo of a ", "a photo of an "))
        assert s["shape"] in pair.prompt and s["color"] in pair.prompt
        assert not torch.equal(pair.ref_pixels, pair.gen_pixels)
    with pytest.raises(IndexError):
        pairs[6]


@pytest.mark.parametrize(("resolution", "patch_size"), [(64, 8), (128, 16), (96, 8)])
def test_corrupted_patches_have_low_quality(resolution: int, patch_size: int) -> None:
    pairs = ProceduralPairs(16, resolution=resolution, seed=1, patch_size=patch_size)
    for i in range(len(pairs)):
        pair = pairs[i]
        bad = pair.corrupted
        assert bad.any()
        assert (pair.q_gen[bad] < 0.2).all()
        assert (pair.q_gen[~bad] >= 0.85).all()
        # The reference cells whose content landed in corrupted cells were not reproduced.
        assert pair.q_ref.min() < 0.75
        assert (pair.q_ref > 0.99).float().mean() > 0.5  # most of the reference (incl. background) is fine


def test_dataset_items_and_collate() -> None:
    dataset = ProceduralPairDataset(5, resolution=64, seed=0)
    item = dataset[2]
    assert set(item) == {"ref_pixels", "gen_pixels", "prompt", "q_ref", "q_gen", "index"}
    assert item["index"] == 2
    batch = default_collate([dataset[i] for i in range(3)])
    assert batch["ref_pixels"].shape == (3, 3, 64, 64) and batch["q_gen"].shape == (3, 8, 8)
    assert isinstance(batch["prompt"], list) and batch["index"].tolist() == [0, 1, 2]


def test_build_from_config() -> None:
    cfg = DataConfig(resolution=128, patch_size=16, procedural={"num_pairs": 7, "seed": 2})
    dataset = build_pair_dataset(cfg)
    assert len(dataset) == 7 and dataset[0]["q_ref"].shape == (cfg.map_size, cfg.map_size) == (8, 8)
    assert dataset.fingerprint()["seed"] == 2
