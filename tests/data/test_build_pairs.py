"""``build-pairs`` with the tiny model: outputs, resuming without duplicates, shards + merge, prompt files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchdpo_fast.data import Manifest, build_pair_dataset
from patchdpo_fast.data.build_pairs import (
    build_pairs,
    discover_subjects,
    format_prompt,
    image_seed,
    main,
    merge_parts,
    parse_shard,
    read_prompt_file,
)
from patchdpo_fast.generation import build_pipeline, generate
from patchdpo_fast.models import build_models

DREAMBENCH = Path(__file__).resolve().parents[3] / "shared" / "data" / "dreambench256"
SETTINGS = {"num_images": 2, "resolution": 64, "steps": 2, "guidance": 3.0, "progress": False}


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline(build_models(tiny=True, seed=0), scheduler="euler")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """2 synthetic references (flat folder) and 2 prompts."""
    root = tmp_path_factory.mktemp("inputs")
    refs = root / "refs"
    refs.mkdir()
    for i, name in enumerate(("red_toy", "dog2")):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(refs / f"{name}.jpg")
    prompts = root / "prompts.txt"
    prompts.write_text("# two prompts\na {} on the beach\n\na photo of a {class} in the snow\n")
    return refs, prompts


@pytest.fixture(scope="module")
def full_run(pipe, inputs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full")
    result = build_pairs(*inputs, out, pipe=pipe, **SETTINGS)
    assert result.complete and result.generated_items == 4 and result.manifest == out / "manifest.jsonl"
    return out


def snapshot(out: Path) -> dict[str, bytes]:
    """Every output file except the per-shard parts and the settings file."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and not p.name.startswith("manifest.part-") and p.name != "build_pairs.json"
    }


def test_writes_images_and_a_valid_manifest(full_run: Path, inputs) -> None:
    manifest = Manifest.load(full_run / "manifest.jsonl", check="full")
    assert len(manifest) == 4 and manifest.num_pairs == 8
    assert [r.id for r in manifest.records] == ["dog2/dog2/000", "dog2/dog2/001", "red_toy/red_toy/000",
                                                 "red_toy/red_toy/001"]  # fmt: skip
    rec = manifest.records[2]
    assert rec.subject == "red_toy" and rec.prompt == "a red toy on the beach"
    assert manifest.records[1].prompt == "a photo of a dog in the snow"
    assert rec.reference.startswith("../") and manifest.resolve(rec.reference).samefile(inputs[0] / "red_toy.jpg")
    assert [g.image for g in rec.generated] == ["images/red_toy/red_toy/000_0.png", "images/red_toy/red_toy/000_1.png"]
    assert rec.generated[1].seed == image_seed(0, "red_toy", "red_toy.jpg", rec.prompt, 1)
    assert rec.meta == {"class": "red toy", "reference_index": 0, "prompt_index": 0}
    with Image.open(manifest.resolve(rec.generated[0].image)) as img:
        assert img.size == (64, 64)
    images = [np.asarray(Image.open(manifest.resolve(g.image))) for r in manifest.records for g in r.generated]
    assert len({im.tobytes() for im in images}) == 8  # distinct seeds, distinct images
    header = manifest.header
    assert header["generation"]["num_images"] == 2 and "shard" not in header and "complete" not in header
    # the manifest trains once maps exist; until then only with uniform maps
    from patchdpo_fast.config import DataConfig

    cfg = DataConfig(source="manifest", manifest_path=full_run / "manifest.jsonl", missing_maps="uniform")
    item = build_pair_dataset(cfg)[3]
    assert item["gen_pixels"].shape == (3, 64, 64) and item["prompt"] == "a photo of a dog in the snow"


def test_interrupted_run_resumes_without_duplicates(pipe, inputs, full_run: Path, tmp_path: Path) -> None:
    # 1) stopped by --limit after one item
    first = build_pairs(*inputs, tmp_path, pipe=pipe, limit=1, **SETTINGS)
    assert first.generated_items == 1 and not first.complete and first.manifest is None
    part = Manifest.load(first.part)
    assert [r.id for r in part.records] == ["dog2/dog2/000"] and part.header["complete"] is False

    # 2) a crash in the middle of an item: one of its images is written, the next write fails
    import patchdpo_fast.data.build_pairs as bp

    calls = {"n": 0}
    real_save = bp.save_image_atomic

    def flaky_save(image, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_save(image, path)

    bp.save_image_atomic = flaky_save
    try:
        with pytest.raises(KeyboardInterrupt):
            build_pairs(*inputs, tmp_path, pipe=pipe, **SETTINGS)
    finally:
        bp.save_image_atomic = real_save
    assert (tmp_path / "images/dog2/dog2/001_0.png").is_file() and not (
        tmp_path / "images/dog2/dog2/001_1.png"
    ).exists()
    assert [r.id for r in Manifest.load(first.part).records] == ["dog2/dog2/000"]  # no record without its images
    assert not list(tmp_path.rglob("*.tmp"))

    # 3) the rerun finishes: nothing redone, nothing duplicated, same bytes as the uninterrupted run
    generated: list[str] = []

    def counting_generate(pipe_, refs, prompts, **kw):
        generated.extend(prompts)
        return generate(pipe_, refs, prompts, **kw)

    final = build_pairs(*inputs, tmp_path, pipe=pipe, generate_fn=counting_generate, **SETTINGS)
    assert final.complete and final.skipped_items == 1 and final.generated_items == 3 and len(generated) == 3
    assert snapshot(tmp_path) == snapshot(full_run)
    again = build_pairs(*inputs, tmp_path, pipe=pipe, generate_fn=counting_generate, **SETTINGS)
    assert again.generated_items == 0 and len(generated) == 3 and snapshot(tmp_path) == snapshot(full_run)


def test_two_shards_and_merge_equal_one_shard(pipe, inputs, full_run: Path, tmp_path: Path) -> None:
    zero = build_pairs(*inputs, tmp_path, pipe=pipe, shard=(0, 2), **SETTINGS)
    assert zero.complete and zero.shard_items == 2 and zero.manifest is None  # shard 1 has not run
    with pytest.raises(ValueError, match="2 of 4 items"):
        merge_parts(tmp_path)
    assert len(merge_parts(tmp_path, allow_partial=True)) == 2
    one = build_pairs(*inputs, tmp_path, pipe=pipe, shard=(1, 2), **SETTINGS)
    assert one.complete and one.manifest == tmp_path / "manifest.jsonl"  # the last shard merges
    assert snapshot(tmp_path) == snapshot(full_run)
    parts = sorted(p.name for p in tmp_path.glob("manifest.part-*"))
    assert parts == ["manifest.part-00000-of-00002.jsonl", "manifest.part-00001-of-00002.jsonl"]
    (tmp_path / "manifest.jsonl").unlink()
    assert main(["--out", str(tmp_path), "--merge"]) == 0
    assert snapshot(tmp_path) == snapshot(full_run)


def test_settings_change_is_refused(pipe, inputs, full_run: Path) -> None:
    with pytest.raises(ValueError, match=r"steps: 2 -> 3"):
        build_pairs(*inputs, full_run, pipe=pipe, **{**SETTINGS, "steps": 3})


def test_cli_end_to_end(inputs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refs, prompts = inputs
    args = ["--references", str(refs), "--prompts", str(prompts), "--out", str(tmp_path), "--tiny", "-k", "1",
            "--steps", "1", "--max-references", "1", "--copy-references", "--no-progress",
            "--shard", "0/1"]  # fmt: skip
    assert main(args) == 0
    manifest = Manifest.load(tmp_path / "manifest.jsonl", check="full")
    assert len(manifest) == 4 and manifest.records[0].reference == "references/dog2/dog2.jpg"
    assert "manifest:" in capsys.readouterr().out
    from patchdpo_fast.cli import main as cli

    assert cli(["build-pairs", *args[:-2], "--shard", "3/2"]) == 2
    assert capsys.readouterr().err.strip() == "patchdpo build-pairs: shard index must be in [0, 2), got 3/2"


def test_prompt_files_and_subjects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert format_prompt("a {0} {1} in the jungle", "dog") == "a dog in the jungle"
    assert format_prompt("a {token} {class}", "dog", "sks") == "a sks dog"
    with pytest.raises(ValueError, match="unknown placeholder"):
        format_prompt("a {animal}", "dog")
    bench = tmp_path / "bench.txt"
    bench.write_text(
        "Classes\n\nsubject_name,class\nbear,stuffed animal\ncat,cat\n\nPrompts\n\nObject Prompts\n\nprompt_list = [\n"
        "'a {0} {1} in the jungle'.format(unique_token, class_token),\n"
        "'a red {0} {1}'.format(unique_token, class_token)\n]\n\nLive Subject Prompts\n\nprompt_list = [\n"
        "'a {0} {1} wearing a red hat'.format(unique_token, class_token)\n]\n"
    )
    spec = read_prompt_file(bench)
    assert spec.classes == {"bear": "stuffed animal", "cat": "cat"}
    assert spec.object_prompts == ["a {0} {1} in the jungle", "a red {0} {1}"]
    assert (
        spec.templates("cat") == ["a {0} {1} wearing a red hat"]
        and spec.templates("stuffed animal")[1] == "a red {0} {1}"
    )

    (tmp_path / "refs" / "cat").mkdir(parents=True)
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / "refs" / "cat" / name).write_bytes(b"")
    (tmp_path / "refs" / "bear.png").write_bytes(b"")
    subjects = discover_subjects(tmp_path / "refs")
    assert [(s.name, [p.name for p in s.references]) for s in subjects] == [("bear", ["bear.png"]),
                                                                            ("cat", ["a.jpg", "b.png"])]  # fmt: skip
    assert [s.references[-1].name for s in discover_subjects(tmp_path / "refs", max_references=1)] == [
        "bear.png",
        "a.jpg",
    ]

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert parse_shard(None) == (1, 4) and parse_shard("0/2") == (0, 2)
    with pytest.raises(ValueError):
        parse_shard("2/2")


@pytest.mark.skipif(not DREAMBENCH.is_dir(), reason="needs ../shared/data/dreambench256")
def test_real_dreambench_prompt_file() -> None:
    spec = read_prompt_file(DREAMBENCH / "prompts_and_classes.txt")
    assert len(spec.object_prompts) == 25 and spec.live_prompts is not None and len(spec.live_prompts) == 25
    assert spec.classes["bear_plushie"] == "stuffed animal" and len(spec.classes) == 30
    assert format_prompt(spec.templates(spec.classes["dog6"])[10], spec.classes["dog6"]) == "a dog wearing a red hat"
    subjects = discover_subjects(DREAMBENCH)
    assert len(subjects) == 20 and sum(len(s.references) for s in subjects) == 107
    assert json.dumps(spec.object_prompts[0]) == '"a {0} {1} in the jungle"'
