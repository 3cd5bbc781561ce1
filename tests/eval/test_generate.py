"""``patchdpo generate`` with the tiny model: layout, resume, shards, modes, contact sheets; then ``evaluate``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from patchdpo_fast.eval import generate as gen_module
from patchdpo_fast.eval.dreambench import RUN_RECORD_NAME, check_layout
from patchdpo_fast.eval.generate import CONTACT_SHEET_DIR, generate_dreambench, parse_shard

SUBJECTS = ["backpack", "dog"]
FAST = {"subjects": SUBJECTS, "prompts_limit": 2, "resolution": 64, "steps": 1, "progress": False}


def _no_model():
    raise AssertionError("the model must not be built when nothing is left to generate")


def _stamps(root):
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*.png")}


def test_generate_is_resumable(protocol, mini, tiny_pipe, tmp_path) -> None:
    out = tmp_path / "gen"
    first = generate_dreambench(protocol, mini, out, pipe=tiny_pipe, **FAST)
    assert len(first.generated) == 4 and first.skipped == 0 and first.complete
    assert check_layout(out, protocol, SUBJECTS, 2).ok
    sheets = sorted(p.name for p in (out / CONTACT_SHEET_DIR).iterdir())
    assert sheets == ["backpack.png", "dog.png"] and len(first.contact_sheets) == 2
    with Image.open(out / "dog" / "a dog in the jungle.png") as img:
        assert img.size == (64, 64)
    with Image.open(out / CONTACT_SHEET_DIR / "dog.png") as sheet:
        assert sheet.width >= 3 * 128  # three reference photos side by side
    before = _stamps(out)

    second = generate_dreambench(protocol, mini, out, pipe_factory=_no_model, **FAST)
    assert second.generated == [] and second.skipped == 4 and second.contact_sheets == []
    assert _stamps(out) == before

    victim = out / "backpack" / "a backpack in the snow.png"
    pixels = np.asarray(Image.open(victim))
    victim.unlink()
    third = generate_dreambench(protocol, mini, out, pipe=tiny_pipe, **FAST)
    assert third.generated == [victim] and third.skipped == 3
    assert third.contact_sheets == [out / CONTACT_SHEET_DIR / "backpack.png"]
    after = _stamps(out)
    changed = {k for k in before if after[k] != before[k]}
    assert changed == {"backpack/a backpack in the snow.png", f"{CONTACT_SHEET_DIR}/backpack.png"}
    assert np.abs(np.asarray(Image.open(victim)).astype(int) - pixels).max() <= 1  # same seed, same image

    # another setting in the same folder is refused, naming the difference
    with pytest.raises(ValueError, match=r"settings\.steps: 1 -> 2"):
        generate_dreambench(protocol, mini, out, pipe_factory=_no_model, **{**FAST, "steps": 2})


def test_shards_split_the_work(protocol, mini, tiny_pipe, tmp_path) -> None:
    out = tmp_path / "gen"
    a = generate_dreambench(protocol, mini, out, pipe=tiny_pipe, shard=(0, 2), contact_sheets=False, **FAST)
    assert not a.complete and a.shard_items == 2
    b = generate_dreambench(protocol, mini, out, pipe=tiny_pipe, shard=(1, 2), contact_sheets=False, **FAST)
    assert b.complete and not set(a.generated) & set(b.generated) and len(a.generated) + len(b.generated) == 4

    whole = generate_dreambench(protocol, mini, tmp_path / "one", pipe=tiny_pipe, contact_sheets=False, **FAST)
    for p in whole.generated:
        q = out / p.relative_to(tmp_path / "one")
        assert np.abs(np.asarray(Image.open(p)).astype(int) - np.asarray(Image.open(q)).astype(int)).max() <= 1

    assert parse_shard("1/4") == (1, 4)
    with pytest.raises(ValueError, match="shard"):
        parse_shard("4/4")


def test_shard_from_environment(monkeypatch) -> None:
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert parse_shard(None) == (2, 3)
    monkeypatch.delenv("RANK")
    assert parse_shard(None) == (0, 1)


@pytest.mark.parametrize("mode", ["all", "single"])
def test_modes_pass_the_right_references(protocol, mini, tmp_path, monkeypatch, mode) -> None:
    """all: every photo of the subject per prompt (averaged by the generator); single: Kosmos-G's photo only."""
    import patchdpo_fast.generation as generation

    calls = []

    def fake_generate(pipe, references, prompts, **kw):
        calls.append((references, prompts, kw))
        return [Image.new("RGB", (8, 8), "gray") for _ in prompts]

    monkeypatch.setattr(generation, "generate", fake_generate)
    generate_dreambench(
        protocol,
        mini,
        tmp_path / "gen",
        pipe=object(),
        mode=mode,
        batch_size=2,
        seed=7,
        subjects=["dog"],
        prompts_limit=3,
        progress=False,
    )
    assert [c[1] for c in calls] == [["a dog in the jungle", "a dog in the snow"], ["a dog on the beach"]]
    refs, _, kw = calls[0]
    assert len(refs) == 2 and all(len(r) == (3 if mode == "all" else 1) for r in refs)
    if mode == "single":
        expected = np.asarray(Image.open(mini / "dog" / "02.jpg").convert("RGB"))
        assert np.array_equal(np.asarray(refs[0][0]), expected)
    assert kw["reference_mode"] == mode and kw["seed"] == [7, 7] and kw["ip_scale"] == 0.6
    record = json.loads((tmp_path / "gen" / RUN_RECORD_NAME).read_text())
    assert record["settings"]["mode"] == mode and record["selection"] == {"subjects": ["dog"], "prompts_limit": 3}


def test_generate_and_evaluate_commands(mini, tmp_path) -> None:
    """The two commands end to end at tiny scale: generate 2 subjects x 2 prompts, evaluate, read the reports."""
    from patchdpo_fast.eval.evaluate import main as evaluate_main

    out = tmp_path / "gen"
    argv = [
        "--tiny",
        "--references",
        str(mini),
        "--out",
        str(out),
        "--subjects",
        "backpack,dog",
        "--prompts-limit",
        "2",
        "--resolution",
        "64",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--no-progress",
    ]
    assert gen_module.main(argv) == 0
    assert gen_module.main(argv) == 0  # resumed: nothing left, no model built
    assert len(list(out.glob("*/*.png"))) == 4 + 2  # images + contact sheets

    scores = tmp_path / "report" / "scores.json"
    assert evaluate_main(["--generated", str(out), "--references", str(mini), "--tiny", "--out", str(scores)]) == 0
    result = json.loads(scores.read_text())
    assert result["setting"] == "all" and list(result["per_subject"]) == SUBJECTS and result["num_images"] == 4
    assert set(result["overall"]) == {"dino", "clip_i", "clip_t"}
    assert result["generation"]["settings"]["steps"] == 1
    markdown = scores.with_suffix(".md").read_text()
    assert "| PatchDPO (paper) | 0.727 | 0.838 | 0.292 |" in markdown
    assert "| IP-Adapter-Plus (paper) | 0.692 | 0.826 | 0.281 |" in markdown
    assert f"| **ours** | **{result['overall']['dino']:.3f}**" in markdown and "Partial protocol" in markdown
    with Image.open(scores.with_suffix(".png")) as chart:
        assert chart.format == "PNG" and chart.width >= 400

    single = tmp_path / "report" / "single.json"
    assert (
        evaluate_main(
            ["--generated", str(out), "--references", str(mini), "--tiny", "--setting", "single", "--out", str(single)]
        )
        == 0
    )
    assert "| PatchDPO (paper) | 0.831 | 0.880 | 0.288 |" in single.with_suffix(".md").read_text()

    (out / "dog" / "a dog in the snow.png").unlink()
    from patchdpo_fast.cli import main as cli

    assert cli(["evaluate", "--generated", str(out), "--references", str(mini), "--tiny", "--out", str(scores)]) == 2
