"""Small helpers shared by every layer: atomic file writes, a streaming safetensors writer, shard selection and
command-line device names.

Atomic writes go to a hidden temporary file in the destination's folder, are fsynced, then renamed onto the
destination with ``os.replace``: a reader (or a run resumed after a crash) sees the old file or the complete new
one, never a partial one.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_dir",
    "atomic_write_json",
    "atomic_write_text",
    "parse_shard",
    "resolve_device",
    "set_default_permissions",
    "tensors_sha256",
    "write_safetensors",
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


def _safetensors_dtypes() -> dict[Any, str]:
    import torch

    names = {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
        torch.bool: "BOOL",
    }  # fmt: skip
    for attr, name in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
                       ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):  # fmt: skip
        if hasattr(torch, attr):
            names[getattr(torch, attr)] = name
    return names


def write_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``tensors`` to ``path`` in the safetensors format, atomically, one tensor at a time.

    Unlike ``safetensors.torch.save_file`` (which first moves every tensor to the host and needs them dense and
    unshared) this never holds a second copy of the whole dict: a contiguous CPU tensor is written straight from its
    memory, and only a tensor that must change (another device, non-contiguous, or cast to ``dtype``) is copied,
    one at a time, so the extra memory of a save is at most the largest such tensor. Tensors that share memory are
    simply written once per name. The file loads with ``safetensors.torch.load_file`` and ``safe_open``.

    Args:
        tensors: name -> tensor (any device, layout strided; gradients are not followed).
        path: the destination (its folder is created).
        metadata: string -> string pairs stored in the header (``__metadata__``).
        dtype: cast floating-point tensors to this dtype on the way out (e.g. ``torch.float16`` for exports).

    Raises:
        TypeError: a value that is not a tensor, a non-string name or metadata entry, or an unsupported dtype.
    """
    import torch

    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise RuntimeError("write_safetensors writes raw little-endian memory; this machine is big-endian")
    names = _safetensors_dtypes()
    entries: list[tuple[str, torch.Tensor, torch.dtype]] = []
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"expected str -> torch.Tensor, got {type(name).__name__} -> {type(tensor).__name__}")
        if tensor.layout != torch.strided:
            raise TypeError(f"{name}: only dense (strided) tensors can be saved, got {tensor.layout}")
        out_dtype = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
        if out_dtype not in names:
            raise TypeError(f"{name}: dtype {out_dtype} has no safetensors equivalent")
        nbytes = tensor.numel() * out_dtype.itemsize
        header[name] = {
            "dtype": names[out_dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        entries.append((name, tensor, out_dtype))
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)  # the data section starts 8-byte aligned, as safetensors writes it

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(len(text).to_bytes(8, "little"))
            handle.write(text)
            for _, tensor, out_dtype in entries:
                if tensor.numel() == 0:
                    continue
                # copies only when needed, and only of this one tensor
                data = tensor.detach().to("cpu", out_dtype).contiguous()
                raw = (ctypes.c_char * (data.numel() * data.element_size())).from_address(data.data_ptr())
                handle.write(memoryview(raw))
                del raw, data

    return atomic_write(path, write)


def tensors_sha256(named: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``named``'s tensors, in name order.

    Tensors on an accelerator are brought to the host one at a time, so the cost is one tensor of host memory.
    """
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(named.items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype!s}|{tuple(data.shape)}|".encode())
        if data.numel():
            raw = (ctypes.c_char * (data.numel() * data.element_size())).from_address(data.data_ptr())
            digest.update(memoryview(raw))
        del data
    return digest.hexdigest()
