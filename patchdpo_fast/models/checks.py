"""Checks of model inputs named by the user, run before anything loads (one clear error instead of a traceback)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from patchdpo_fast.errors import UserError

__all__ = ["check_ip_adapter_file"]


def check_ip_adapter_file(path: str | os.PathLike[str], what: str = "--ip-adapter") -> Path:
    """Check that ``path`` is an IP-Adapter(-Plus) weight file this library reads: a ``.safetensors`` file with a
    readable header, or an official ``.bin`` (a ``torch.save`` zip archive, read with ``weights_only=True``).

    Raises:
        UserError: missing, a folder, another format, or an unreadable file (the message names ``what``).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path}: no such file")
    if not path.is_file():
        raise UserError(f"{what} {path}: expected a .safetensors or official .bin file, got a folder")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
        except Exception as exc:  # SafetensorError and OS errors alike
            raise UserError(f"{what} {path}: not a readable safetensors file ({exc})") from None
        if not any(k.startswith(("image_proj.", "ip_adapter.")) for k in keys):
            raise UserError(f"{what} {path}: no image_proj.* / ip_adapter.* tensors; not an IP-Adapter file")
        return path
    if suffix in (".bin", ".pt", ".pth"):
        if not zipfile.is_zipfile(path):
            raise UserError(f"{what} {path}: not a PyTorch checkpoint archive (expected the official .bin)")
        return path
    raise UserError(f"{what} {path}: expected an IP-Adapter .safetensors or official .bin file, got '{suffix}'")
