"""Tests of the input cache: build and read back, resume, corruption and staleness detection."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from patchdpo_fast.data import (
    CachedPairDataset,
    CacheError,
    ProceduralPairDataset,
    build_input_cache,
    cache_fingerprint,
    verify_input_cache,
)


def encode_images(pixels: torch.Tensor) -> torch.Tensor:
    """Stand-in VAE: 4 channels at 1/8 resolution."""
    pooled = F.avg_pool2d(pixels, 8)
    return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1) * 2 - 1


def encode_prompts(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-in text encoders: (N, 4, 6) embeddings and (N, 6) pooled, a function of the characters."""
    codes = torch.zeros(len(prompts), 24)
    for row, prompt in enumerate(prompts):
        for col, char in enumerate(prompt[:24]):
            codes[row, col] = ord(char) / 128
    return codes.view(-1, 4, 6), codes.view(-1, 4, 6).sum(1)


def encode_reference(pixels: torch.Tensor) -> torch.Tensor:
    """Stand-in CLIP image encoder: (N, 5, 3) features."""
    return F.adaptive_avg_pool2d(pixels, (1, 5)).flatten(2).transpose(1, 2)


ENCODERS = {"encode_images": encode_images, "encode_prompts": encode_prompts, "encode_reference": encode_reference}


class Recording(ProceduralPairDataset):
    """A procedural dataset that records which items were read."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reads: list[int] = []

    def __getitem__(self, index: int) -> dict:
        self.reads.append(index)
        return super().__getitem__(index)


def build(dataset, cache_dir: Path, **kwargs) -> dict:
    options = {"shard_size": 4, "batch_size": 3, "dtype": torch.float32, "progress": False, **kwargs}
    return build_input_cache(dataset, cache_dir, **{**ENCODERS, **options})


def expected_item(dataset, index: int) -> dict:
    item = dataset[index]
    embeds, pooled = encode_prompts([item["prompt"]])
    latents = encode_images(torch.stack([item["ref_pixels"], item["gen_pixels"]]))
    return {
        "latents_ref": latents[0],
        "latents_gen": latents[1],
        "prompt_embeds": embeds[0],
        "pooled": pooled[0],
        "image_features": encode_reference(item["ref_pixels"][None])[0],
        "q_ref": item["q_ref"],
        "q_gen": item["q_gen"],
        "index": index,
        "prompt": item["prompt"],
    }


def test_build_and_read_back(tmp_path: Path) -> None:
    dataset = ProceduralPairDataset(10, resolution=64, seed=0)
    index = build(dataset, tmp_path / "cache", settings={"vae": "dummy"})
    assert index["complete"] and [(s["start"], s["stop"]) for s in index["shards"]] == [(0, 4), (4, 8), (8, 10)]
    assert all(len(s["sha256"]) == 64 for s in index["shards"])
    cached = CachedPairDataset(tmp_path / "cache", expected_fingerprint=index["fingerprint"], max_open_shards=1)
    assert len(cached) == 10
    for i in [9, 0, 5, 4, 1, 8]:  # out of order, through a 1-shard LRU
        got, want = cached[i], expected_item(dataset, i)
        assert set(got) == set(want)
        for key, value in want.items():
            if isinstance(value, torch.Tensor):
                assert got[key].shape == value.shape and torch.allclose(got[key], value, atol=1e-6), key
            else:
                assert got[key] == value, key
    null = cached.null_conditioning()
    assert null["prompt_embeds"].shape == (1, 4, 6) and null["image_features"].shape == (1, 5, 3)
    assert torch.equal(null["image_features"], torch.zeros(1, 5, 3))
    assert verify_input_cache(tmp_path / "cache") == []
    # Open handles are dropped when the dataset is sent to a DataLoader worker.
    clone = pickle.loads(pickle.dumps(cached))
    assert torch.equal(clone[3]["latents_gen"], cached[3]["latents_gen"])


def test_half_precision_storage(tmp_path: Path) -> None:
    dataset = ProceduralPairDataset(5, resolution=64, seed=1)
    build(dataset, tmp_path, dtype="float16")
    item = CachedPairDataset(tmp_path)[2]
    assert item["latents_ref"].dtype == torch.float16 and item["q_gen"].dtype == torch.float32
    assert torch.allclose(item["latents_ref"].float(), expected_item(dataset, 2)["latents_ref"], atol=1e-2)


def test_resume_after_interruption_skips_finished_shards(tmp_path: Path) -> None:
    calls = {"n": 0}

    def failing_reference(pixels: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 5:  # the null call, then batches [0,3), [3,4), [4,7), then fail on [7,8)
            raise KeyboardInterrupt("simulated interruption")
        return encode_reference(pixels)

    dataset = Recording(10, resolution=64, seed=0)
    with pytest.raises(KeyboardInterrupt):
        build(dataset, tmp_path, encode_reference=failing_reference)
    with pytest.raises(CacheError, match="incomplete"):
        CachedPairDataset(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir() if p.name != ".build.lock")  # the builders' lock file stays
    assert files == ["index.json", "null.safetensors", "shard_00000.safetensors"]

    resumed = Recording(10, resolution=64, seed=0)
    build(resumed, tmp_path)
    assert resumed.reads == list(range(4, 10))  # shard 0 was not recomputed
    cached = CachedPairDataset(tmp_path)
    assert [cached[i]["index"] for i in range(10)] == list(range(10))

    again = Recording(10, resolution=64, seed=0)
    build(again, tmp_path)
    assert again.reads == []  # complete: nothing to do


def test_corrupted_shard_detected_and_rebuilt(tmp_path: Path) -> None:
    dataset = ProceduralPairDataset(10, resolution=64, seed=0)
    build(dataset, tmp_path)
    shard = tmp_path / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(data))

    problems = verify_input_cache(tmp_path)
    assert len(problems) == 1 and "shard_00001" in problems[0] and "checksum" in problems[0]
    cached = CachedPairDataset(tmp_path)
    assert cached[0]["index"] == 0  # other shards still readable
    with pytest.raises(CacheError, match=r"shard_00001\.safetensors checksum mismatch"):
        cached[5]

    recording = Recording(10, resolution=64, seed=0)
    build(recording, tmp_path)
    assert recording.reads == [4, 5, 6, 7]
    assert verify_input_cache(tmp_path) == []
    assert CachedPairDataset(tmp_path)[5]["index"] == 5

    shard.unlink()
    assert "missing" in verify_input_cache(tmp_path)[0]
    with pytest.raises(CacheError, match="missing"):
        CachedPairDataset(tmp_path)[5]


def test_stale_fingerprint_detected(tmp_path: Path) -> None:
    dataset = ProceduralPairDataset(6, resolution=64, seed=0)
    old = build(dataset, tmp_path, settings={"vae": "a"})["fingerprint"]

    with pytest.raises(CacheError, match="other data or encoder settings"):
        build(dataset, tmp_path, settings={"vae": "b"})
    with pytest.raises(CacheError, match="other data or encoder settings"):
        build(ProceduralPairDataset(6, resolution=64, seed=1), tmp_path, settings={"vae": "a"})

    new_fp, _ = cache_fingerprint(dataset, {"vae": "b"}, shard_size=4, dtype=torch.float32)
    assert new_fp != old
    with pytest.raises(CacheError, match="stale"):
        CachedPairDataset(tmp_path, expected_fingerprint=new_fp)

    recording = Recording(6, resolution=64, seed=0)
    rebuilt = build(recording, tmp_path, settings={"vae": "b"}, on_stale="rebuild")
    assert rebuilt["fingerprint"] == new_fp and recording.reads[-6:] == list(range(6))
    assert CachedPairDataset(tmp_path, expected_fingerprint=new_fp).fingerprint == new_fp


def test_wrong_encoder_output_and_missing_cache(tmp_path: Path) -> None:
    dataset = ProceduralPairDataset(4, resolution=64, seed=0)
    with pytest.raises(CacheError, match="encode_images returned shape"):
        build(dataset, tmp_path / "a", encode_images=lambda pixels: encode_images(pixels)[:1])
    with pytest.raises(CacheError, match=r"index\.json missing"):
        CachedPairDataset(tmp_path / "nothing")
