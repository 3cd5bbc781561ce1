"""A run owns its output folder, and ``--resume`` checks what it resumes (issue 9, items 1, 2 and 5)."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import patchdpo_fast.train as train_mod
import patchdpo_fast.training.checkpoint as ckpt_mod
from patchdpo_fast.config import load_config
from patchdpo_fast.train import train
from patchdpo_fast.training.checkpoint import list_checkpoints

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_cpu.yaml"


def tiny_cfg(tmp_path: Path, *overrides: str, name: str = "run"):
    base = [
        f"train.output_dir={tmp_path / name}",
        f"cache.dir={tmp_path / 'cache'}",
        "data.procedural.num_pairs=4",
        "train.max_steps=6",
        "train.log_every=1",
        "train.checkpoint_every=3",
        "train.keep_checkpoints=null",
        "optim.warmup_steps=0",
    ]
    return load_config(TINY, [*base, *overrides])


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter.safetensors"))


def lrs(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


# -- item 1: run ownership ---------------------------------------------------------------------------------------


def test_a_fresh_run_refuses_a_folder_holding_another_run(tmp_path, caplog):
    old = train(tiny_cfg(tmp_path, "optim.lr=1e-3"))
    old_final = adapter(old.last_checkpoint)
    refusal = r"already holds 2 checkpoint\(s\) of another run.*step_00000006"
    with pytest.raises(train_mod.RunFolderError, match=refusal):
        train(tiny_cfg(tmp_path, "optim.lr=2e-4"))
    assert torch.equal(adapter(old.last_checkpoint)["ip_adapter.1.to_k_ip.weight"],
                       old_final["ip_adapter.1.to_k_ip.weight"])  # fmt: skip
    # the refusal changed nothing: not even the recorded config
    assert "0.001" in (old.output_dir / "config.yaml").read_text()

    # --overwrite deletes the old run first (and says so); the new run's checkpoints are its own
    with caplog.at_level(logging.WARNING, logger="patchdpo_fast.train"):
        new = train(tiny_cfg(tmp_path, "optim.lr=2e-4", "train.max_steps=3"), overwrite=True)
    assert "--overwrite: removed the previous run" in caplog.text
    assert "2 checkpoint(s) up to step_00000006" in caplog.text
    assert [p.name for _, p in list_checkpoints(new.output_dir / "checkpoints")] == ["step_00000003"]
    assert new.last_checkpoint.is_dir() and new.final_step == 3
    run_id = json.loads((new.output_dir / "run.json").read_text())["run_id"]
    assert ckpt_mod.checkpoint_run_id(new.last_checkpoint) == run_id


def test_pruning_only_touches_the_current_runs_checkpoints(tmp_path):
    first = train(tiny_cfg(tmp_path, "train.max_steps=3"))
    # another run's checkpoint with a higher step number lands in the folder (copied in, an older layout, ...)
    foreign = first.output_dir / "checkpoints" / "step_00000099"
    shutil.copytree(first.last_checkpoint, foreign)
    manifest = json.loads((foreign / "checkpoint.json").read_text())
    (foreign / "checkpoint.json").write_text(json.dumps({**manifest, "run_id": "another-run"}))

    resumed = train(tiny_cfg(tmp_path, "train.max_steps=9", "train.keep_checkpoints=1"),
                    resume=str(first.last_checkpoint))  # fmt: skip
    names = [p.name for _, p in list_checkpoints(first.output_dir / "checkpoints")]
    assert names == ["step_00000009", "step_00000099"]  # its own newest kept, the other run's untouched
    assert resumed.last_checkpoint.name == "step_00000009" and resumed.last_checkpoint.is_dir()
    assert (first.output_dir / "checkpoints" / "latest").read_text().strip() == "step_00000009"


def test_prune_checkpoints_by_run_id(tmp_path):
    from patchdpo_fast.training.checkpoint import CheckpointDir, prune_checkpoints, read_checkpoint_manifest

    root = tmp_path / "checkpoints"
    for step, run_id in [(1, "a"), (2, "b"), (3, "a"), (4, "b"), (5, None)]:
        ckpt = CheckpointDir(root, step, run_id)
        ckpt.begin()
        (ckpt.tmp / "adapter.safetensors").write_bytes(b"x" * step)
        ckpt.commit()
    assert read_checkpoint_manifest(root / "step_00000001")["files"]["adapter.safetensors"]["bytes"] == 1
    gone = prune_checkpoints(root, 1, "a")
    assert [p.name for p in gone] == ["step_00000001"]
    assert [p.name for _, p in list_checkpoints(root)] == [f"step_0000000{i}" for i in (2, 3, 4, 5)]


# -- item 2: resume checks its settings --------------------------------------------------------------------------


def test_resume_refuses_settings_that_break_an_exact_resume(tmp_path):
    train(tiny_cfg(tmp_path, "train.max_steps=3"))
    changed = ("loss.type=patch_weighted_mse", "data.pairs_per_batch=1", "optim.lr=1e-3")
    with pytest.raises(Exception) as info:  # ResumeConfigError (a UserError)
        train(tiny_cfg(tmp_path, *changed), resume="latest")
    assert type(info.value).__name__ == "ResumeConfigError"
    message = str(info.value)
    assert "loss.type: 'patch_dpo' -> 'patch_weighted_mse'" in message and "data.pairs_per_batch: 2 -> 1" in message
    assert "optim.lr" not in message  # a setting that may change is not among the refused ones
    assert "lr: 0.0005" in (tmp_path / "run" / "config.yaml").read_text()  # the refused job recorded nothing


def test_resume_applies_and_logs_changed_lr_and_length(tmp_path, caplog):
    train(tiny_cfg(tmp_path, "train.max_steps=3", "optim.lr=5e-4"))
    with caplog.at_level(logging.WARNING, logger="patchdpo_fast.train"):
        resumed = train(tiny_cfg(tmp_path, "train.max_steps=5", "optim.lr=1e-3"), resume="latest")
    assert resumed.final_step == 5
    assert "optim.lr: 0.0005 -> 0.001" in caplog.text and "train.max_steps: 6 -> 5" not in caplog.text
    assert "train.max_steps: 3 -> 5" in caplog.text
    got = lrs(resumed.output_dir)
    assert [got[s] for s in (1, 2, 3)] == pytest.approx([5e-4] * 3)
    assert [got[s] for s in (4, 5)] == pytest.approx([1e-3] * 2)  # the new lr, not the checkpoint's
    assert "lr: 0.001" in (resumed.output_dir / "config.yaml").read_text()


def test_compare_resume_configs_classifies_keys():
    from patchdpo_fast.training.resume import compare_resume_configs

    saved = {"optim": {"lr": 1e-4, "betas": [0.9, 0.999]}, "loss": {"type": "patch_dpo"}, "old": {"key": 1}}
    current = {"optim": {"lr": 2e-4, "betas": [0.9, 0.999]}, "loss": {"type": "mse"}, "new": {"key": 2}}
    refused, applied = compare_resume_configs(saved, current)
    assert [c.key for c in refused] == ["loss.type"] and [c.key for c in applied] == ["optim.lr"]


# -- item 5: the start loss of a resumed run, resume without a checkpoint ----------------------------------------


def test_resumed_summary_keeps_the_runs_start_loss(tmp_path):
    straight = train(tiny_cfg(tmp_path, name="straight"))
    shutil.copytree(straight.output_dir, tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000006")
    resumed = train(tiny_cfg(tmp_path, name="resumed"), resume="latest")
    assert resumed.fixed_batch_loss_start == straight.fixed_batch_loss_start
    assert math.isclose(straight.fixed_batch_loss_start, math.log(2.0), abs_tol=1e-6)  # patch_dpo at step 0
    summary = json.loads((resumed.output_dir / "summary.json").read_text())
    assert summary["fixed_batch_loss_start"] == straight.fixed_batch_loss_start
    assert summary["fixed_batch_loss_end"] == pytest.approx(straight.fixed_batch_loss_end, abs=1e-6)


def test_resume_without_a_checkpoint_says_it_starts_fresh(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="patchdpo_fast.train"):
        result = train(tiny_cfg(tmp_path, "train.max_steps=1"), resume="latest")
    assert result.final_step == 1
    assert f"--resume: no checkpoint in {tmp_path / 'run' / 'checkpoints'}; starting a fresh run" in caplog.text


def test_cli_refusals_are_one_line_with_exit_status_2(tmp_path, capsys):
    from patchdpo_fast.cli import run_command

    def main(argv):
        return run_command("train", train_mod.main, argv)

    sets = [f"train.output_dir={tmp_path / 'run'}", f"cache.dir={tmp_path / 'cache'}", "train.max_steps=1",
            "data.procedural.num_pairs=2"]  # fmt: skip
    args = ["--config", str(TINY), *(a for s in sets for a in ("--set", s))]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("patchdpo train: train.output_dir") and "--overwrite" in err and "Traceback" not in err
    assert main([*args, "--set", "loss.type=mse", "--resume"]) == 2
    assert "loss.type: 'patch_dpo' -> 'mse'" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
