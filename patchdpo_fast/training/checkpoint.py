"""Atomic, pickle-free training checkpoints.

Layout of ``<output_dir>/checkpoints/step_00000040/``::

    adapter.safetensors        trainable adapter weights and the frozen reference copy
    trainer.safetensors/.json  optimizer, LR scheduler, loss scaler, RNG and data-order state (see state_io)
    engine_rank{r}.*           per-rank engine state for DeepSpeed ZeRO (fp32 master partitions, base optimizer)
    config.yaml                the configuration of the run
    DONE                       written last: a directory without it is incomplete and ignored

A checkpoint is assembled in ``step_N.tmp`` and renamed into place (an atomic directory rename), then
``checkpoints/latest`` is replaced atomically. An interrupted save therefore leaves either the previous checkpoint
or the new one, never a half-written one.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from patchdpo_fast.training.state_io import atomic_write_bytes

__all__ = ["CheckpointDir", "find_checkpoint", "list_checkpoints", "prune_checkpoints"]

_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointDir:
    """Create a checkpoint: write files into :attr:`tmp`, then :meth:`commit`."""

    def __init__(self, root: Path, step: int) -> None:
        self.root = Path(root)
        self.final = self.root / f"step_{step:08d}"
        self.tmp = self.root / f"step_{step:08d}.tmp"
        self.step = step

    def begin(self) -> Path:
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def commit(self) -> Path:
        (self.tmp / "DONE").write_text(f"{self.step}\n")
        if self.final.exists():  # re-saving the same step (e.g. after a resume at that step)
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        atomic_write_bytes(self.root / "latest", f"{self.final.name}\n".encode())
        return self.final


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    found = []
    if Path(root).is_dir():
        for child in Path(root).iterdir():
            m = _STEP_RE.match(child.name)
            if m and child.is_dir() and (child / "DONE").exists():
                found.append((int(m.group(1)), child))
    return sorted(found)


def find_checkpoint(output_dir: Path, resume_from: str) -> Path | None:
    """``'latest'``: the newest complete checkpoint of ``output_dir`` (None when there is none); else the path given.

    Raises:
        FileNotFoundError: an explicit path that is not a complete checkpoint.
    """
    root = Path(output_dir) / "checkpoints"
    if resume_from == "latest":
        ckpts = list_checkpoints(root)
        return ckpts[-1][1] if ckpts else None
    path = Path(resume_from)
    if not (path / "DONE").exists():
        raise FileNotFoundError(f"--resume {resume_from}: not a complete checkpoint directory (no DONE marker)")
    return path


def prune_checkpoints(root: Path, keep: int | None) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and stale ``.tmp`` directories."""
    for child in Path(root).glob("step_*.tmp"):
        shutil.rmtree(child, ignore_errors=True)
    if keep is None:
        return
    for _, path in list_checkpoints(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
