"""The Trainer object: a run driven from Python step by step is the same run as ``train`` / ``patchdpo train``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import patchdpo_fast.training as training
from patchdpo_fast.config import load_config
from patchdpo_fast.train import train
from patchdpo_fast.training import Trainer, TrainResult

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_cpu.yaml"


def _overrides(tmp_path: Path, name: str) -> list[str]:
    return [
        f"train.output_dir={tmp_path / name}",
        f"cache.dir={tmp_path / 'cache'}",
        "cache.on_stale=rebuild",
        "data.procedural.num_pairs=4",
        "train.max_steps=4",
        "train.log_every=2",
        "train.checkpoint_every=3",
        "train.keep_checkpoints=null",
        "loss.type=patch_dpo",
        "loss.beta=1000",
    ]


def _same_files(a: Path, b: Path, name: str) -> None:
    x, y = load_file(str(a / name)), load_file(str(b / name))
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), key


def test_step_by_step_equals_train(tmp_path):
    reference = train(load_config(TINY, _overrides(tmp_path, "whole")))

    trainer = Trainer.from_config(TINY, _overrides(tmp_path, "steps"))
    assert trainer.step == 0 and trainer.env is None  # the constructor builds nothing
    with trainer:
        trainer.setup()
        assert trainer.setup() is trainer  # once
        start = trainer.fixed_batch_loss_start
        assert start == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)  # policy = reference
        records = [trainer.train_step() for _ in range(4)]
        assert [r is not None for r in records] == [False, True, False, True]  # train.log_every=2 (and the last)
        root = tmp_path / "steps" / "checkpoints"
        assert trainer.last_checkpoint == root / "step_00000004"  # train.checkpoint_every=3 and the last step
        assert (root / "step_00000003" / "DONE").is_file()
        result = trainer.finish()

    assert isinstance(result, TrainResult)
    assert result.final_step == reference.final_step == 4
    assert result.fixed_batch_loss_start == reference.fixed_batch_loss_start
    assert result.fixed_batch_loss_end == reference.fixed_batch_loss_end  # bit-identical on the CPU
    assert [h["loss"] for h in result.history] == [h["loss"] for h in reference.history]
    assert set(result.exports) == set(reference.exports) == {"adapter"}
    _same_files(result.output_dir, reference.output_dir, "ip_adapter.safetensors")
    _same_files(result.last_checkpoint, reference.last_checkpoint, "adapter.safetensors")
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["final_step"] == 4 and summary["fixed_batch_loss_end"] == result.fixed_batch_loss_end


def test_resume_through_the_trainer_continues_the_run(tmp_path):
    full = train(load_config(TINY, _overrides(tmp_path, "full")))
    with Trainer.from_config(TINY, [*_overrides(tmp_path, "part"), "train.max_steps=4"]) as first:
        first.setup()
        for _ in range(3):
            first.train_step()  # the step-3 checkpoint is written by train_step itself
    with Trainer.from_config(TINY, _overrides(tmp_path, "part"), resume="latest") as second:
        second.setup()
        assert second.step == 3 and second.consumed == 3 * 2  # data.pairs_per_batch=2 in tiny_cpu.yaml
        assert second.fixed_batch_loss_start == full.fixed_batch_loss_start  # kept from the checkpoint
        resumed = second.fit()
    assert resumed.final_step == 4
    _same_files(resumed.output_dir, full.output_dir, "ip_adapter.safetensors")


def test_fit_without_setup_and_an_explicit_checkpoint(tmp_path):
    trainer = Trainer(
        load_config(TINY, [*_overrides(tmp_path, "run"), "train.max_steps=2", "train.checkpoint_every=5"])
    )
    try:
        result = trainer.fit()  # sets itself up
        assert result.final_step == 2 and result.last_checkpoint.name == "step_00000002"  # the last step saves
        extra = trainer.save_checkpoint()
        assert extra == result.last_checkpoint  # same step: the same folder, replaced atomically
        assert (extra / "trainer.json").is_file()
    finally:
        trainer.close()


def test_package_exports_the_trainer_lazily():
    assert training.Trainer is Trainer
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        training.Nope  # noqa: B018
