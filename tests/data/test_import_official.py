"""Importer for the official PatchDPO layout: sample{i}/{prompt}_entity_0.png + {prompt}_gen_{k}.png."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchdpo_fast.config import DataConfig
from patchdpo_fast.data import Manifest, ManifestError, build_pair_dataset
from patchdpo_fast.data.import_official import import_official, main


def png(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def official(tmp_path: Path) -> Path:
    root = tmp_path / "official"
    png(root / "sample0" / "a dog on the beach_entity_0.png")
    for k in (1, 0, 2):
        png(root / "sample0" / f"a dog on the beach_gen_{k}.png", seed=k + 1)
    png(root / "sample10" / "a red car_entity_0.png")
    png(root / "sample10" / "a red car_gen_0.png")
    png(root / "sample2" / "a cat in the snow_entity_0.png")
    png(root / "sample2" / "a cat in the snow_gen_0.png")
    (root / "sample2" / "notes.txt").write_text("ignored")
    png(root / "sample3" / "a vase_gen_0.png")  # no reference
    png(root / "sample4" / "a boot_entity_0.png")  # no generated image
    png(root / "sample5" / "a mug_entity_0.png")
    (root / "sample5" / "a mug_gen_0.png").write_bytes(b"garbage")  # unreadable
    (root / "region_maps.pkl").write_bytes(b"never unpickled")
    return root


def test_import_in_place(official: Path, tmp_path: Path) -> None:
    manifest = import_official(official, tmp_path / "out")
    assert manifest.path == tmp_path / "out" / "manifest.jsonl"
    loaded = Manifest.load(manifest.path, check="full")
    assert [r.id for r in loaded.records] == ["sample0/a dog on the beach", "sample2/a cat in the snow",
                                              "sample10/a red car"]  # natural folder order  # fmt: skip
    rec = loaded.records[0]
    assert rec.subject == "sample0" and rec.prompt == "a dog on the beach"
    assert rec.reference == "../official/sample0/a dog on the beach_entity_0.png"
    assert [Path(g.image).name for g in rec.generated] == [f"a dog on the beach_gen_{k}.png" for k in range(3)]
    problems = {p.record_id: p.message for p in manifest.report.problems}
    assert set(problems) == {"sample3/a vase", "sample4/a boot", "sample5/a mug"}
    assert "no reference" in problems["sample3/a vase"] and "unreadable image" in problems["sample5/a mug"]

    # trains with uniform maps until quality maps are computed
    cfg = DataConfig(source="manifest", manifest_path=manifest.path, missing_maps="uniform")
    dataset = build_pair_dataset(cfg)
    assert len(dataset) == 5 and dataset[0]["prompt"] == "a dog on the beach"


def test_import_copy_and_errors(official: Path, tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        import_official(official, tmp_path / "strict.jsonl", on_bad_record="error")
    assert {p.record_id for p in info.value.problems} == {"sample3/a vase", "sample4/a boot", "sample5/a mug"}
    assert not (tmp_path / "strict.jsonl").exists()

    manifest = import_official(official, tmp_path / "copy" / "m.jsonl", copy=True, max_generated=1)
    assert manifest.records[0].generated[0].image == "images/sample0/a dog on the beach_gen_0.png"
    assert manifest.num_pairs == 3 and Manifest.load(manifest.path, check="full").report.ok
    assert (tmp_path / "copy" / "images" / "sample10" / "a red car_entity_0.png").is_file()


def test_cli(official: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(official), "--out", str(tmp_path / "m.jsonl")]) == 0
    captured = capsys.readouterr()
    assert "imported 3 records (5 pairs)" in captured.out and "skipped: record (id 'sample3/a vase')" in captured.err
    from patchdpo_fast.cli import main as cli

    assert cli(["import-official", str(official), "--out", str(tmp_path / "x.jsonl"), "--on-bad-record", "error"]) == 2
    assert cli(["import-official", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y.jsonl")]) == 2
    assert "nowhere" in capsys.readouterr().err
