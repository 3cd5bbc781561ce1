"""Pair datasets, validating loaders for on-disk pairs, and a deterministic resumable distributed sampler.

Every pair dataset yields a dict::

    {"ref_pixels": (3, H, W) float32 in [0, 1],   # winner: the reference image
     "gen_pixels": (3, H, W) float32 in [0, 1],   # loser: the generated image
     "prompt": str,
     "q_ref": (h, w) float32 in [0, 1],           # reference-side patch quality
     "q_gen": (h, w) float32 in [0, 1],           # generated-side patch quality
     "index": int}

with ``h = w = H // patch_size``. ``torch.utils.data.default_collate`` batches these (prompts become a list).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from patchdpo_fast.data.procedural import ProceduralPairs

if TYPE_CHECKING:
    from patchdpo_fast.config import DataConfig

__all__ = [
    "OnDiskPairDataset",
    "PairRecord",
    "ProceduralPairDataset",
    "ResumableSampler",
    "build_pair_dataset",
    "load_image",
    "load_quality_map",
    "read_manifest",
]

logger = logging.getLogger(__name__)

PairItem = dict[str, Any]


class ProceduralPairDataset(Dataset):
    """The built-in procedural pairs (:class:`~patchdpo_fast.data.procedural.ProceduralPairs`) as a Dataset.

    Args:
        num_pairs: number of pairs.
        resolution: square image side in pixels.
        seed: generator seed; item ``i`` depends only on ``(seed, i)``.
        patch_size: pixels per quality-map cell.
    """

    def __init__(self, num_pairs: int, resolution: int = 64, seed: int = 0, patch_size: int = 8) -> None:
        self.pairs = ProceduralPairs(num_pairs, resolution=resolution, seed=seed, patch_size=patch_size)
        self.resolution = resolution
        self.patch_size = patch_size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> PairItem:
        pair = self.pairs[index]
        return {
            "ref_pixels": pair.ref_pixels,
            "gen_pixels": pair.gen_pixels,
            "prompt": pair.prompt,
            "q_ref": pair.q_ref,
            "q_gen": pair.q_gen,
            "index": pair.index,
        }

    def fingerprint(self) -> dict[str, Any]:
        """Everything that determines the items (for the input cache)."""
        return self.pairs.fingerprint()


# ----------------------------------------------------------------------------------------------------------------
# On-disk pairs
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairRecord:
    """One on-disk pair: two images, a prompt and two quality maps (``.npy``, ``.safetensors`` or 8/16-bit PNG)."""

    ref_image: Path
    gen_image: Path
    prompt: str
    q_ref: Path
    q_gen: Path
    record_id: str


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
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None
    if resolution is not None and rgb.size != (resolution, resolution):
        rgb = rgb.resize((resolution, resolution), Image.Resampling.BICUBIC, reducing_gap=3.0)
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).clamp_(0.0, 1.0)


def _read_map_array(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        if "quality" in tensors:
            return tensors["quality"]
        if len(tensors) != 1:
            raise ValueError(f"expected one tensor or a 'quality' tensor, found {sorted(tensors)}")
        return next(iter(tensors.values()))
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            return np.asarray(img, dtype=np.float32) / 65535.0
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


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
        array = np.asarray(_read_map_array(path), dtype=np.float32)
    except (OSError, ValueError, UnidentifiedImageError, SyntaxError) as exc:
        raise ValueError(f"{label}cannot read quality map {path}: {exc}") from None
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.shape != tuple(expected_size):
        raise ValueError(f"{label}quality map {path} has size {tuple(array.shape)}, expected {tuple(expected_size)}")
    if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
        raise ValueError(f"{label}quality map {path} has values outside [0, 1]")
    return torch.from_numpy(np.ascontiguousarray(array))


def read_manifest(path: str | os.PathLike[str]) -> list[PairRecord]:
    """Read a JSONL pair manifest.

    One JSON object per line with keys ``ref``, ``gen``, ``prompt``, ``q_ref``, ``q_gen`` and optionally ``id``;
    relative paths are relative to the manifest's folder. Blank lines are ignored. Files are not opened here.

    Raises:
        FileNotFoundError: the manifest does not exist.
        ValueError: a malformed line (the message names the manifest and line number).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    root = path.parent
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                if not isinstance(entry, dict):
                    raise ValueError("not a JSON object")
                missing = [k for k in ("ref", "gen", "prompt", "q_ref", "q_gen") if k not in entry]
                if missing:
                    raise ValueError(f"missing keys {missing}")
                records.append(
                    PairRecord(
                        ref_image=root / entry["ref"],
                        gen_image=root / entry["gen"],
                        prompt=str(entry["prompt"]),
                        q_ref=root / entry["q_ref"],
                        q_gen=root / entry["q_gen"],
                        record_id=str(entry.get("id", f"{path.name}:{number}")),
                    )
                )
            except ValueError as exc:
                raise ValueError(f"{path}, line {number}: {exc}") from None
    if not records:
        raise ValueError(f"manifest {path} holds no records")
    return records


class OnDiskPairDataset(Dataset):
    """Pairs stored as image and quality-map files, validated as they are read.

    Args:
        records: the pairs (e.g. from :func:`read_manifest`).
        resolution: images are resized to ``resolution`` squared.
        patch_size: quality maps must be ``resolution // patch_size`` cells a side.
        on_bad_record: ``"error"`` raises on a missing/corrupt file or a wrong-size map; ``"skip"`` logs it and
            returns the next good record instead (so batch shapes stay fixed).
        max_bad_records: with ``"skip"``, raise once more than this many bad records were met (per process).
    """

    def __init__(
        self,
        records: Sequence[PairRecord],
        resolution: int,
        patch_size: int = 8,
        on_bad_record: str = "error",
        max_bad_records: int = 100,
    ) -> None:
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
        if not records:
            raise ValueError("no records")
        if resolution % patch_size:
            raise ValueError(f"resolution {resolution} is not a multiple of patch_size {patch_size}")
        self.records = list(records)
        self.resolution = resolution
        self.patch_size = patch_size
        self.on_bad_record = on_bad_record
        self.max_bad_records = max_bad_records
        self.bad_records: set[int] = set()

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> PairItem:
        """Load and validate one record, raising on any problem regardless of ``on_bad_record``."""
        rec = self.records[index]
        size = (self.resolution // self.patch_size,) * 2
        return {
            "ref_pixels": load_image(rec.ref_image, self.resolution),
            "gen_pixels": load_image(rec.gen_image, self.resolution),
            "prompt": rec.prompt,
            "q_ref": load_quality_map(rec.q_ref, size, rec.record_id),
            "q_gen": load_quality_map(rec.q_gen, size, rec.record_id),
            "index": index,
        }

    def __getitem__(self, index: int) -> PairItem:
        if self.on_bad_record == "error":
            return self.load(index)
        n = len(self.records)
        for step in range(n):
            current = (index + step) % n
            if current in self.bad_records:
                continue
            try:
                return self.load(current)
            except (FileNotFoundError, ValueError) as exc:
                self.bad_records.add(current)
                logger.warning("skipping bad pair record %d (%s): %s", current, self.records[current].record_id, exc)
                if len(self.bad_records) > self.max_bad_records:
                    raise RuntimeError(
                        f"more than data.max_bad_records={self.max_bad_records} bad pair records; last: {exc}"
                    ) from exc
        raise RuntimeError("every pair record is bad")

    def fingerprint(self) -> dict[str, Any]:
        """Identity of the data for the input cache: record paths, prompts and file sizes/mtimes."""
        entries = []
        for rec in self.records:
            files = []
            for p in (rec.ref_image, rec.gen_image, rec.q_ref, rec.q_gen):
                try:
                    stat = p.stat()
                    files.append([str(p), stat.st_size, stat.st_mtime_ns])
                except OSError:
                    files.append([str(p), None, None])
            entries.append([rec.record_id, rec.prompt, files])
        return {"kind": "on_disk", "resolution": self.resolution, "patch_size": self.patch_size, "records": entries}


def build_pair_dataset(cfg: DataConfig) -> Dataset:
    """The pair dataset described by a :class:`~patchdpo_fast.config.DataConfig`."""
    if cfg.source == "procedural":
        return ProceduralPairDataset(
            cfg.procedural.num_pairs, resolution=cfg.resolution, seed=cfg.procedural.seed, patch_size=cfg.patch_size
        )
    if cfg.source == "manifest":
        assert cfg.manifest_path is not None
        return OnDiskPairDataset(
            read_manifest(cfg.manifest_path),
            resolution=cfg.resolution,
            patch_size=cfg.patch_size,
            on_bad_record=cfg.on_bad_record,
            max_bad_records=cfg.max_bad_records,
        )
    raise ValueError(f"unknown data source {cfg.source!r}")


# ----------------------------------------------------------------------------------------------------------------
# Sampler
# ----------------------------------------------------------------------------------------------------------------


class ResumableSampler(Sampler[int]):
    """Deterministic, shardable, resumable sampler.

    Epoch ``e`` visits a permutation of ``range(num_items)`` that depends only on ``(seed, e)``; rank ``r`` of
    ``world_size`` takes every ``world_size``-th element starting at ``r``. With ``drop_last`` the permutation is
    cut to a multiple of ``world_size`` (shards disjoint); otherwise it is padded by wrapping around (every item
    seen, a few twice). One ``iter()`` yields the rest of the current epoch and then moves to the next epoch, so
    ``for batch in loader`` loops work unchanged.

    ``state_dict()`` is ``{"epoch", "position", ...}`` (JSON-serialisable); loading it into a fresh sampler makes it
    continue with exactly the indices an uninterrupted run would have produced.

    DataLoader workers prefetch indices ahead of the training loop, so the sampler's own count can run ahead of
    what was trained on. Pass ``consumed`` (the number of indices this rank actually trained on since step 0) to
    :meth:`state_dict` to checkpoint exactly.

    Args:
        num_items: dataset length.
        seed: shuffle seed.
        rank: this process's rank.
        world_size: number of processes sharing the data.
        drop_last: cut (True) or pad (False) the permutation to a multiple of ``world_size``.
        shuffle: permute each epoch (False: natural order).
    """

    def __init__(
        self,
        num_items: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        shuffle: bool = True,
    ) -> None:
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        if drop_last and num_items < world_size:
            raise ValueError(f"{num_items} items cannot be sharded over {world_size} ranks with drop_last")
        self.num_items = num_items
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        """Indices per epoch on this rank."""
        if self.drop_last:
            return self.num_items // self.world_size
        return math.ceil(self.num_items / self.world_size)

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch``, in order."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        else:
            order = np.arange(self.num_items)
        total = len(self) * self.world_size
        if total > self.num_items:
            order = np.resize(order, total)  # wraps around
        return order[self.rank : total : self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices(self.epoch)
        while self.position < len(indices):
            item = indices[self.position]
            self.position += 1
            yield item
        self.epoch += 1
        self.position = 0

    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """The resume state.

        Args:
            consumed: indices this rank has trained on since step 0 (across resumes); default: what this sampler
                has yielded.
        """
        per_epoch = len(self)
        if consumed is None:
            epoch, position = self.epoch, self.position
        else:
            if consumed < 0:
                raise ValueError(f"consumed must be >= 0, got {consumed}")
            epoch, position = divmod(consumed, per_epoch)
        if position >= per_epoch:
            epoch, position = epoch + 1, 0
        return {
            "epoch": int(epoch),
            "position": int(position),
            "seed": self.seed,
            "num_items": self.num_items,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict`.

        Raises:
            ValueError: the state was made for a different seed, dataset length or world size (the order would
                not match).
        """
        for key in ("seed", "num_items", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]} but this sampler has {key}={getattr(self, key)}"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self):
            raise ValueError(f"invalid sampler state epoch={epoch} position={position}")
        self.epoch, self.position = epoch, position
