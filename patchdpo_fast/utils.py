"""Small helpers shared by every layer: atomic file writes, shard selection and command-line device names.

Atomic writes go to a hidden temporary file in the destination's folder, are fsynced, then renamed onto the
destination with ``os.replace``: a reader (or a run resumed after a crash) sees the old file or the complete new
one, never a partial one.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "parse_shard",
    "resolve_device",
    "set_default_permissions",
]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def set_default_permissions(path: str | os.PathLike[str]) -> None:
    """Give a file the mode a plain ``open(path, "w")`` would (``0o666`` minus the process umask)."""
    os.chmod(path, 0o666 & ~_UMASK)


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None], prefix: str | None = None) -> Path:
    """Call ``write(tmp_path)`` to produce the file, then move it onto ``path`` atomically.

    ``prefix`` names the temporary file (default ``.<name>.``), so a caller can recognise and clean leftovers.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix or f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600 and some writers (safetensors) recreate the file 0600: give it the usual permissions
        set_default_permissions(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, prefix: str | None = None) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), prefix)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """UTF-8 text, atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], payload: Any) -> Path:
    """Indented JSON with a final newline, atomically."""
    return atomic_write_text(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def resolve_device(spec: str | None, flag: str = "--device") -> Any:
    """A ``torch.device`` from a command-line value: ``"auto"`` / None (CUDA when available, else the CPU), ``"cpu"``,
    ``"cuda"``, ``"cuda:1"``, ...

    Raises:
        UserError: not a device name, or a CUDA device that this machine does not have (the message names ``flag``).
    """
    import torch

    from patchdpo_fast.errors import UserError

    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UserError(f"{flag} {spec!r} is not a device; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"{flag} {spec}: no CUDA device is available here; use {flag} cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise UserError(f"{flag} {spec}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
    return device


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)``; without it ``RANK`` / ``WORLD_SIZE`` from the environment, else ``(0, 1)``.

    Raises:
        ValueError: not of the form ``i/n`` or ``i`` outside ``[0, n)``.
    """
    if text is None:
        rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
        if rank is None or world is None:
            return 0, 1
        text = f"{rank}/{world}"
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"shard must look like 'i/n', got {text!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard index must be in [0, {count}), got {index}/{count}")
    return index, count
