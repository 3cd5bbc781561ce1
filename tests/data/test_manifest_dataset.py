"""Training from a manifest: the procedural set as a manifest, item dicts, missing maps, map sizes, fingerprints."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from patchdpo_fast.config import DataConfig
from patchdpo_fast.data import (
    GeneratedImage,
    Manifest,
    ManifestError,
    ManifestPairDataset,
    ManifestRecord,
    ProceduralPairDataset,
    adapt_quality_map,
    build_pair_dataset,
    write_procedural_manifest,
    write_quality_map,
)
from patchdpo_fast.data.procedural import main as procedural_main


@pytest.fixture(scope="module")
def procedural_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("procedural")
    write_procedural_manifest(out, num_pairs=4, resolution=64, seed=3, patch_size=8)
    return out


def manifest_cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(source="manifest", manifest_path=path, resolution=64, patch_size=8, **kw)


def test_procedural_manifest_matches_in_memory_pairs(procedural_dir: Path) -> None:
    manifest = Manifest.load(procedural_dir / "manifest.jsonl", check="full")
    assert len(manifest) == 4 and manifest.map_size == (8, 8) and manifest.header["source"]["seed"] == 3
    dataset = build_pair_dataset(manifest_cfg(procedural_dir / "manifest.jsonl"))
    reference = ProceduralPairDataset(4, resolution=64, seed=3, patch_size=8)
    assert isinstance(dataset, ManifestPairDataset) and len(dataset) == 4
    for i in range(4):
        got, want = dataset[i], reference[i]
        assert set(got) == {"ref_pixels", "gen_pixels", "prompt", "q_ref", "q_gen", "index"}
        assert got["index"] == i and got["prompt"] == want["prompt"]
        for key in ("ref_pixels", "gen_pixels"):
            assert got[key].shape == (3, 64, 64) and got[key].dtype == torch.float32
            torch.testing.assert_close(got[key], want[key], atol=0.5 / 255 + 1e-6, rtol=0)  # 8-bit PNG
        for key in ("q_ref", "q_gen"):
            assert got[key].dtype == torch.float32 and torch.equal(got[key], want[key])
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    assert batch["q_gen"].shape == (2, 8, 8) and batch["prompt"] == [dataset[0]["prompt"], dataset[1]["prompt"]]


def test_procedural_cli_is_reproducible(procedural_dir: Path, tmp_path: Path) -> None:
    assert procedural_main(["--out", str(tmp_path), "--num-pairs", "4", "--seed", "3"]) == 0
    for name in ("manifest.jsonl", "generated/00002.png", "maps/00003.q_ref.safetensors"):
        assert (tmp_path / name).read_bytes() == (procedural_dir / name).read_bytes(), name


def test_fingerprint_follows_files_and_content(procedural_dir: Path, tmp_path: Path) -> None:
    write_procedural_manifest(tmp_path, num_pairs=2, resolution=64, seed=0)
    cfg = manifest_cfg(tmp_path / "manifest.jsonl")
    first = build_pair_dataset(cfg).fingerprint()
    assert build_pair_dataset(cfg).fingerprint() == first
    # a rewritten quality map (same size, new content and mtime) changes the fingerprint
    q = tmp_path / "maps" / "00001.q_gen.safetensors"
    write_quality_map(q, np.zeros((8, 8), np.float32))
    stat = q.stat()
    os.utime(q, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = build_pair_dataset(cfg).fingerprint()
    assert second["files_sha256"] != first["files_sha256"] and second["content_sha256"] == first["content_sha256"]
    # so does the manifest's content
    manifest = Manifest.load(tmp_path / "manifest.jsonl")
    manifest.records[0].prompt = "a different prompt"
    manifest.save()
    assert build_pair_dataset(cfg).fingerprint()["content_sha256"] != first["content_sha256"]
    # and the loader settings
    assert build_pair_dataset(cfg.model_copy(update={"resolution": 128})).fingerprint() != second


def _maps_free_manifest(tmp_path: Path, procedural_dir: Path) -> Path:
    manifest = Manifest.load(procedural_dir / "manifest.jsonl")
    for rec in manifest.records[1:3]:
        rec.generated[0].q_ref = rec.generated[0].q_gen = None
    return manifest.save(tmp_path / "m.jsonl")


def test_missing_maps_error_or_uniform(procedural_dir: Path, tmp_path: Path) -> None:
    path = _maps_free_manifest(tmp_path, procedural_dir)
    with pytest.raises(ValueError, match=r"2 of 4 pairs have no quality maps: 'pair-00001'\[0\] \(line 3\)") as info:
        build_pair_dataset(manifest_cfg(path))
    assert "data.missing_maps=uniform" in str(info.value) and "patchdpo quality" in str(info.value)
    filled = build_pair_dataset(manifest_cfg(path, missing_maps="uniform", uniform_quality=0.25))
    assert torch.equal(filled[1]["q_ref"], torch.full((8, 8), 0.25)) and torch.equal(
        filled[2]["q_gen"], filled[1]["q_ref"]
    )
    assert not torch.equal(filled[0]["q_gen"], torch.full((8, 8), 0.25))  # recorded maps are used
    # a loss that ignores the maps accepts the pairs whatever missing_maps says
    assert len(build_pair_dataset(manifest_cfg(path), needs_quality=False)) == 4


def test_map_size_adaptation() -> None:
    fine = torch.arange(16.0).reshape(4, 4) / 16
    pooled = adapt_quality_map(fine, (2, 2))
    torch.testing.assert_close(pooled, torch.tensor([[2.5, 4.5], [10.5, 12.5]]) / 16)
    coarse = adapt_quality_map(torch.tensor([[0.0, 1.0]]), (2, 4))
    assert torch.equal(coarse, torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="integer multiples"):
        adapt_quality_map(torch.zeros(5, 5), (8, 8), "rec")


def test_manifest_maps_on_another_grid(procedural_dir: Path, tmp_path: Path) -> None:
    """Maps stored at 16x16 train on the 8x8 grid (area pooling); a 5x5 manifest is refused at construction."""
    rec = Manifest.load(procedural_dir / "manifest.jsonl").records[0]
    for side, value in (("q_ref", 0.2), ("q_gen", 0.6)):
        write_quality_map(tmp_path / f"{side}.safetensors", np.full((16, 16), value, np.float32))
    gen = GeneratedImage(image=str(procedural_dir / rec.generated[0].image), q_ref="q_ref.safetensors",
                         q_gen="q_gen.safetensors")  # fmt: skip
    path = Manifest(tmp_path / "m.jsonl", [ManifestRecord("r", "s", "p", str(procedural_dir / rec.reference), [gen])],
                    {"map_size": [16, 16]}).save()  # fmt: skip
    item = build_pair_dataset(manifest_cfg(path))[0]
    assert item["q_ref"].shape == (8, 8) and torch.allclose(item["q_gen"], torch.full((8, 8), 0.6))
    for side in ("q_ref", "q_gen"):
        write_quality_map(tmp_path / f"{side}.safetensors", np.full((5, 5), 0.5, np.float32))
    manifest = Manifest.load(path, check="none")
    manifest.map_size = (5, 5)
    with pytest.raises(ValueError, match="integer multiples"):
        ManifestPairDataset(manifest, resolution=64)


def test_bad_records_at_load_and_at_read(procedural_dir: Path, tmp_path: Path) -> None:
    manifest = Manifest.load(procedural_dir / "manifest.jsonl")
    manifest.records[1].generated[0].image = "generated/missing.png"
    path = manifest.save(tmp_path / "edited" / "with_missing.jsonl")
    with pytest.raises(ManifestError, match=r"line 3 \(id 'pair-00001'\): missing file"):
        build_pair_dataset(manifest_cfg(path))
    skipping = build_pair_dataset(manifest_cfg(path, on_bad_record="skip", max_bad_records=1))
    assert len(skipping) == 3 and [p.record_id for p in skipping.pairs] == ["pair-00000", "pair-00002", "pair-00003"]
    with pytest.raises(ManifestError, match="max_bad_records=0"):
        build_pair_dataset(manifest_cfg(path, on_bad_record="skip", max_bad_records=0))

    # a truncated image passes the quick check; reading it fails, or is skipped
    write_procedural_manifest(tmp_path, num_pairs=3, resolution=64, seed=1)
    png = tmp_path / "references" / "00001.png"
    png.write_bytes(png.read_bytes()[:200])
    strict = build_pair_dataset(manifest_cfg(tmp_path / "manifest.jsonl"))
    with pytest.raises(ValueError, match=r"00001\.png"):
        strict[1]
    lenient = build_pair_dataset(manifest_cfg(tmp_path / "manifest.jsonl", on_bad_record="skip"))
    assert lenient[1]["index"] == 2 and lenient.bad_records == {1}
    with pytest.raises(ManifestError, match="unreadable image"):
        build_pair_dataset(manifest_cfg(tmp_path / "manifest.jsonl", validate_files="full"))


def _with_truncated(tmp_path: Path, name: str, bad: tuple[int, ...], num_pairs: int = 4) -> Path:
    """A procedural manifest whose reference images ``bad`` are truncated (they pass the quick check, fail to load)."""
    out = tmp_path / name
    write_procedural_manifest(out, num_pairs=num_pairs, resolution=64, seed=1)
    for i in bad:
        png = out / "references" / f"{i:05d}.png"
        png.write_bytes(png.read_bytes()[:200])
    return out / "manifest.jsonl"


def test_max_bad_records_counts_across_dataloader_workers(tmp_path: Path) -> None:
    """Two workers each meet one bad record: with max_bad_records=1 that is one too many for the process."""
    path = _with_truncated(tmp_path, "pairs", bad=(1, 3))
    dataset = build_pair_dataset(manifest_cfg(path, on_bad_record="skip", max_bad_records=1))
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, sampler=[1, 3, 0, 2], num_workers=2)
    with pytest.raises(RuntimeError, match=r"max_bad_records=1 bad pairs \(2 met"):
        list(loader)
    assert dataset.bad_records == {1, 3}  # what the workers met is visible to the main process

    # within the limit: every batch arrives, each bad record replaced by the next good pair
    dataset = build_pair_dataset(manifest_cfg(path, on_bad_record="skip", max_bad_records=2))
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, sampler=[1, 3, 0, 2], num_workers=2)
    assert [int(b["index"]) for b in loader] == [2, 0, 0, 2]
    # a copy (not a worker) keeps a private snapshot
    import copy

    clone = copy.deepcopy(dataset)
    assert clone.bad_records == {1, 3}


def test_a_pair_met_bad_elsewhere_still_counts_against_the_limit(tmp_path: Path) -> None:
    """A worker may cross max_bad_records in a prefetched batch the run never consumes; a worker that later skips
    an already-known bad pair for a consumed batch must raise too instead of standing in for it silently."""
    path = _with_truncated(tmp_path, "pairs", bad=(1, 3))
    dataset = build_pair_dataset(manifest_cfg(path, on_bad_record="skip", max_bad_records=1))
    dataset._bad.add(1)
    dataset._bad.add(3)  # what the other workers met (the shared log)
    assert dataset[0]["index"] == 0  # a good pair still loads
    with pytest.raises(RuntimeError, match=r"max_bad_records=1 bad pairs \(2 met"):
        dataset[1]
    within = build_pair_dataset(manifest_cfg(path, on_bad_record="skip", max_bad_records=2))
    within._bad.add(1)
    within._bad.add(3)
    assert within[1]["index"] == 2 and within[3]["index"] == 0


def test_a_cache_built_while_skipping_is_refused_under_on_bad_record_error(tmp_path: Path) -> None:
    from patchdpo_fast.data import CacheError, build_input_cache

    path = _with_truncated(tmp_path, "pairs", bad=(2,))
    encoders = {
        "encode_images": lambda p: torch.nn.functional.avg_pool2d(p, 8).repeat(1, 2, 1, 1)[:, :4],
        "encode_prompts": lambda prompts: (torch.ones(len(prompts), 2, 3), None),
        "encode_reference": lambda p: p.mean(dim=(2, 3))[:, None, :],
    }
    opts = {"shard_size": 2, "progress": False, "dtype": torch.float32, **encoders}
    skipping = build_pair_dataset(manifest_cfg(path, on_bad_record="skip"))
    index = build_input_cache(skipping, tmp_path / "cache", **opts)
    assert [e["index"] for e in index["bad_records"]] == [2]
    assert "pair-00002" in index["bad_records"][0]["record"]
    build_input_cache(build_pair_dataset(manifest_cfg(path, on_bad_record="skip")), tmp_path / "cache", **opts)

    strict = build_pair_dataset(manifest_cfg(path))  # on_bad_record=error: the bad pair must not vanish silently
    with pytest.raises(CacheError, match=r"on_bad_record=skip .* 1 bad record\(s\): pair pair-00002"):
        build_input_cache(strict, tmp_path / "cache", **opts)
    with pytest.raises(CacheError, match="max_bad_records=0"):
        build_input_cache(build_pair_dataset(manifest_cfg(path, on_bad_record="skip", max_bad_records=0)),
                          tmp_path / "cache", **opts)  # fmt: skip
