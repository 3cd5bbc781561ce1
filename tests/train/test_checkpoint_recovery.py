"""Resume verifies what it resumes: a corrupt newest checkpoint falls back to the newest intact one (issue 9, 6)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from patchdpo_fast.config import load_config
from patchdpo_fast.train import train

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_cpu.yaml"


def tiny_cfg(tmp_path: Path, *overrides: str, name: str = "run"):
    base = [
        f"train.output_dir={tmp_path / name}",
        f"cache.dir={tmp_path / 'cache'}",
        "data.procedural.num_pairs=4",
        "train.max_steps=6",
        "train.log_every=3",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=null",
    ]
    return load_config(TINY, [*base, *overrides])


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted 6-step run with checkpoints at steps 2, 4 and 6."""
    tmp = tmp_path_factory.mktemp("straight")
    return train(tiny_cfg(tmp)).output_dir


def crashed_copy(straight: Path, tmp_path: Path) -> Path:
    """The straight run as left by a crash after its step-4 checkpoint."""
    out = Path(shutil.copytree(straight, tmp_path / "run"))
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    (out / "ip_adapter.safetensors").unlink()
    return out


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x01
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated adapter": ("adapter.safetensors", _truncate),
    "truncated trainer state": ("trainer.safetensors", _truncate),
    "flipped byte": ("trainer.safetensors", _flip_byte),
    "broken trainer.json": ("trainer.json", lambda p: p.write_text(p.read_text()[:-40])),
    "missing file": ("adapter.safetensors", lambda p: p.unlink()),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(straight, tmp_path, caplog, kind):
    out = crashed_copy(straight, tmp_path)
    name, corrupt = CORRUPTIONS[kind]
    corrupt(out / "checkpoints" / "step_00000004" / name)
    with caplog.at_level(logging.WARNING, logger="patchdpo_fast.train"):
        resumed = train(tiny_cfg(tmp_path), resume="latest")
    assert f"skipping corrupt checkpoint {out / 'checkpoints' / 'step_00000004'}" in caplog.text
    assert name in caplog.text
    assert (out / "checkpoints" / "step_00000004.corrupt").is_dir()  # kept for inspection, never resumed again
    # resumed from step 2, the run still ends exactly where the uninterrupted one did
    want = load_file(str(straight / "checkpoints" / "step_00000006" / "adapter.safetensors"))
    got = load_file(str(resumed.last_checkpoint / "adapter.safetensors"))
    assert resumed.final_step == 6 and all(torch.equal(want[k], got[k]) for k in want)


def _rewrite_trainer_json(ckpt: Path, **changes) -> None:
    """Edit trainer.json and re-record its checksum, as a buggy writer would have produced it."""
    import hashlib

    file = ckpt / "trainer.json"
    skeleton = json.loads(file.read_text())
    skeleton["__dict__"].update(changes)
    file.write_text(json.dumps(skeleton))
    manifest = json.loads((ckpt / "checkpoint.json").read_text())
    manifest["files"]["trainer.json"] = {"bytes": file.stat().st_size,
                                         "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}  # fmt: skip
    (ckpt / "checkpoint.json").write_text(json.dumps(manifest))


def test_nonsense_state_is_refused(straight, tmp_path, capsys):
    out = crashed_copy(straight, tmp_path)
    ckpt = out / "checkpoints" / "step_00000004"
    _rewrite_trainer_json(ckpt, step=-5)
    from patchdpo_fast.training.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"trainer\.json: step is -5, expected an integer >= 0"):
        train(tiny_cfg(tmp_path), resume=str(ckpt))
    _rewrite_trainer_json(ckpt, step=4, consumed_per_rank=3)
    with pytest.raises(CheckpointError, match="consumed_per_rank 3 does not match step 4"):
        train(tiny_cfg(tmp_path), resume=str(ckpt))
    # the command line: one line naming the checkpoint and the file, exit status 2
    from patchdpo_fast.cli import main as cli

    sets = [f"train.output_dir={out}", f"cache.dir={tmp_path / 'cache'}", "data.procedural.num_pairs=4"]
    assert cli(["train", "--config", str(TINY), *(a for s in sets for a in ("--set", s)), "--resume", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"patchdpo train: cannot resume {ckpt}") and "trainer.json" in err
    assert "Traceback" not in err


def test_explicit_corrupt_checkpoint_is_an_error_naming_the_file(straight, tmp_path):
    out = crashed_copy(straight, tmp_path)
    ckpt = out / "checkpoints" / "step_00000004"
    _flip_byte(ckpt / "adapter.safetensors")
    from patchdpo_fast.training.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"adapter\.safetensors: SHA-256 differs"):
        train(tiny_cfg(tmp_path), resume=str(ckpt))
    assert ckpt.is_dir()  # a checkpoint named explicitly is reported, not moved


def test_no_intact_checkpoint_left_is_an_error(straight, tmp_path):
    out = crashed_copy(straight, tmp_path)
    for step in (2, 4):
        _truncate(out / "checkpoints" / f"step_0000000{step}" / "adapter.safetensors")
    from patchdpo_fast.training.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        train(tiny_cfg(tmp_path), resume="latest")
