"""Tests of ResumableSampler: resumed order equals uninterrupted order; rank shards are disjoint and cover."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from patchdpo_fast.data import ResumableSampler


def draw(sampler: ResumableSampler, count: int) -> list[int]:
    """Take ``count`` indices, crossing epochs like a training loop would."""
    out: list[int] = []
    while len(out) < count:
        for index in sampler:
            out.append(index)
            if len(out) == count:
                break
    return out


@pytest.mark.parametrize("cut", [0, 1, 7, 10, 11, 23])
def test_resume_equals_uninterrupted(cut: int) -> None:
    total = 37
    reference = draw(ResumableSampler(10, seed=5, rank=1, world_size=2), total)
    first = ResumableSampler(10, seed=5, rank=1, world_size=2)
    head = draw(first, cut)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = ResumableSampler(10, seed=5, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert head + draw(resumed, total - cut) == reference


def test_epochs_are_shuffled_and_seeded() -> None:
    sampler = ResumableSampler(50, seed=0)
    epoch0, epoch1 = sampler.epoch_indices(0), sampler.epoch_indices(1)
    assert sorted(epoch0) == sorted(epoch1) == list(range(50)) and epoch0 != epoch1
    assert ResumableSampler(50, seed=0).epoch_indices(0) == epoch0
    assert ResumableSampler(50, seed=1).epoch_indices(0) != epoch0
    assert ResumableSampler(5, shuffle=False).epoch_indices(3) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(("num_items", "world_size"), [(20, 4), (22, 4), (7, 3), (5, 1)])
def test_rank_shards_disjoint_and_cover(num_items: int, world_size: int) -> None:
    for epoch in range(3):
        shards = [ResumableSampler(num_items, 9, r, world_size, drop_last=True).epoch_indices(epoch)
                  for r in range(world_size)]  # fmt: skip
        flat = list(itertools.chain(*shards))
        assert len({len(s) for s in shards}) == 1
        assert len(flat) == len(set(flat)) == num_items - num_items % world_size
        padded = [ResumableSampler(num_items, 9, r, world_size, drop_last=False).epoch_indices(epoch)
                  for r in range(world_size)]  # fmt: skip
        assert len({len(s) for s in padded}) == 1
        assert set(itertools.chain(*padded)) == set(range(num_items))
        if num_items % world_size == 0:
            assert sorted(itertools.chain(*padded)) == list(range(num_items))


def test_dataloader_resume_with_consumed_count() -> None:
    data = TensorDataset(torch.arange(12))

    def batches(sampler: ResumableSampler, count: int) -> list[list[int]]:
        loader = DataLoader(data, batch_size=3, sampler=sampler, drop_last=True)
        out: list[list[int]] = []
        while len(out) < count:
            for (batch,) in loader:
                out.append(batch.tolist())
                if len(out) == count:
                    break
        return out

    reference = batches(ResumableSampler(12, seed=2), 10)
    first = ResumableSampler(12, seed=2)
    head = batches(first, 5)
    state = first.state_dict(consumed=5 * 3)  # what the training loop trained on
    assert state == {**first.state_dict(), "epoch": 1, "position": 3}
    resumed = ResumableSampler(12, seed=2)
    resumed.load_state_dict(state)
    assert head + batches(resumed, 5) == reference


def test_state_checks() -> None:
    sampler = ResumableSampler(10, seed=1, world_size=2)
    state = sampler.state_dict()
    with pytest.raises(ValueError, match="world_size"):
        ResumableSampler(10, seed=1, world_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(10, seed=2, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError):
        ResumableSampler(10, rank=2, world_size=2)
    # A finished epoch is reported as the start of the next one.
    draw(sampler, 5)
    assert sampler.state_dict()["epoch"] == 1 and sampler.state_dict()["position"] == 0
