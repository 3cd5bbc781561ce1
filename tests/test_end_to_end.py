"""The whole chain at tiny scale on the CPU (issue 5): demo pairs -> quality maps -> PatchDPO training -> exported
adapter -> DreamBench generation for two subjects -> evaluation, through the public commands and functions.

The README's shell version of this chain runs the same steps with ``patchdpo`` commands (about 25 s on 2 cores).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from patchdpo_fast.cli import main as patchdpo
from patchdpo_fast.config import load_config
from patchdpo_fast.data import Manifest
from patchdpo_fast.eval.dreambench import RUN_RECORD_NAME, check_layout, parse_prompts_file
from patchdpo_fast.quality import compute_manifest_maps
from patchdpo_fast.train import train

REPO = Path(__file__).resolve().parents[1]
MINI = REPO / "tests" / "assets" / "dreambench_mini"  # backpack and dog, 3 real photos each
SUBJECTS = ["backpack", "dog"]
PROMPTS = 2
STEPS = 6


@pytest.mark.slow
def test_demo_data_to_dreambench_scores(tmp_path):
    # 1. demo data: the procedural pairs as a manifest (64 px, 8 x 8 training grid)
    pairs = tmp_path / "pairs"
    assert patchdpo(["procedural-pairs", "--out", str(pairs), "--num-pairs", "4", "--resolution", "64"]) == 0
    manifest_file = pairs / "manifest.jsonl"

    # 2. quality maps from the shipped trained estimator, replacing the procedural ground-truth maps
    summary = compute_manifest_maps(
        manifest_file, "trained", overwrite=True, batch_size=2, visualize=tmp_path / "panels", progress=False
    )
    assert (summary.computed, summary.remaining, summary.map_size, summary.estimator) == (4, 0, (8, 8), "tiny-trained")
    manifest = Manifest.load(manifest_file, check="full")
    assert manifest.num_pairs == 4 and not manifest.pairs_missing_maps()
    assert all(p.q_gen.parent.parent.name == "maps" and p.q_gen.is_relative_to(pairs) for p in manifest.pairs())
    assert manifest.header["quality_maps"]["estimator"]["kind"] == "tiny-trained"
    assert len(list((tmp_path / "panels").glob("*.png"))) == 4

    # 3. PatchDPO training on the manifest (tiny model, input cache on), which exports the adapter
    cfg = load_config(
        REPO / "configs" / "tiny_cpu.yaml",
        [
            "data.source=manifest",
            f"data.manifest_path={manifest_file}",
            "data.missing_maps=error",
            f"train.max_steps={STEPS}",
            "train.log_every=2",
            f"train.checkpoint_every={STEPS}",
            f"train.output_dir={tmp_path / 'run'}",
            "cache.enabled=true",
            f"cache.dir={tmp_path / 'cache'}",
        ],
    )
    result = train(cfg)
    assert result.final_step == STEPS and result.nan_skips == 0
    assert all(math.isfinite(h["loss"]) for h in result.history) and len(result.history) == STEPS // 2
    assert result.fixed_batch_loss_end < result.fixed_batch_loss_start  # it learned something on its own pairs
    assert any((tmp_path / "cache").rglob("*.safetensors"))  # the inputs went through the cache
    adapter = result.adapter_path
    assert adapter == tmp_path / "run" / "ip_adapter.safetensors" and adapter.is_file()
    weights = load_file(str(adapter))
    assert weights and all(torch.isfinite(w).all() for w in weights.values())

    # 4. DreamBench generation with the exported adapter: 2 subjects x 2 prompts, 64 px, 2 sampler steps
    gen = tmp_path / "gen"
    argv = ["generate", "--tiny", "--ip-adapter", str(adapter), "--references", str(MINI), "--out", str(gen),
            "--subjects", ",".join(SUBJECTS), "--prompts-limit", str(PROMPTS), "--resolution", "64", "--steps", "2",
            "--no-progress"]  # fmt: skip
    assert patchdpo(argv) == 0
    protocol = parse_prompts_file(MINI / "prompts_and_classes.txt")
    check_layout(gen, protocol, subjects=SUBJECTS, prompts_limit=PROMPTS)  # raises LayoutError if incomplete
    images = sorted(p for s in SUBJECTS for p in (gen / s).glob("*.png"))
    assert [p.parent.name for p in images] == [s for s in SUBJECTS for _ in range(PROMPTS)]
    for path in images:
        with Image.open(path) as img:
            assert img.size == (64, 64) and img.mode == "RGB"
    assert sorted(p.stem for p in (gen / "_contact_sheets").glob("*.png")) == SUBJECTS
    record = json.loads((gen / RUN_RECORD_NAME).read_text())
    assert record["model"]["ip_adapter"]["path"] == str(adapter) and record["model"]["tiny"]

    # 5. evaluation with the tiny DINO / CLIP models: JSON with per-subject and overall scores
    scores = tmp_path / "scores.json"
    argv = ["evaluate", "--tiny", "--generated", str(gen), "--references", str(MINI), "--out", str(scores)]
    assert patchdpo(argv) == 0
    report = json.loads(scores.read_text())
    assert report["setting"] == "all" and report["num_images"] == len(SUBJECTS) * PROMPTS
    assert report["selection"]["subjects"] == SUBJECTS and report["unexpected_files"] == []
    assert list(report["per_subject"]) == SUBJECTS
    for subject in SUBJECTS:
        row = report["per_subject"][subject]
        assert row["num_generated"] == PROMPTS and row["num_references"] == 3
        assert all(math.isfinite(row[m]) and -1.0 <= row[m] <= 1.0 for m in ("dino", "clip_i", "clip_t"))
    for metric in ("dino", "clip_i", "clip_t"):
        assert report["overall"][metric] == pytest.approx(sum(report["per_subject"][s][metric] for s in SUBJECTS) / 2)
    assert report["generation"]["model"]["ip_adapter"]["path"] == str(adapter)
    assert scores.with_suffix(".md").is_file() and scores.with_suffix(".png").is_file()
