"""Atomic, pickle-free, checksummed training checkpoints owned by one run.

Layout of ``<output_dir>/checkpoints/step_00000040/``::

    adapter.safetensors        the policy adapter; for the DPO losses its metadata records the reference adapter
                               (the run's initial adapter: origin and SHA-256, not its weights)
    trainer.safetensors/.json  optimizer, LR scheduler, loss scaler, RNG and data-order state (see state_io)
    engine_rank{r}.*           per-rank engine state for DeepSpeed ZeRO (fp32 master partitions, base optimizer)
    config.yaml                the configuration of the run
    checkpoint.json            the run id, the step and the size and SHA-256 of every file above
    DONE                       written last: a directory without it is incomplete and ignored

A checkpoint is assembled in ``step_N.tmp`` and renamed into place (an atomic directory rename), then
``checkpoints/latest`` is replaced atomically. An interrupted save therefore leaves either the previous checkpoint
or the new one, never a half-written one.

Every run has a *run id* (a random hex string made when a run starts fresh, kept across resumes) recorded in each
of its checkpoints. :func:`prune_checkpoints` only deletes checkpoints of the current run, so a run never removes
another run's checkpoints (nor its own newest ones because an older run left higher step numbers).
:func:`verify_checkpoint` checks a checkpoint's files against ``checkpoint.json`` and :func:`trainer_state_problems`
its counters; resuming uses them to skip a corrupt newest checkpoint (moved aside by :func:`quarantine_checkpoint`)
for the newest intact one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from patchdpo_fast.errors import UserError
from patchdpo_fast.training.state_io import atomic_write_bytes, atomic_write_json

__all__ = [
    "MANIFEST_NAME",
    "CheckpointDir",
    "CheckpointError",
    "checkpoint_run_id",
    "file_digests",
    "find_checkpoint",
    "list_checkpoints",
    "new_run_id",
    "prune_checkpoints",
    "quarantine_checkpoint",
    "read_checkpoint_manifest",
    "trainer_state_problems",
    "verify_checkpoint",
]

_STEP_RE = re.compile(r"^step_(\d+)$")
#: Name of the per-checkpoint file that records the run id and the checksums of the other files.
MANIFEST_NAME = "checkpoint.json"
_FORMAT = 1
_SIDECAR_PREFIX = ".digests."  # per-rank checksum files, merged into the manifest by rank 0


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from: missing, incomplete, corrupt, or holding nonsense state."""


def new_run_id() -> str:
    """A fresh run id (32 hex characters)."""
    return uuid.uuid4().hex


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes": size, "sha256": hex}}`` of the given files of ``folder``."""
    out = {}
    for name in names:
        path = Path(folder) / name
        out[name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return out


class CheckpointDir:
    """Create a checkpoint: write files into :attr:`tmp`, then :meth:`commit`.

    In a multi-rank job every rank that wrote files calls :meth:`record_digests` with their names (so each rank
    hashes only its own files, in parallel); rank 0 then calls :meth:`commit`, which hashes whatever is not recorded
    yet and writes ``checkpoint.json``.
    """

    def __init__(self, root: Path, step: int, run_id: str | None = None) -> None:
        self.root = Path(root)
        self.final = self.root / f"step_{step:08d}"
        self.tmp = self.root / f"step_{step:08d}.tmp"
        self.step = step
        self.run_id = run_id

    def begin(self) -> Path:
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def record_digests(self, names: Iterable[str], tag: str) -> None:
        """Hash the files ``names`` of :attr:`tmp` now (``tag``: a unique name per writer, e.g. the rank)."""
        atomic_write_json(self.tmp / f"{_SIDECAR_PREFIX}{tag}.json", file_digests(self.tmp, names))

    def commit(self) -> Path:
        files: dict[str, dict[str, Any]] = {}
        for sidecar in sorted(self.tmp.glob(f"{_SIDECAR_PREFIX}*.json")):
            files.update(json.loads(sidecar.read_text()))
            sidecar.unlink()
        present = sorted(p.name for p in self.tmp.iterdir() if p.is_file() and not p.name.startswith("."))
        files = {name: files[name] for name in present if name in files}
        unrecorded = [n for n in present if n not in files and n not in (MANIFEST_NAME, "DONE")]
        files.update(file_digests(self.tmp, unrecorded))
        manifest = {"format": _FORMAT, "run_id": self.run_id, "step": self.step, "files": dict(sorted(files.items()))}
        atomic_write_json(self.tmp / MANIFEST_NAME, manifest)
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


def read_checkpoint_manifest(path: Path) -> dict[str, Any] | None:
    """The checkpoint's ``checkpoint.json``; None for a checkpoint written before checksums were recorded.

    Raises:
        CheckpointError: the file exists but is not a readable manifest.
    """
    file = Path(path) / MANIFEST_NAME
    if not file.exists():
        return None
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: unreadable checkpoint manifest ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{file}: not a checkpoint manifest (no 'files' mapping)")
    return manifest


def checkpoint_run_id(path: Path) -> str | None:
    """The run id recorded in a checkpoint (None: not recorded or unreadable)."""
    manifest = checkpoint_manifest_or_none(path)
    run_id = manifest.get("run_id") if manifest else None
    return run_id if isinstance(run_id, str) else None


_RANK_FILE_RE = re.compile(r"^engine_rank(\d+)\.")


def verify_checkpoint(path: Path, names: Iterable[str] | None = None, *, rank: int | None = None) -> list[str]:
    """Problems of a checkpoint, one message per problem naming the file; empty when it is intact.

    Checks the ``DONE`` marker and every file recorded in ``checkpoint.json`` (existence, size, SHA-256); ``names``
    restricts the file checks to those files. With ``rank`` (a multi-rank job, where each rank checks a share):
    rank 0 checks every file except other ranks' ``engine_rank{r}.*``, any other rank only its own. A checkpoint
    without ``checkpoint.json`` (written by an older version) only has its files' existence checked.
    """
    path = Path(path)
    if not path.is_dir():
        return [f"{path}: not a directory"]
    if not (path / "DONE").exists():
        return [f"{path}: incomplete checkpoint (no DONE marker)"]
    try:
        manifest = read_checkpoint_manifest(path)
    except CheckpointError as exc:
        return [str(exc)]
    if manifest is None:
        if rank:
            return []
        wanted = ["adapter.safetensors", "trainer.json", "trainer.safetensors"]
        return [f"{path / n}: missing" for n in wanted if (names is None or n in names) and not (path / n).is_file()]
    problems = []
    files = manifest["files"]
    if names is None and rank is not None:

        def mine(name: str) -> bool:
            m = _RANK_FILE_RE.match(name)
            return int(m.group(1)) == rank if m else rank == 0

        names = [n for n in files if mine(n)]
    for name in sorted(files if names is None else [n for n in names if n in files]):
        entry, file = files[name], path / name
        if not file.is_file():
            problems.append(f"{file}: missing")
            continue
        size = file.stat().st_size
        if size != entry.get("bytes"):
            problems.append(f"{file}: {size} bytes, the checkpoint recorded {entry.get('bytes')} (truncated?)")
        elif _sha256(file) != entry.get("sha256"):
            problems.append(f"{file}: SHA-256 differs from the one recorded when it was written (corrupted)")
    if names is not None:
        problems += [f"{path / n}: missing (not recorded in {MANIFEST_NAME})" for n in names if n not in files]
    return problems


def _int_field(fields: dict[str, Any], key: str, minimum: int) -> int | None:
    value = fields.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= minimum else None


def trainer_state_problems(path: Path, pairs_per_step: int | None = None) -> list[str]:
    """Nonsense in a checkpoint's trainer state: counters that are not non-negative integers, a step that is not
    the checkpoint's, or (with ``pairs_per_step``, pairs per rank per optimizer step) a data position that does not
    match the step. Reads only ``trainer.json``, ``checkpoint.json`` and ``DONE``.
    """
    path = Path(path)
    file = path / "trainer.json"
    try:
        skeleton = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"{file}: unreadable trainer state ({exc})"]
    fields = skeleton.get("__dict__") if isinstance(skeleton, dict) else None
    if not isinstance(fields, dict):
        return [f"{file}: not a trainer state"]
    problems = []
    values = {}
    for key, minimum in (("step", 0), ("consumed_per_rank", 0), ("nan_skips", 0), ("world_size", 1)):
        values[key] = _int_field(fields, key, minimum)
        if values[key] is None:
            problems.append(f"{file}: {key} is {fields.get(key)!r}, expected an integer >= {minimum}")
    step = values["step"]
    if step is None:
        return problems
    recorded = {}
    m = _STEP_RE.match(path.name)
    if m:
        recorded["its folder name"] = int(m.group(1))
    with contextlib.suppress(OSError, ValueError):
        recorded["DONE"] = int((path / "DONE").read_text().strip())
    manifest_step = (checkpoint_manifest_or_none(path) or {}).get("step")
    if isinstance(manifest_step, int):
        recorded[MANIFEST_NAME] = manifest_step
    for where, value in recorded.items():
        if value != step:
            problems.append(f"{file}: step {step}, but {where} says step {value}")
    consumed = values["consumed_per_rank"]
    if pairs_per_step and consumed is not None and consumed != step * pairs_per_step:
        problems.append(
            f"{file}: consumed_per_rank {consumed} does not match step {step} x {pairs_per_step} pairs per step"
        )
    return problems


def checkpoint_manifest_or_none(path: Path) -> dict[str, Any] | None:
    """:func:`read_checkpoint_manifest`, with None for an unreadable manifest too."""
    try:
        return read_checkpoint_manifest(path)
    except CheckpointError:
        return None


def quarantine_checkpoint(path: Path) -> Path:
    """Move a corrupt checkpoint aside (``step_N.corrupt``, then ``.corrupt1``, ...): never resumed nor pruned."""
    path = Path(path)
    for i in range(1000):
        target = path.with_name(f"{path.name}.corrupt{i or ''}")
        if not target.exists():
            os.replace(path, target)
            return target
    raise CheckpointError(f"cannot move the corrupt checkpoint {path} aside")


def find_checkpoint(output_dir: Path, resume_from: str) -> Path | None:
    """``'latest'``: the newest complete checkpoint of ``output_dir`` (None when there is none); else the path given.

    Raises:
        CheckpointError: an explicit path that is not a complete checkpoint.
    """
    root = Path(output_dir) / "checkpoints"
    if resume_from == "latest":
        ckpts = list_checkpoints(root)
        return ckpts[-1][1] if ckpts else None
    path = Path(resume_from)
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume_from}: no such checkpoint directory")
    if not (path / "DONE").exists():
        raise CheckpointError(
            f"--resume {resume_from}: not a complete checkpoint directory (no DONE marker); expected a "
            "<output_dir>/checkpoints/step_NNNNNNNN folder"
        )
    return path


def prune_checkpoints(root: Path, keep: int | None, run_id: str | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints of run ``run_id``, and stale ``.tmp`` directories.

    With ``run_id`` given, checkpoints of other runs (or without a recorded run id) are never touched.

    Returns:
        The deleted checkpoint directories.
    """
    for child in Path(root).glob("step_*.tmp"):
        shutil.rmtree(child, ignore_errors=True)
    if keep is None:
        return []
    ours = [path for _, path in list_checkpoints(root) if run_id is None or checkpoint_run_id(path) == run_id]
    doomed = ours[:-keep]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed
