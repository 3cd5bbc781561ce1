"""``patchdpo quality``: quality maps for a whole manifest (batches, resume, visualization, training from it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import patchdpo_fast.data.files as files_mod
from patchdpo_fast.data import Manifest, ManifestError, load_image, load_quality_map, write_procedural_manifest
from patchdpo_fast.quality import PatchQualityEstimator, compute_manifest_maps, resize_to_latent
from patchdpo_fast.quality.manifest_maps import HEADER_KEY, main

REPO = Path(__file__).resolve().parents[2]
NUM_PAIRS = 4


@pytest.fixture(scope="module")
def trained() -> PatchQualityEstimator:
    return PatchQualityEstimator.tiny_trained()


@pytest.fixture(scope="module")
def blank_pairs(tmp_path_factory) -> Path:
    """4 procedural pairs at 64 px (8 x 8 training grid) whose quality maps were removed."""
    root = tmp_path_factory.mktemp("pairs")
    manifest = Manifest.load(write_procedural_manifest(root, NUM_PAIRS, resolution=64, seed=1, patch_size=8))
    for pair in manifest.pairs():
        manifest.set_quality_maps(pair.record_id, pair.k, None, None)
    manifest.save()
    shutil.rmtree(root / "maps")
    return root


@pytest.fixture
def pairs_dir(blank_pairs, tmp_path) -> Path:
    """A fresh copy of the map-less manifest folder for one test."""
    return Path(shutil.copytree(blank_pairs, tmp_path / "pairs"))


def run(folder: Path, estimator, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("estimator_name", "tiny-trained")
    return compute_manifest_maps(folder / "manifest.jsonl", estimator, **kw)


def stored_maps(folder: Path) -> dict[tuple[str, int], tuple[str, str, torch.Tensor, torch.Tensor]]:
    manifest = Manifest.load(folder / "manifest.jsonl", check="full")
    out = {}
    for rec in manifest.records:
        for k, gen in enumerate(rec.generated):
            q_ref = load_quality_map(manifest.resolve(gen.q_ref), manifest.map_size)
            q_gen = load_quality_map(manifest.resolve(gen.q_gen), manifest.map_size)
            out[rec.id, k] = (gen.q_ref, gen.q_gen, q_ref, q_gen)
    return out


def test_maps_are_written_next_to_the_pairs_and_recorded(pairs_dir, trained):
    summary = run(pairs_dir, trained, batch_size=3)
    assert (summary.computed, summary.batches, summary.already_present, summary.remaining) == (4, 2, 0, 0)
    assert summary.complete and summary.map_size == (8, 8) and summary.estimator_grid == (16, 16)
    assert 0.0 <= summary.mean_q_gen <= 1.0 and 0.0 <= summary.mean_q_ref <= 1.0

    manifest = Manifest.load(pairs_dir / "manifest.jsonl", check="full")  # raises on any bad record
    assert manifest.map_size == (8, 8) and not manifest.pairs_missing_maps()
    record = manifest.header[HEADER_KEY]
    assert record["estimator"]["kind"] == "tiny-trained" and record["map_size"] == [8, 8]
    assert record["estimator"]["settings"]["calibration"]["low"] == pytest.approx(trained.calibration.low)
    maps = stored_maps(pairs_dir)
    assert maps["pair-00000", 0][:2] == ("maps/pair-00000/0.q_ref.safetensors", "maps/pair-00000/0.q_gen.safetensors")

    # the stored maps are the estimator's maps of the two images, area-averaged onto the 8 x 8 grid
    pair = manifest.pairs()[2]
    size = trained.image_size
    ref = torch.nn.functional.interpolate(load_image(pair.reference)[None], size=size, mode="bilinear", antialias=True)
    gen = torch.nn.functional.interpolate(load_image(pair.generated)[None], size=size, mode="bilinear", antialias=True)
    q_ref, q_gen = resize_to_latent(trained.estimate(ref.clamp(0, 1), gen.clamp(0, 1)), (8, 8))
    _, _, got_ref, got_gen = maps[pair.record_id, 0]
    torch.testing.assert_close(got_ref, q_ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got_gen, q_gen[0], atol=1e-5, rtol=0)


def test_second_run_does_nothing(pairs_dir, trained):
    run(pairs_dir, trained)
    manifest_file = pairs_dir / "manifest.jsonl"
    before = manifest_file.read_bytes(), manifest_file.stat().st_mtime_ns
    map_times = {p: p.stat().st_mtime_ns for p in (pairs_dir / "maps").rglob("*.safetensors")}
    again = run(pairs_dir, trained)
    assert (again.computed, again.already_present, again.batches, again.remaining) == (0, 4, 0, 0)
    assert (manifest_file.read_bytes(), manifest_file.stat().st_mtime_ns) == before
    assert {p: p.stat().st_mtime_ns for p in (pairs_dir / "maps").rglob("*.safetensors")} == map_times


def test_interrupted_run_ends_with_the_same_maps(blank_pairs, tmp_path, trained, monkeypatch):
    straight = Path(shutil.copytree(blank_pairs, tmp_path / "straight"))
    run(straight, trained, batch_size=4)

    resumed = Path(shutil.copytree(blank_pairs, tmp_path / "resumed"))
    first = run(resumed, trained, limit=1)
    assert (first.computed, first.remaining, first.complete) == (1, 3, False)

    # "killed" while writing the second pair of the next run: its q_ref file exists, its q_gen does not
    real_write, calls = files_mod.write_quality_map, []

    def dying_write(path, values, **kwargs):
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_write(path, values, **kwargs)

    monkeypatch.setattr(files_mod, "write_quality_map", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run(resumed, trained, batch_size=1)
    monkeypatch.undo()
    manifest = Manifest.load(resumed / "manifest.jsonl", check="full")  # still valid after the crash
    assert len(manifest.pairs_missing_maps()) == 2
    assert (resumed / "maps" / "pair-00002" / "0.q_ref.safetensors").is_file()  # orphan of the killed batch

    last = run(resumed, trained, batch_size=3)
    assert (last.computed, last.already_present, last.remaining) == (2, 2, 0)
    want, got = stored_maps(straight), stored_maps(resumed)
    assert want.keys() == got.keys()
    for key, (ref_path, gen_path, q_ref, q_gen) in want.items():
        assert got[key][:2] == (ref_path, gen_path)
        # other batch compositions: equal up to float rounding of batched matmuls
        torch.testing.assert_close(got[key][2], q_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(got[key][3], q_gen, atol=1e-5, rtol=0)
    assert json.loads((resumed / "manifest.jsonl").read_text().splitlines()[0]) == json.loads(
        (straight / "manifest.jsonl").read_text().splitlines()[0]
    )


def test_visualize_writes_one_panel_per_pair(pairs_dir, trained, tmp_path):
    summary = run(pairs_dir, trained, visualize=tmp_path / "panels", limit=3)
    assert len(summary.panels) == 3
    # the next run computes the last pair and draws it; a new folder also gets the earlier pairs from stored maps
    assert len(run(pairs_dir, trained, visualize=tmp_path / "panels").panels) == 1
    redrawn = run(pairs_dir, trained, visualize=tmp_path / "again", panel_size=128)
    assert redrawn.computed == 0 and len(redrawn.panels) == NUM_PAIRS
    names = sorted(p.name for p in (tmp_path / "panels").glob("*.png"))
    assert names == [f"pair-{i:05d}_0.png" for i in range(NUM_PAIRS)]
    with Image.open(tmp_path / "panels" / names[0]) as img:
        assert img.format == "PNG" and img.mode == "RGB" and img.width == 4 * 256 + 3 * 4 and img.height > 256
    with Image.open(tmp_path / "again" / names[0]) as img:
        assert img.width == 4 * 128 + 3 * 4


def test_map_size_estimator_change_and_overwrite(pairs_dir, trained, tmp_path):
    coarse = run(pairs_dir, trained, map_size=4)
    assert coarse.map_size == (4, 4) and Manifest.load(pairs_dir / "manifest.jsonl").map_size == (4, 4)
    # another target size: the 4 x 4 maps are recomputed on the 16 x 16 estimator grid (bilinear to 16 is identity)
    fine = run(pairs_dir, trained, map_size=(16, 16))
    assert (fine.invalid, fine.computed) == (4, 4)
    assert next(iter(stored_maps(pairs_dir).values()))[2].shape == (16, 16)
    # maps of another estimator are not mixed in: they are recomputed by the new one
    redone = run(pairs_dir, "tiny", estimator_name=None)
    assert (redone.other_estimator, redone.computed, redone.already_present) == (4, 4, 0)
    assert redone.estimator == "tiny(seed=0)" and redone.map_size == (16, 16)
    # a deleted map file is recomputed
    (pairs_dir / "maps" / "pair-00001" / "0.q_gen.safetensors").unlink()
    again = run(pairs_dir, "tiny", estimator_name=None)
    assert (again.invalid, again.computed, again.already_present) == (1, 1, 3)


def test_estimator_folder_and_bad_records(pairs_dir, trained, tmp_path):
    folder = trained.save_pretrained(tmp_path / "estimator")
    summary = run(pairs_dir, str(folder), estimator_name=None, limit=1)
    assert summary.estimator == "folder" and summary.computed == 1
    # the same settings and weights loaded from elsewhere are the same estimator: its map is kept
    assert (run(pairs_dir, trained, limit=1).already_present, run(pairs_dir, trained, limit=0).computed) == (1, 0)
    assert run(pairs_dir, str(folder), estimator_name=None).computed == 2
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(pairs_dir, str(tmp_path / "missing"), estimator_name=None)
    (pairs_dir / "generated" / "00003.png").write_bytes(b"not a png")
    with pytest.raises(ManifestError, match=r"line 5 \(id 'pair-00003'\): unreadable image"):
        run(pairs_dir, trained, overwrite=True)


def test_command_line(pairs_dir, tmp_path, capsys):
    manifest = str(pairs_dir / "manifest.jsonl")
    from patchdpo_fast.cli import main as cli

    assert cli(["quality", "--manifest", str(tmp_path / "nope.jsonl")]) == 2
    assert "manifest not found" in capsys.readouterr().err
    assert cli(["quality", "--manifest", manifest, "--estimator", str(tmp_path / "nope")]) == 2
    assert "quality estimator folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--manifest", manifest, "--map-size", "0"])
    summary_file = tmp_path / "summary.json"
    argv = ["--manifest", manifest, "--estimator", "trained", "--batch-size", "2", "--no-progress", "--device", "cpu"]
    assert main([*argv, "--limit", "3", "--json", str(summary_file), "--visualize", str(tmp_path / "panels")]) == 0
    assert "3 computed" in capsys.readouterr().out
    summary = json.loads(summary_file.read_text())
    assert summary["computed"] == 3 and summary["remaining"] == 1 and not summary["complete"]
    assert len(summary["panels"]) == 3 and summary["map_size"] == [8, 8]
    assert main(argv) == 0
    assert "1 computed" in capsys.readouterr().out and not Manifest.load(manifest).pairs_missing_maps()


def test_the_manifest_trains(pairs_dir, trained, tmp_path):
    from patchdpo_fast.config import load_config
    from patchdpo_fast.train import train

    run(pairs_dir, trained)
    cfg = load_config(
        REPO / "configs" / "tiny_cpu.yaml",
        [
            "data.source=manifest",
            f"data.manifest_path={pairs_dir / 'manifest.jsonl'}",
            "data.missing_maps=error",
            "data.on_bad_record=error",
            "train.max_steps=2",
            "train.log_every=1",
            "train.checkpoint_every=2",
            f"train.output_dir={tmp_path / 'run'}",
            f"cache.dir={tmp_path / 'cache'}",
        ],
    )
    result = train(cfg)
    assert result.final_step == 2 and result.nan_skips == 0 and result.adapter_path.is_file()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)


def test_maps_of_another_estimator_or_unknown_origin_are_recomputed(pairs_dir, trained, tmp_path):
    """An ``--overwrite`` run killed before it cleared anything, then rerun without it: the old maps must not stay.

    Maps record the estimator that made them (settings and weights): the procedural ground-truth maps (unknown
    origin) and the maps of an estimator with the same settings but other weights are recomputed.
    """
    procedural = Manifest.load(write_procedural_manifest(tmp_path / "proc", NUM_PAIRS, resolution=64, seed=1))
    assert not procedural.pairs_missing_maps()
    summary = run(procedural.path.parent, trained)  # e.g. `quality --overwrite` killed while loading, then rerun
    assert (summary.computed, summary.already_present) == (NUM_PAIRS, 0)
    assert summary.other_estimator == NUM_PAIRS
    from patchdpo_fast.quality.manifest_maps import map_estimator_tag

    tag = Manifest.load(procedural.path).header[HEADER_KEY]["estimator"]["tag"]
    for pair in Manifest.load(procedural.path).pairs():
        assert map_estimator_tag(pair.q_ref) == map_estimator_tag(pair.q_gen) == tag

    run(pairs_dir, trained)
    retrained = PatchQualityEstimator.tiny_trained()  # same settings, other weights (e.g. trained further)
    with torch.no_grad():
        next(retrained.backbone.parameters()).add_(1e-3)
    again = run(pairs_dir, retrained)
    assert (again.other_estimator, again.computed, again.already_present) == (NUM_PAIRS, NUM_PAIRS, 0)
    header = Manifest.load(pairs_dir / "manifest.jsonl").header[HEADER_KEY]["estimator"]
    assert header["tag"] != tag and len(header["weights_sha256"]) == 64
    assert run(pairs_dir, retrained).already_present == NUM_PAIRS
