"""Pair datasets (procedural, manifest, legacy flat pair list) and a deterministic resumable distributed sampler.

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
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from patchdpo_fast.data.files import load_image, load_quality_map, probe_quality_map
from patchdpo_fast.data.manifest import Manifest, ManifestPair, is_manifest_file
from patchdpo_fast.data.procedural import ProceduralPairs
from patchdpo_fast.errors import UserError

if TYPE_CHECKING:
    from patchdpo_fast.config import DataConfig

__all__ = [
    "BadRecordsError",
    "ManifestPairDataset",
    "OnDiskPairDataset",
    "PairRecord",
    "ProceduralPairDataset",
    "ResumableSampler",
    "adapt_quality_map",
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


def read_manifest(path: str | os.PathLike[str]) -> list[PairRecord]:
    """Read a legacy flat pair list (JSONL without a header; the versioned format is :class:`Manifest`).

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


class BadRecordsError(UserError, RuntimeError):
    """More bad records than ``data.max_bad_records`` (or every record bad) with ``on_bad_record='skip'``."""


class _BadRecordLog:
    """The distinct bad records met so far, shared by the DataLoader worker processes reading one dataset.

    One byte per record in shared memory (plus a counter under the same lock): every worker marks what it met, so
    ``data.max_bad_records`` bounds the bad records of the whole process, not of each worker. The shared memory is
    handed to workers when they start (forked or spawned); any other copy of the dataset (``copy.deepcopy``,
    pickling) gets a private snapshot.
    """

    def __init__(self, size: int) -> None:
        import ctypes
        import multiprocessing

        self._flags: Any = multiprocessing.Array(ctypes.c_uint8, max(1, size))
        self._count: Any = multiprocessing.RawValue(ctypes.c_int64, 0)

    def add(self, index: int) -> int:
        """Mark ``index`` bad; returns the number of distinct bad records."""
        with self._flags.get_lock():
            if not self._flags[index]:
                self._flags[index] = 1
                self._count.value += 1
            return int(self._count.value)

    def __contains__(self, index: object) -> bool:
        return bool(self._flags[int(index)])  # type: ignore[call-overload]

    def __len__(self) -> int:
        return int(self._count.value)

    def snapshot(self) -> set[int]:
        """The bad record indices."""
        with self._flags.get_lock():
            if not self._count.value:
                return set()
            return {i for i, flag in enumerate(self._flags.get_obj()) if flag}

    def __getstate__(self) -> dict[str, Any]:
        from multiprocessing import context

        if context.get_spawning_popen() is not None:  # a DataLoader worker being started: share the memory
            return {"flags": self._flags, "count": self._count}
        return {"snapshot": self.snapshot(), "size": len(self._flags)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "flags" in state:
            self._flags, self._count = state["flags"], state["count"]
            return
        self.__init__(state["size"])
        for index in state["snapshot"]:
            self.add(index)


class _SkippingPairDataset(Dataset):
    """Shared ``__getitem__`` of the on-disk pair datasets: ``on_bad_record='skip'`` moves on to the next good pair.

    Subclasses provide ``load(index)`` (raising ``FileNotFoundError`` / ``ValueError`` on a bad pair),
    ``describe(index)``, the attributes ``on_bad_record`` and ``max_bad_records``, and create ``_bad`` (a
    :class:`_BadRecordLog` of their length).
    """

    on_bad_record: str
    max_bad_records: int
    _bad: _BadRecordLog

    @property
    def bad_records(self) -> set[int]:
        """Indices of the bad records met so far (by this process and its DataLoader workers)."""
        return self._bad.snapshot()

    def load(self, index: int) -> PairItem:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        raise NotImplementedError

    def _check_limit(self, last: str, cause: BaseException | None = None) -> None:
        count = len(self._bad)
        if count > self.max_bad_records:
            raise BadRecordsError(
                f"more than data.max_bad_records={self.max_bad_records} bad pairs ({count} met, counted "
                f"across DataLoader workers); last: {last}"
            ) from cause

    def __getitem__(self, index: int) -> PairItem:
        if self.on_bad_record == "error":
            return self.load(index)
        n = len(self)  # type: ignore[arg-type]
        for step in range(n):
            current = (index + step) % n
            if current in self._bad:
                # Another worker may have crossed the limit in a batch the run never consumes (prefetched past
                # max_steps): every item that stands in for a bad pair enforces it, not only the one that crossed it.
                self._check_limit(f"{self.describe(current)} (met earlier)")
                continue
            try:
                return self.load(current)
            except (FileNotFoundError, ValueError) as exc:
                self._bad.add(current)
                logger.warning("skipping bad %s: %s", self.describe(current), exc)
                self._check_limit(str(exc), exc)
        raise BadRecordsError(f"every pair of the dataset is bad ({n} pairs); see the warnings above")


class OnDiskPairDataset(_SkippingPairDataset):
    """Pairs stored as image and quality-map files, validated as they are read.

    Args:
        records: the pairs (e.g. from :func:`read_manifest`).
        resolution: images are resized to ``resolution`` squared.
        patch_size: quality maps must be ``resolution // patch_size`` cells a side.
        on_bad_record: ``"error"`` raises on a missing/corrupt file or a wrong-size map; ``"skip"`` logs it and
            returns the next good record instead (so batch shapes stay fixed).
        max_bad_records: with ``"skip"``, raise once more than this many bad records were met (shared by the
            DataLoader workers of one process).
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
        self._bad = _BadRecordLog(len(self.records))

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

    def describe(self, index: int) -> str:
        return f"record {index} ({self.records[index].record_id})"

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


# ----------------------------------------------------------------------------------------------------------------
# Manifest pairs
# ----------------------------------------------------------------------------------------------------------------


def adapt_quality_map(q: torch.Tensor, size: tuple[int, int], where: str = "") -> torch.Tensor:
    """Bring a quality map ``(h, w)`` to the training grid ``size`` when the two differ by integer factors.

    A finer map is averaged over each training cell (area pooling); a coarser one is repeated (each map cell covers
    whole training cells). Other size ratios are refused.

    Raises:
        ValueError: sizes that are not integer multiples of each other, per axis (the message names ``where``).
    """
    h, w = q.shape
    th, tw = size
    if (h, w) == (th, tw):
        return q
    if h % th == 0 and w % tw == 0:
        return F.avg_pool2d(q[None, None], kernel_size=(h // th, w // tw))[0, 0]
    if th % h == 0 and tw % w == 0:
        return q.repeat_interleave(th // h, 0).repeat_interleave(tw // w, 1)
    label = f"{where}: " if where else ""
    raise ValueError(
        f"{label}quality map size {[h, w]} and the training grid {[th, tw]} (data.resolution / data.patch_size) "
        "are not integer multiples of each other"
    )


class ManifestPairDataset(_SkippingPairDataset):
    """The training pairs ``(reference, generated[k])`` of a :class:`~patchdpo_fast.data.manifest.Manifest`.

    Images are resized to ``resolution`` squared; quality maps are brought to the ``resolution // patch_size``
    grid (see :func:`adapt_quality_map`).

    Args:
        manifest: a loaded (validated) manifest.
        resolution: square training resolution.
        patch_size: pixels per quality-map cell.
        on_bad_record: ``"error"`` raises on a file that fails to load; ``"skip"`` logs it and returns the next good
            pair (batch shapes stay fixed), failing after ``max_bad_records`` such pairs (counted across the
            DataLoader workers of one process).
        max_bad_records: see ``on_bad_record``.
        missing_maps: pairs without quality maps: ``"error"`` refuses them at construction (naming them);
            ``"uniform"`` fills both maps with ``uniform_quality``.
        uniform_quality: the fill value of missing maps. The default 0 weights every reference patch fully and marks
            every generated patch bad: patch_weighted_mse then trains on the references only (IP-Adapter's plain
            objective) and patch_dpo equals diffusion_dpo.
    """

    def __init__(
        self,
        manifest: Manifest,
        resolution: int,
        patch_size: int = 8,
        on_bad_record: str = "error",
        max_bad_records: int = 100,
        missing_maps: str = "error",
        uniform_quality: float = 0.0,
    ) -> None:
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
        if missing_maps not in ("error", "uniform"):
            raise ValueError(f"missing_maps must be 'error' or 'uniform', got {missing_maps!r}")
        if not 0.0 <= uniform_quality <= 1.0:
            raise ValueError(f"uniform_quality must be in [0, 1], got {uniform_quality}")
        if resolution % patch_size:
            raise ValueError(f"resolution {resolution} is not a multiple of patch_size {patch_size}")
        self.manifest = manifest
        self.pairs: list[ManifestPair] = manifest.pairs()
        if not self.pairs:
            raise ValueError(f"manifest {manifest.path} holds no usable pairs")
        self.resolution = resolution
        self.patch_size = patch_size
        self.grid = (resolution // patch_size, resolution // patch_size)
        self.on_bad_record = on_bad_record
        self.max_bad_records = max_bad_records
        self.missing_maps = missing_maps
        self.uniform_quality = float(uniform_quality)
        self._bad = _BadRecordLog(len(self.pairs))
        missing = [p for p in self.pairs if not p.has_maps]
        if missing and missing_maps == "error":
            shown = ", ".join(f"{p.record_id!r}[{p.k}] (line {p.line})" for p in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ValueError(
                f"{manifest.path}: {len(missing)} of {len(self.pairs)} pairs have no quality maps: {shown}{more}. "
                "Compute them with `patchdpo quality`, or set data.missing_maps=uniform to fill them with "
                f"data.uniform_quality (now {self.uniform_quality:g})"
            )
        if manifest.map_size is not None:
            adapt_quality_map(torch.zeros(manifest.map_size), self.grid, str(manifest.path))  # fail early

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def num_preference_pairs(self) -> int:
        """Pairs from plain preference records (winner / loser, no reference photo to condition an IP-Adapter on)."""
        return sum(1 for p in self.pairs if p.preference)

    def _map(self, path: Path | None, pair: ManifestPair) -> torch.Tensor:
        where = f"{pair.record_id}[{pair.k}]"
        if path is None:
            return torch.full(self.grid, self.uniform_quality, dtype=torch.float32)
        size = self.manifest.map_size
        if size is None:  # no declared size: take the file's (the manifest check made them all equal)
            size = probe_quality_map(path)
        return adapt_quality_map(load_quality_map(path, size, where), self.grid, where)

    def load(self, index: int) -> PairItem:
        """Load and validate one pair, raising on any problem regardless of ``on_bad_record``."""
        pair = self.pairs[index]
        return {
            "ref_pixels": load_image(pair.reference, self.resolution),
            "gen_pixels": load_image(pair.generated, self.resolution),
            "prompt": pair.prompt,
            "q_ref": self._map(pair.q_ref, pair),
            "q_gen": self._map(pair.q_gen, pair),
            "index": index,
        }

    def describe(self, index: int) -> str:
        pair = self.pairs[index]
        return f"pair {pair.record_id}[{pair.k}] (line {pair.line})"

    def fingerprint(self) -> dict[str, Any]:
        """Identity of the data for the input cache: manifest content, file sizes/mtimes and loader settings."""
        return {
            "kind": "manifest",
            "manifest": str(self.manifest.path),
            "content_sha256": self.manifest.content_hash(),
            "files_sha256": self.manifest.files_fingerprint(),
            "pairs": len(self.pairs),
            "resolution": self.resolution,
            "patch_size": self.patch_size,
            "missing_maps": self.missing_maps,
            "uniform_quality": self.uniform_quality,
        }


def _is_legacy_pair_list(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a legacy flat pair list: no manifest header, first line an object with ``ref``/``gen``."""
    if is_manifest_file(path):
        return False
    try:
        with Path(path).open(encoding="utf-8") as handle:
            first = next((line for line in handle if line.strip()), "")
        entry = json.loads(first)
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(entry, dict) and "ref" in entry and "gen" in entry


def build_pair_dataset(cfg: DataConfig, *, needs_quality: bool = True) -> Dataset:
    """The pair dataset described by a :class:`~patchdpo_fast.config.DataConfig`.

    ``source: procedural`` builds the procedural pairs in memory; ``source: manifest`` loads
    ``data.manifest_path``: a patchdpo manifest (validated with ``data.validate_files``, bad records handled by
    ``data.on_bad_record`` / ``data.max_bad_records``) or, for files without the manifest header, the legacy flat
    pair list (:func:`read_manifest`).

    Args:
        cfg: the data section.
        needs_quality: whether the loss reads the quality maps. When False (uniform weights) pairs without maps are
            accepted whatever ``data.missing_maps`` says (their maps are filled with ``data.uniform_quality``).
    """
    if cfg.source == "procedural":
        return ProceduralPairDataset(
            cfg.procedural.num_pairs, resolution=cfg.resolution, seed=cfg.procedural.seed, patch_size=cfg.patch_size
        )
    if cfg.source == "manifest":
        if cfg.manifest_path is None:
            raise ValueError("data.manifest_path is required when data.source is 'manifest'")
        if _is_legacy_pair_list(cfg.manifest_path):
            return OnDiskPairDataset(
                read_manifest(cfg.manifest_path),
                resolution=cfg.resolution,
                patch_size=cfg.patch_size,
                on_bad_record=cfg.on_bad_record,
                max_bad_records=cfg.max_bad_records,
            )
        manifest = Manifest.load(
            cfg.manifest_path,
            check=cfg.validate_files,
            on_bad_record=cfg.on_bad_record,
            max_bad_records=cfg.max_bad_records,
        )
        return ManifestPairDataset(
            manifest,
            resolution=cfg.resolution,
            patch_size=cfg.patch_size,
            on_bad_record=cfg.on_bad_record,
            max_bad_records=cfg.max_bad_records,
            missing_maps=cfg.missing_maps if needs_quality else "uniform",
            uniform_quality=cfg.uniform_quality,
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
