"""Atomic writes for the evaluation outputs (the shared writers plus a PNG helper)."""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

from patchdpo_fast.utils import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "save_png_atomic"]


def save_png_atomic(image: Image.Image, path: str | os.PathLike[str]) -> Path:
    """A PIL image as PNG, atomically."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())
