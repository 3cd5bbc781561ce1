"""Tests of the validating loaders for on-disk pairs and of the manifest dataset's bad-record policy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file

from patchdpo_fast.config import DataConfig
from patchdpo_fast.data import OnDiskPairDataset, build_pair_dataset, load_image, load_quality_map, read_manifest


def save_png(path: Path, size: tuple[int, int] = (40, 32), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_load_image_ok_and_resized(tmp_path: Path) -> None:
    path = save_png(tmp_path / "a.png")
    raw = load_image(path)
    assert raw.shape == (3, 32, 40) and raw.dtype == torch.float32 and raw.min() >= 0 and raw.max() <= 1
    assert load_image(path, 64).shape == (3, 64, 64)


def test_load_image_missing_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_image(missing)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_load_image_corrupt_names_path(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "bad.png"
    if kind == "garbage":
        path.write_bytes(b"this is not an image" * 10)
    elif kind == "truncated":
        save_png(path, (64, 64))
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_image(path, 64)


def test_quality_map_formats(tmp_path: Path) -> None:
    q = np.random.default_rng(0).random((8, 8)).astype(np.float32)
    np.save(tmp_path / "q.npy", q)
    save_file({"quality": q}, str(tmp_path / "q.safetensors"))
    Image.fromarray((q * 255).round().astype(np.uint8)).save(tmp_path / "q.png")
    np.save(tmp_path / "q1.npy", q[None])
    assert torch.equal(load_quality_map(tmp_path / "q.npy", (8, 8)), torch.from_numpy(q))
    assert torch.equal(load_quality_map(tmp_path / "q.safetensors", (8, 8)), torch.from_numpy(q))
    assert torch.allclose(load_quality_map(tmp_path / "q.png", (8, 8)), torch.from_numpy(q), atol=1 / 255)
    assert load_quality_map(tmp_path / "q1.npy", (8, 8)).shape == (8, 8)


def test_quality_map_wrong_size_names_record_and_sizes(tmp_path: Path) -> None:
    np.save(tmp_path / "q.npy", np.ones((16, 16), np.float32))
    with pytest.raises(ValueError) as info:
        load_quality_map(tmp_path / "q.npy", (8, 8), record="dog-03")
    message = str(info.value)
    assert "dog-03" in message and "(8, 8)" in message and "(16, 16)" in message


def test_quality_map_bad_values_and_files(tmp_path: Path) -> None:
    np.save(tmp_path / "q.npy", np.full((8, 8), 1.5, np.float32))
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        load_quality_map(tmp_path / "q.npy", (8, 8), record="r")
    (tmp_path / "bad.npy").write_bytes(b"nonsense")
    with pytest.raises(ValueError, match=r"bad\.npy"):
        load_quality_map(tmp_path / "bad.npy", (8, 8), record="r")
    with pytest.raises(FileNotFoundError, match=r"gone\.npy"):
        load_quality_map(tmp_path / "gone.npy", (8, 8), record="r")


def make_manifest(tmp_path: Path, count: int, bad: dict[int, str] | None = None) -> Path:
    """A manifest of ``count`` pairs; ``bad`` maps a record number to the defect it gets."""
    bad = bad or {}
    lines = []
    for i in range(count):
        save_png(tmp_path / f"ref{i}.png", seed=2 * i)
        save_png(tmp_path / f"gen{i}.png", seed=2 * i + 1)
        size = 16 if bad.get(i) == "map_size" else 8
        np.save(tmp_path / f"qr{i}.npy", np.full((size, size), 0.25, np.float32))
        np.save(tmp_path / f"qg{i}.npy", np.full((8, 8), 0.75, np.float32))
        if bad.get(i) == "missing":
            (tmp_path / f"gen{i}.png").unlink()
        if bad.get(i) == "corrupt":
            (tmp_path / f"ref{i}.png").write_bytes(b"junk")
        entry = {"id": f"pair{i}", "ref": f"ref{i}.png", "gen": f"gen{i}.png", "prompt": f"a photo of thing {i}",
                 "q_ref": f"qr{i}.npy", "q_gen": f"qg{i}.npy"}  # fmt: skip
        lines.append(json.dumps(entry))
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_manifest_dataset_loads(tmp_path: Path) -> None:
    dataset = build_pair_dataset(
        DataConfig(source="manifest", manifest_path=make_manifest(tmp_path, 3), resolution=64, patch_size=8)
    )
    item = dataset[1]
    assert item["ref_pixels"].shape == (3, 64, 64) and item["q_ref"].shape == (8, 8)
    assert item["prompt"] == "a photo of thing 1" and item["index"] == 1
    assert float(item["q_gen"].mean()) == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("defect", "error", "text"),
    [
        ("missing", FileNotFoundError, "gen1.png"),
        ("corrupt", ValueError, "ref1.png"),
        ("map_size", ValueError, "pair1"),
    ],
)
def test_bad_record_policy(tmp_path: Path, defect: str, error: type, text: str) -> None:
    records = read_manifest(make_manifest(tmp_path, 3, {1: defect}))
    strict = OnDiskPairDataset(records, resolution=64, patch_size=8)
    with pytest.raises(error, match=re.escape(text)):
        strict[1]
    lenient = OnDiskPairDataset(records, resolution=64, patch_size=8, on_bad_record="skip", max_bad_records=1)
    assert lenient[1]["index"] == 2  # the next good record
    assert lenient[0]["index"] == 0 and lenient.bad_records == {1}
    capped = OnDiskPairDataset(records, resolution=64, patch_size=8, on_bad_record="skip", max_bad_records=0)
    with pytest.raises(RuntimeError, match="max_bad_records"):
        capped[1]


def test_malformed_manifest_names_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"ref": "a.png", "gen": "b.png", "prompt": "p", "q_ref": "x.npy", "q_gen": "y.npy"}\n{"ref": 1}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_manifest(path)
