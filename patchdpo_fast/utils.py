"""Small helpers shared by every layer: atomic file writes and shard selection.

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
    "atomic_write_dir",
    "atomic_write_json",
    "atomic_write_text",
    "parse_shard",
]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None], prefix: str | None = None) -> Path:
    """Call ``write(tmp_path)`` to produce the file, then move it onto ``path`` atomically.

    ``prefix`` names the temporary file (default ``.<name>.``), so a caller can recognise and clean leftovers.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix or f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        write(tmp)
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


def atomic_write_dir(folder: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` to fill a fresh hidden folder next to ``folder``, then rename it into place.

    An existing ``folder`` is first renamed aside and removed only after the new one is in place, so a crash leaves
    the old folder, the new one, or (between the two renames) the old one under ``.<name>.old-*``; never a
    half-written folder under ``folder``'s name.
    """
    import shutil

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        write(tmp)
        old = None
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


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
