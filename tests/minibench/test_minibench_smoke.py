"""``patchdpo minibench --smoke``: every stage runs and connects, the metrics are computed, reruns resume.

The values mean nothing at this size (a few optimizer steps): the benchmark itself is run at its default size
and its results are committed under benchmarks/results/minibench.
"""

from __future__ import annotations

import json
import math

import pytest

from patchdpo_fast.minibench.runner import STAGES, Minibench, main
from patchdpo_fast.minibench.settings import preset


@pytest.mark.slow
def test_smoke_run_connects_every_stage_and_resumes(tmp_path, capsys):
    out = tmp_path / "mb"
    assert main(["--smoke", "--out", str(out), "--no-progress", "--publish", str(tmp_path / "pub")]) == 0
    for stage in STAGES:
        assert (out / "stages" / f"{stage}.json").is_file(), stage
    results = json.loads((out / "results.json").read_text())
    bench = Minibench(out, preset("smoke"))
    expected = {"untrained", "base"} | {v.name for v in bench.settings.variants()}
    assert set(results["aggregate"]) == expected
    for name, metrics in results["aggregate"].items():
        for key in ("id_sim", "id_acc", "detail_acc", "global_acc", "prompt_acc", "subject_l1"):
            assert math.isfinite(metrics[key]["mean"]), (name, key)
            assert 0.0 <= metrics[key]["mean"] <= 1.0 or key == "id_sim"
    assert set(results["checks"]) >= {"judges_know_subjects", "pretrained_beats_untrained", "ddpo_swapped_is_worse"}
    # the library's own outputs exist: the pretrained UNet, the pairs with both kinds of maps, every finetune
    assert (out / "model_pretrained" / "base" / "unet" / "config.json").is_file()
    for name in ("manifest.jsonl", "manifest.estimator.jsonl", "manifest.oracle.jsonl", "manifest.flipped.jsonl"):
        assert (out / "pairs" / name).is_file()
    for variant, seed in bench.runs():
        assert (out / "finetune" / variant.name / f"seed{seed}" / "ip_adapter.safetensors").is_file()
    for name in ("report.md", "results.json", "samples_grid.png", "metrics_bars.png"):
        assert (tmp_path / "pub" / name).is_file()
    report = (out / "report.md").read_text()
    assert "| Method | ID-sim (DINO) | Detail-acc (CLIP-I) | Prompt-acc (CLIP-T)" in report
    n_train = len(bench.world.train_subjects)
    assert f"Pre-training and pairs: the same {n_train} training subjects." in report

    # a rerun finds every stage done and does nothing
    capsys.readouterr()
    mtime = (out / "results.json").stat().st_mtime_ns
    assert main(["--smoke", "--out", str(out), "--no-progress"]) == 0
    assert (out / "results.json").stat().st_mtime_ns == mtime
    # other settings into the same folder are refused, naming what differs
    assert main(["--smoke", "--out", str(out), "--no-progress", "--seeds", "2"]) == 2
    assert "finetune.seeds" in capsys.readouterr().err


@pytest.mark.slow
def test_quickstart_kit_from_a_run_trains_with_the_readme_config(tmp_path):
    """The README's first command (configs/mini_world.yaml) on a kit written from a (smoke) minibench run."""
    from pathlib import Path

    from patchdpo_fast.config import load_config
    from patchdpo_fast.minibench.quickstart import write_quickstart
    from patchdpo_fast.train import train

    out = tmp_path / "mb"
    assert main(["--smoke", "--out", str(out), "--no-progress", "--until", "quality"]) == 0
    # the world estimator is trained as in the published run: a wall-clock budget, the grid recipe, and it matches
    # against the reference alone (no reference views)
    cfg = json.loads((out / "quality_estimator" / "quality_config.json").read_text())
    training = cfg["extra"]["training"]
    assert training["clock"] == "wall" and training["recipe"]["name"] == "grid"
    assert "reference_views" not in cfg and training["reference_views"]["scales"] == [1.0]
    kit = tmp_path / "kit"
    info = write_quickstart(out, kit, subjects=2, heldout=2)
    assert info["pairs"] == 2 and len(info["heldout"]) == 2
    repo = Path(__file__).resolve().parents[2]
    shipped = "patchdpo_fast/minibench/assets/quickstart"
    text = (repo / "configs" / "mini_world.yaml").read_text().replace(shipped, str(kit))
    (tmp_path / "mini_world.yaml").write_text(text)
    cfg = load_config(tmp_path / "mini_world.yaml", [f"train.output_dir={tmp_path / 'run'}",
                                                     f"cache.dir={tmp_path / 'cache'}", "train.max_steps=2",
                                                     "data.pairs_per_batch=2", "samples.steps=2"])  # fmt: skip
    result = train(cfg)
    assert result.final_step == 2
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == [
        "step_00000000.png",
        "step_00000002.png",
    ]


@pytest.mark.slow
def test_readme_first_command_trains_the_shipped_kit(tmp_path):
    """configs/mini_world.yaml as shipped (the kit's model, pairs and maps in the package), for 2 steps."""
    from pathlib import Path

    from patchdpo_fast.config import load_config
    from patchdpo_fast.train import train

    repo = Path(__file__).resolve().parents[2]
    kit = repo / "patchdpo_fast" / "minibench" / "assets" / "quickstart"
    info = json.loads((kit / "quickstart.json").read_text())
    assert info["pairs"] >= 16 and len(info["heldout"]) >= 2
    cfg = load_config(repo / "configs" / "mini_world.yaml", [f"train.output_dir={tmp_path / 'run'}",
                                                                f"cache.dir={tmp_path / 'cache'}", "train.max_steps=2",
                                                                "samples.steps=2"])  # fmt: skip
    result = train(cfg)
    assert result.final_step == 2
    assert (tmp_path / "run" / "ip_adapter.safetensors").is_file()
    assert len(list((tmp_path / "run" / "samples").glob("step_*.png"))) == 2
