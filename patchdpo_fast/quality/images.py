"""Photo folders for quality training and evaluation, and the fixed DreamBench subject split.

A folder either holds images directly (its name is the subject) or one subfolder per subject holding images
(the ``dreambench256`` layout: ``<root>/<subject>/*.jpg``). Images are centre-cropped to a square and resized.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DREAMBENCH_EVAL_SUBJECTS",
    "DREAMBENCH_SPLITS",
    "DREAMBENCH_TEST_SUBJECTS",
    "DREAMBENCH_TRAIN_SUBJECTS",
    "DREAMBENCH_VAL_SUBJECTS",
    "IMAGE_SUFFIXES",
    "PhotoSet",
    "load_photos",
    "parse_subjects",
    "read_split_file",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

#: Fixed split of the 20 subjects of ``shared/data/dreambench256`` (also in ``assets/dreambench_split.json``):
#: quality-train uses the 12 training subjects (the others passed as ``--exclude-subjects``); quality-eval grades on
#: the 4 validation subjects (every design choice is made there) and reports the 4 test subjects once per result.
#: The held-out 8 of the first version were divided by category before any result was looked at: each half has a
#: dog, a toy, a container and an accessory/clock. Both halves were never trained on by the shipped estimator.
DREAMBENCH_TRAIN_SUBJECTS = (
    "backpack",
    "berry_bowl",
    "candle",
    "cat",
    "colorful_sneaker",
    "dog",
    "dog2",
    "dog6",
    "grey_sloth_plushie",
    "poop_emoji",
    "red_cartoon",
    "shiny_sneaker",
)
DREAMBENCH_VAL_SUBJECTS = ("backpack_dog", "can", "dog3", "robot_toy")
DREAMBENCH_TEST_SUBJECTS = ("bear_plushie", "clock", "dog8", "pink_sunglasses")
#: Validation and test together (the held-out half of the first version).
DREAMBENCH_EVAL_SUBJECTS = tuple(sorted(DREAMBENCH_VAL_SUBJECTS + DREAMBENCH_TEST_SUBJECTS))
DREAMBENCH_SPLITS = {
    "train": DREAMBENCH_TRAIN_SUBJECTS,
    "val": DREAMBENCH_VAL_SUBJECTS,
    "test": DREAMBENCH_TEST_SUBJECTS,
    "eval": DREAMBENCH_EVAL_SUBJECTS,
}


@dataclass
class PhotoSet:
    """Loaded photos: ``images`` ``(N, 3, S, S)`` float in [0, 1], with the subject and file of each."""

    images: torch.Tensor
    subjects: list[str]
    paths: list[Path]

    def __len__(self) -> int:
        return len(self.paths)


def parse_subjects(value: str | Sequence[str] | None) -> list[str] | None:
    """``"a,b"`` / ``["a", "b,c"]`` -> ``["a", "b", "c"]``; None or empty -> None."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    out = [s.strip() for item in items for s in item.split(",") if s.strip()]
    return out or None


def read_split_file(path: str | Path, key: str = "eval") -> list[str]:
    """Subjects from a split file: JSON ``{"train": [...], "val": [...], "test": [...], "eval": [...]}`` (``key``
    picks the list; ``"eval"`` falls back to val + test when absent) or plain text with one subject per line (``#``
    comments allowed; ``key`` is then ignored)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"split file {str(file)!r} does not exist")
    text = file.read_text()
    if file.suffix == ".json":
        data = json.loads(text)
        if key == "eval" and key not in data and "val" in data and "test" in data:
            return [str(s) for s in list(data["val"]) + list(data["test"])]
        if key not in data:
            raise ValueError(f"split file {file}: no {key!r} list (keys: {', '.join(data)})")
        return [str(s) for s in data[key]]
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


def _subject_files(root: Path) -> list[tuple[str, Path]]:
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    direct = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if direct:
        return [(root.name, p) for p in direct]
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        out += [(sub.name, p) for p in sorted(sub.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return out


def _load_square(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
        if s != size:
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


def load_photos(
    roots: str | Path | Iterable[str | Path],
    *,
    size: int = 256,
    subjects: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> PhotoSet:
    """Load every image under ``roots`` (see the module docstring), keeping only ``subjects`` (if given) and
    dropping ``exclude``. Raises ValueError when a requested subject is missing or nothing is left."""
    roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
    files = [item for r in roots for item in _subject_files(Path(r))]
    found = {s for s, _ in files}
    if subjects is not None:
        missing = sorted(set(subjects) - found)
        if missing:
            raise ValueError(f"subjects not found under {', '.join(map(str, roots))}: {', '.join(missing)}")
        files = [f for f in files if f[0] in set(subjects)]
    if exclude:
        files = [f for f in files if f[0] not in set(exclude)]
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) left under {', '.join(map(str, roots))}")
    arrays = [_load_square(p, size) for _, p in files]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    return PhotoSet(images=images, subjects=[s for s, _ in files], paths=[p for _, p in files])
