"""Atomic file writes for the evaluation outputs (a reader sees the old file or the complete new one)."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "save_png_atomic"]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a hidden temporary file next to ``path``, fsync it, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """UTF-8 text, atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], payload: Any) -> Path:
    """Indented JSON (with a final newline), atomically."""
    return atomic_write_text(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def save_png_atomic(image: Image.Image, path: str | os.PathLike[str]) -> Path:
    """A PIL image as PNG, atomically."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())
