"""The versioned manifest: round trip, every broken record reported with its line, skip vs fail, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchdpo_fast.data import (
    GeneratedImage,
    Manifest,
    ManifestError,
    ManifestRecord,
    is_manifest_file,
    merge_manifests,
    write_quality_map,
)


def save_png(path: Path, size: int = 16, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def make_group(root: Path, name: str, k: int = 2, maps: bool = True, map_size: int = 8) -> ManifestRecord:
    """Files for one record under ``root`` and the record pointing at them."""
    save_png(root / "refs" / f"{name}.png", seed=hash(name) % 1000)
    generated = []
    for i in range(k):
        save_png(root / "gen" / f"{name}_{i}.png", seed=i)
        entry = GeneratedImage(image=f"gen/{name}_{i}.png", seed=100 + i)
        if maps:
            q = np.full((map_size, map_size), 0.25 * (i + 1), np.float32)
            write_quality_map(root / "maps" / f"{name}_{i}.q_ref.safetensors", q)
            write_quality_map(root / "maps" / f"{name}_{i}.q_gen.safetensors", 1 - q)
            entry.q_ref = f"maps/{name}_{i}.q_ref.safetensors"
            entry.q_gen = f"maps/{name}_{i}.q_gen.safetensors"
        generated.append(entry)
    return ManifestRecord(
        id=f"subj/{name}", subject="subj", prompt=f"a photo of {name}", reference=f"refs/{name}.png",
        generated=generated, meta={"note": name},
    )  # fmt: skip


def test_round_trip_and_pairs(tmp_path: Path) -> None:
    records = [make_group(tmp_path, "a"), make_group(tmp_path, "b", k=1, maps=False)]
    path = Manifest(tmp_path / "manifest.jsonl", records, {"map_size": [8, 8], "created_by": "test"}).save()
    assert is_manifest_file(path)
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {
        "format": "patchdpo-manifest",
        "version": 1,
        "map_size": [8, 8],
        "created_by": "test",
    }
    assert json.loads(lines[1])["generated"][0] == {
        "image": "gen/a_0.png", "seed": 100,
        "q_ref": "maps/a_0.q_ref.safetensors", "q_gen": "maps/a_0.q_gen.safetensors",
    }  # fmt: skip

    loaded = Manifest.load(path, check="full")
    assert loaded.records == records and loaded.report.ok and loaded.map_size == (8, 8)
    assert [r.line for r in loaded.records] == [2, 3]
    assert loaded.to_text() == path.read_text()
    pairs = loaded.pairs()
    assert [(p.record_id, p.k, p.has_maps) for p in pairs] == [("subj/a", 0, True), ("subj/a", 1, True),
                                                               ("subj/b", 0, False)]  # fmt: skip
    assert pairs[1].generated == tmp_path / "gen" / "a_1.png" and pairs[1].reference == tmp_path / "refs" / "a.png"
    assert [p.record_id for p in loaded.pairs_missing_maps()] == ["subj/b"]
    assert loaded.num_pairs == 3 and "subj/a" in loaded and loaded.get("subj/b").prompt == "a photo of b"

    # saving elsewhere rewrites relative paths so they still point at the same files
    moved = loaded.save(tmp_path / "elsewhere" / "m.jsonl")
    again = Manifest.load(moved, check="quick")
    assert (
        again.records[0].reference == "../refs/a.png"
        and again.pairs()[0].reference.resolve() == (tmp_path / "refs" / "a.png").resolve()
    )


def test_append_update_maps_atomically(tmp_path: Path) -> None:
    manifest = Manifest.create(tmp_path / "m.jsonl", header={"created_by": "test"})
    manifest.append([make_group(tmp_path, "a", maps=False)])
    assert len(Manifest.load(tmp_path / "m.jsonl")) == 1

    # a bad new record: nothing is written, the error names it
    before = (tmp_path / "m.jsonl").read_bytes()
    bad = make_group(tmp_path, "b", maps=False)
    bad.generated[0].image = "gen/nope.png"
    with pytest.raises(ManifestError, match=r"nope\.png"):
        manifest.append([bad, make_group(tmp_path, "a", maps=False)])  # plus a duplicate id
    assert (tmp_path / "m.jsonl").read_bytes() == before and len(manifest) == 1

    # quality maps: paths next to the manifest, set, saved, map_size learned from the files
    q_ref, q_gen = manifest.default_map_paths("subj/a", 1)
    assert q_ref.parent == q_gen.parent and q_ref.is_relative_to(tmp_path / "maps")
    write_quality_map(q_ref, np.zeros((4, 4), np.float32))
    write_quality_map(q_gen, np.ones((4, 4), np.float32))
    manifest.set_quality_maps("subj/a", 1, q_ref, q_gen)
    manifest.save()
    loaded = Manifest.load(tmp_path / "m.jsonl", check="full")
    assert loaded.map_size == (4, 4) and loaded.records[0].generated[1].has_maps
    assert not loaded.records[0].generated[0].has_maps
    with pytest.raises(ValueError, match="map_size"):
        write_quality_map(tmp_path / "big.safetensors", np.zeros((8, 8), np.float32))
        loaded.set_quality_maps("subj/a", 0, tmp_path / "big.safetensors", tmp_path / "big.safetensors")
    with pytest.raises(ValueError, match="together"):
        loaded.set_quality_maps("subj/a", 0, q_ref, None)
    with pytest.raises(KeyError):
        loaded.set_quality_maps("missing", 0, q_ref, q_gen)
    assert not [p.name for p in tmp_path.rglob("*.tmp")]  # atomic writes leave no temporaries


def write_broken_manifest(tmp_path: Path) -> tuple[Path, dict[int, str]]:
    """A manifest with one defect per line; returns it and {line: expected message fragment}."""
    good = [make_group(tmp_path, n) for n in ("g1", "g2", "g3", "g4", "g5", "g6", "g7", "g8")]
    (tmp_path / "gen" / "g2_1.png").unlink()  # missing generated image
    (tmp_path / "refs" / "g3.png").write_bytes(b"not an image at all")  # corrupt reference
    write_quality_map(tmp_path / "maps" / "g4_0.q_gen.safetensors", np.ones((16, 16), np.float32))  # wrong size
    (tmp_path / "maps" / "g5_1.q_ref.safetensors").write_bytes(b"\x00" * 7)  # unreadable map
    lines = [json.dumps({"format": "patchdpo-manifest", "version": 1, "map_size": [8, 8]})]
    lines.append(good[0].to_line().strip())  # 2: ok
    lines.append(good[1].to_line().strip())  # 3: missing file
    lines.append(good[2].to_line().strip())  # 4: corrupt image
    lines.append(good[3].to_line().strip())  # 5: wrong map size
    lines.append(good[4].to_line().strip())  # 6: unreadable map
    lines.append('{"id": "x", "subject": "s", "prompt": "p", "reference": "refs/g1.png",')  # 7: bad JSON
    lines.append(json.dumps({"id": "y", "subject": "s", "reference": "refs/g1.png", "generated": ["gen/g1_0.png"]}))
    lines.append(good[0].to_line().strip())  # 9: duplicate id
    entry = good[5].to_json()
    del entry["generated"][0]["q_gen"]
    lines.append(json.dumps(entry))  # 10: q_ref without q_gen
    entry = good[6].to_json()
    entry["colour"] = "red"
    lines.append(json.dumps(entry))  # 11: unknown field
    lines.append("")  # 12: blank lines are fine
    lines.append(good[7].to_line().strip())  # 13: ok
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    expected = {
        3: "missing file: generated[1].image 'gen/g2_1.png'",
        4: "unreadable image: reference",
        5: "wrong map size: generated[0].q_gen is [16, 16]",
        6: "unreadable quality map: generated[1].q_ref",
        7: "bad JSON",
        8: "missing field(s) ['prompt']",
        9: "duplicate id (first on line 2)",
        10: "q_ref and q_gen must be given together",
        11: "unknown field(s) ['colour']",
    }
    return path, expected


def test_every_broken_record_reported_with_its_line(tmp_path: Path) -> None:
    path, expected = write_broken_manifest(tmp_path)
    with pytest.raises(ManifestError) as info:
        Manifest.load(path)
    error = info.value
    assert sorted({p.line for p in error.problems}) == sorted(expected)
    message = str(error)
    assert "9 bad record(s)" in message
    for line, fragment in expected.items():
        assert any(p.line == line and fragment in p.message for p in error.problems), (line, fragment)
        assert f"line {line}" in message


def test_skip_vs_fail(tmp_path: Path) -> None:
    path, expected = write_broken_manifest(tmp_path)
    manifest = Manifest.load(path, on_bad_record="skip")
    assert [r.id for r in manifest.records] == ["subj/g1", "subj/g8"] and [r.line for r in manifest.records] == [2, 13]
    assert manifest.report.bad_lines == sorted(expected) and manifest.report.num_bad == 9
    assert "9 bad of 11 records" in manifest.report.format()
    assert len(Manifest.load(path, on_bad_record="skip", max_bad_records=9)) == 2
    with pytest.raises(ManifestError, match="max_bad_records=8"):
        Manifest.load(path, on_bad_record="skip", max_bad_records=8)
    # check="none": only JSON and schema problems
    assert Manifest.load(path, check="none", on_bad_record="skip").report.bad_lines == [7, 8, 9, 10, 11]


def test_full_check_decodes(tmp_path: Path) -> None:
    record = make_group(tmp_path, "t", k=1)
    png = tmp_path / "gen" / "t_0.png"
    save_png(png, size=64)
    png.write_bytes(png.read_bytes()[:300])  # truncated: the header still parses
    write_quality_map(tmp_path / "maps" / "t_0.q_ref.safetensors", np.full((8, 8), 0.5, np.float32))
    path = Manifest(tmp_path / "m.jsonl", [record]).save()
    assert Manifest.load(path, check="quick").report.ok
    with pytest.raises(ManifestError, match=r"line 2 .*unreadable image: generated\[0\]\.image"):
        Manifest.load(path, check="full")


@pytest.mark.parametrize(
    ("first_line", "match"),
    [
        ('{"id": "a"}', "line 1 must be the header"),
        ('{"format": "patchdpo-manifest", "version": 7}', "newer"),
        ("not json", "not valid JSON"),
        ('{"format": "patchdpo-manifest", "version": 1, "map_size": [8]}', "map_size"),
    ],
)
def test_bad_header(tmp_path: Path, first_line: str, match: str) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(first_line + "\n")
    with pytest.raises(ManifestError, match=match):
        Manifest.load(path)


def test_merge(tmp_path: Path) -> None:
    a, b, c = (make_group(tmp_path, n, maps=False) for n in "abc")
    Manifest(tmp_path / "p0.jsonl", [c, a]).save()
    Manifest(tmp_path / "p1.jsonl", [b, a]).save()  # "a" in both parts, identical: kept once
    merged = merge_manifests([tmp_path / "p0.jsonl", tmp_path / "p1.jsonl"], tmp_path / "out" / "m.jsonl",
                             sort_key=lambda r: r.id)  # fmt: skip
    assert [r.id for r in Manifest.load(merged.path).records] == ["subj/a", "subj/b", "subj/c"]
    assert merged.records[0].reference == "../refs/a.png"
    a2 = make_group(tmp_path, "a", maps=False)
    a2.prompt = "another prompt"
    Manifest(tmp_path / "p2.jsonl", [a2]).save()
    with pytest.raises(ManifestError, match="differs"):
        merge_manifests([tmp_path / "p0.jsonl", tmp_path / "p2.jsonl"], tmp_path / "m2.jsonl")
