"""File helpers shared by the pair datasets, the manifest and the data builders.

* validating readers: :func:`load_image` (RGB ``(3, H, W)`` in [0, 1]) and :func:`load_quality_map` (``(h, w)`` in
  [0, 1] from ``.safetensors``, ``.npy`` or grayscale PNG), plus cheap header-only probes (:func:`probe_image`,
  :func:`probe_quality_map`) used by manifest validation;
* atomic writers (temporary file in the target folder, fsync, ``os.replace``): :func:`atomic_write_bytes`,
  :func:`save_image_atomic`, :func:`write_quality_map`.

Nothing here unpickles: ``.npy`` files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError

from patchdpo_fast.utils import atomic_write, atomic_write_bytes

__all__ = [
    "IMAGE_SUFFIXES",
    "QUALITY_KEY",
    "atomic_write_bytes",
    "check_images",
    "load_image",
    "load_pil",
    "load_quality_map",
    "probe_image",
    "probe_quality_map",
    "read_quality_array",
    "save_image_atomic",
    "to_pil",
    "write_quality_map",
]

#: File suffixes treated as images when scanning folders.
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

#: Tensor name of a quality map inside its ``.safetensors`` file.
QUALITY_KEY = "quality"

_IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_MAP_ERRORS = (OSError, ValueError, UnidentifiedImageError, SyntaxError, SafetensorError)


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike[str], resolution: int | None = None) -> torch.Tensor:
    """Load an RGB image as a float32 ``(3, H, W)`` tensor in [0, 1], resized to ``resolution`` squared if given.

    Images are resized, not cropped, so that quality maps computed on the full image stay aligned.

    Raises:
        FileNotFoundError: the file does not exist (the message names the path).
        ValueError: the file cannot be decoded as an image (the message names the path).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
    except _IMAGE_ERRORS as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None
    if resolution is not None and rgb.size != (resolution, resolution):
        rgb = rgb.resize((resolution, resolution), Image.Resampling.BICUBIC, reducing_gap=3.0)
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).clamp_(0.0, 1.0)


def load_pil(path: str | os.PathLike[str]) -> Image.Image:
    """An image file as a decoded PIL RGB image.

    Raises:
        FileNotFoundError: no such file. ValueError: not a readable image (the message names the path).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except _IMAGE_ERRORS as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None


def probe_image(path: str | os.PathLike[str], decode: bool = False) -> tuple[int, int]:
    """Check that ``path`` is an image file and return its ``(width, height)``.

    Without ``decode`` only the header is parsed (cheap: catches missing, empty and non-image files); with
    ``decode`` the pixels are decoded too (also catches truncated files).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable image (the message names the path).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            if decode:
                img.load()
            return img.size
    except _IMAGE_ERRORS as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None


def check_images(paths: Any, what: str = "image") -> None:
    """Decode every image of ``paths`` before any work starts; one error listing all that fail.

    Raises:
        ValueError: ``"<n> unreadable <what>(s): <path>: <reason>; ..."`` (missing, truncated, not an image).
    """
    problems = []
    for path in dict.fromkeys(Path(p) for p in paths):  # each file once, in order
        try:
            probe_image(path, decode=True)
        except (FileNotFoundError, ValueError) as exc:
            problems.append(str(exc))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(f"{len(problems)} unreadable {what}(s): {shown}")


def to_pil(image: Any) -> Image.Image:
    """A PIL RGB image from a PIL image, a path, a ``(3, H, W)`` tensor / ``(H, W, 3)`` array in [0, 1] or uint8."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as img:
            return img.convert("RGB")
    if isinstance(image, torch.Tensor):
        array = image.detach().to("cpu", torch.float32)
        if array.ndim != 3 or array.shape[0] not in (1, 3):
            raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(array.shape)}")
        array = array.expand(3, -1, -1).permute(1, 2, 0).numpy()
    else:
        array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(np.asarray(array, np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


# ----------------------------------------------------------------------------------------------------------------
# Quality maps
# ----------------------------------------------------------------------------------------------------------------


def _safetensors_key(keys: list[str], path: Path) -> str:
    if QUALITY_KEY in keys:
        return QUALITY_KEY
    if len(keys) != 1:
        raise ValueError(f"{path}: expected one tensor or a '{QUALITY_KEY}' tensor, found {sorted(keys)}")
    return keys[0]


def read_quality_array(path: str | os.PathLike[str]) -> np.ndarray:
    """The raw array of a quality-map file (``.safetensors``, ``.npy`` or an 8/16-bit grayscale image)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        return tensors[_safetensors_key(list(tensors), path)]
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            return np.asarray(img, dtype=np.float32) / 65535.0
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def _squeeze_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[1:] if len(shape) == 3 and shape[0] == 1 else shape


def probe_quality_map(path: str | os.PathLike[str], full: bool = False) -> tuple[int, int]:
    """Check a quality-map file and return its ``(h, w)``, reading only its header unless ``full``.

    With ``full`` the values are read as well and must be finite and within [0, 1].

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable file, not 2-D (a leading singleton dimension is allowed) or, with ``full``, values
            outside [0, 1].
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"quality map not found: {path}")
    try:
        if full:
            array = np.asarray(read_quality_array(path), dtype=np.float32)
            shape = _squeeze_shape(tuple(array.shape))
            if not np.isfinite(array).all() or array.min(initial=0.0) < 0.0 or array.max(initial=0.0) > 1.0:
                raise ValueError(f"quality map {path} has values outside [0, 1]")
        elif path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as handle:
                key = _safetensors_key(list(handle.keys()), path)
                shape = _squeeze_shape(tuple(handle.get_slice(key).get_shape()))
        elif path.suffix.lower() == ".npy":
            shape = _squeeze_shape(tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape))
        else:
            with Image.open(path) as img:
                shape = (img.size[1], img.size[0])
    except _MAP_ERRORS as exc:
        message = str(exc)
        raise ValueError(message if str(path) in message else f"cannot read quality map {path}: {exc}") from None
    if len(shape) != 2:
        raise ValueError(f"quality map {path} has shape {shape}, expected (h, w)")
    return int(shape[0]), int(shape[1])


def load_quality_map(path: str | os.PathLike[str], expected_size: tuple[int, int], record: str = "") -> torch.Tensor:
    """Load a patch-quality map as float32 ``(h, w)`` and check its size and values.

    Accepts ``.npy`` (no pickle), ``.safetensors`` (a single tensor or one named ``quality``) and grayscale
    images (8-bit scaled by 1/255, 16-bit by 1/65535). A leading singleton dimension is dropped.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unreadable file, values outside [0, 1], or a size other than ``expected_size`` (the message
            names the record, the expected and the actual size).
    """
    path = Path(path)
    label = f"record {record!r}: " if record else ""
    if not path.is_file():
        raise FileNotFoundError(f"{label}quality map not found: {path}")
    try:
        array = np.asarray(read_quality_array(path), dtype=np.float32)
    except _MAP_ERRORS as exc:
        raise ValueError(f"{label}cannot read quality map {path}: {exc}") from None
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.shape != tuple(expected_size):
        raise ValueError(f"{label}quality map {path} has size {tuple(array.shape)}, expected {tuple(expected_size)}")
    if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
        raise ValueError(f"{label}quality map {path} has values outside [0, 1]")
    return torch.from_numpy(np.ascontiguousarray(array))


# ----------------------------------------------------------------------------------------------------------------
# Atomic writers
# ----------------------------------------------------------------------------------------------------------------


def save_image_atomic(image: Any, path: str | os.PathLike[str]) -> Path:
    """Save an image (anything :func:`to_pil` takes) atomically; the format follows the suffix (PNG by default)."""
    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}.get(path.suffix.lower(), "PNG")
    pil = to_pil(image)
    return atomic_write(path, lambda tmp: pil.save(tmp, format=fmt))


def write_quality_map(path: str | os.PathLike[str], values: Any, metadata: dict[str, str] | None = None) -> Path:
    """Write a quality map ``(h, w)`` in [0, 1] as float32 ``.safetensors`` (tensor ``quality``), atomically.

    ``metadata`` (strings) is stored in the file's header next to ``format`` (e.g. the estimator that made it).

    Raises:
        ValueError: not 2-D, non-finite or outside [0, 1], or a path not ending in ``.safetensors``.
    """
    from safetensors.numpy import save

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"quality maps are written as .safetensors, got {path}")
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float32).numpy()
    array = np.ascontiguousarray(np.asarray(values, dtype=np.float32))
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"a quality map must be (h, w), got shape {array.shape}")
    if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
        raise ValueError("quality map values must be finite and within [0, 1]")
    header = {"format": "patchdpo-quality-map", **(metadata or {})}
    return atomic_write_bytes(path, save({QUALITY_KEY: array}, metadata=header))
