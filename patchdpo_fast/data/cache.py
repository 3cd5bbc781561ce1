"""Offline input cache: run the frozen encoders once, train from safetensors shards.

:func:`build_input_cache` walks a pair dataset in order, calls the encoders in batches and writes, per shard of
``shard_size`` pairs, one ``shard_NNNNN.safetensors`` file holding

========================  =======================================================  ==========================
key                       content                                                  dtype
========================  =======================================================  ==========================
``latents_ref``           ``encode_images(ref_pixels)`` (VAE latents)              cache dtype
``latents_gen``           ``encode_images(gen_pixels)``                            cache dtype
``prompt_embeds``         first output of ``encode_prompts(prompts)``              cache dtype
``pooled``                second output of ``encode_prompts`` (if not None)        cache dtype
``image_features``        ``encode_reference(ref_pixels)`` (CLIP image features)   cache dtype
``q_ref``, ``q_gen``      the quality maps                                         float32
``index``                 dataset index of each row                                int64
========================  =======================================================  ==========================

plus the prompts as JSON in the shard's metadata, and ``null.safetensors`` with the unconditional inputs for
conditioning dropout: ``encode_prompts([""])`` and the image features of a dropped image prompt (``encode_null_image``).

``index.json`` records the cache format, a fingerprint (SHA-256 of the dataset's ``fingerprint()``, the caller's
encoder settings, shard size and dtype), per finished shard its file name, item range ``[start, stop)``, byte
size and SHA-256, and the records a dataset with ``on_bad_record='skip'`` skipped (``bad_records``: another pair
stands in their rows; such a cache is refused for a dataset with ``on_bad_record='error'``). Files are written to a
temporary name, fsynced and moved into place with ``os.replace``; the index is rewritten (atomically) after every
shard, so an interrupted build resumes from the finished shards. A shard whose checksum no longer matches is
rebuilt by :func:`build_input_cache` and reported by :class:`CachedPairDataset`.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from patchdpo_fast.utils import atomic_write_bytes

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CacheError",
    "CachedPairDataset",
    "build_input_cache",
    "cache_fingerprint",
    "describe_changes",
    "verify_input_cache",
]

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
INDEX_NAME = "index.json"
NULL_NAME = "null.safetensors"
_TMP_PREFIX = ".tmp-"

EncodeImages = Callable[[torch.Tensor], torch.Tensor]
EncodePrompts = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor | None]]
EncodeReference = Callable[[torch.Tensor], torch.Tensor]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CacheError(RuntimeError):
    """A missing, incomplete, stale or corrupted input cache, or encoders that returned the wrong shapes."""


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"cache dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        return dtype
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"cache dtype must be one of {sorted(_DTYPES)}, got {dtype}")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data, prefix=_TMP_PREFIX)


def _write_index(cache_dir: Path, index: dict[str, Any]) -> None:
    _atomic_write(cache_dir / INDEX_NAME, (json.dumps(index, indent=1) + "\n").encode("utf-8"))


def _read_index(cache_dir: Path) -> dict[str, Any] | None:
    path = cache_dir / INDEX_NAME
    if not path.exists():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CacheError(f"cannot read cache index {path}: {exc}") from None
    if not isinstance(index, dict) or "fingerprint" not in index or "shards" not in index:
        raise CacheError(f"cache index {path} is not a patchdpo_fast cache index")
    return index


def _entry_problem(cache_dir: Path, entry: Mapping[str, Any], verify: bool) -> str | None:
    """Why a recorded file is unusable, or None if it is fine."""
    path = cache_dir / entry["file"]
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{path} has {size} bytes, the index records {entry['bytes']}"
    if verify:
        digest = _sha256_file(path)
        if digest != entry["sha256"]:
            return f"{path} checksum mismatch: sha256 {digest}, the index records {entry['sha256']}"
    return None


def cache_fingerprint(
    dataset: Dataset,
    settings: Mapping[str, Any] | None = None,
    *,
    shard_size: int,
    dtype: torch.dtype | str,
) -> tuple[str, dict[str, Any]]:
    """Fingerprint of what a cache holds: the dataset's identity, the encoder settings and the storage layout.

    The dataset's ``fingerprint()`` method is used when it has one; otherwise only its class and length
    (a weak identity – give such datasets a ``fingerprint()``).

    Returns:
        ``(hex_digest, described)`` where ``described`` is the JSON-able data that was hashed.
    """
    if hasattr(dataset, "fingerprint"):
        data_id: Any = dataset.fingerprint()
    else:
        data_id = {"class": type(dataset).__qualname__, "len": len(dataset)}  # type: ignore[arg-type]
    described = {
        "format": CACHE_FORMAT_VERSION,
        "dataset": data_id,
        "encoders": dict(settings or {}),
        "shard_size": int(shard_size),
        "dtype": _dtype_name(dtype),
    }
    text = json.dumps(described, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest(), json.loads(text)


def _brief(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 72 else text[:69] + "..."


def _named(value: Any) -> Any:
    """Lists of ``[name, ...]`` rows (files, records) as ``{name: rest}``, so a change names the row."""
    if isinstance(value, list) and value and all(isinstance(v, list) and v and isinstance(v[0], str) for v in value):
        names = [v[0] for v in value]
        if len(set(names)) == len(names):
            return {v[0]: v[1:] for v in value}
    return value


def describe_changes(old: Any, new: Any, key: str = "") -> list[str]:
    """The settings that differ between two ``described`` fingerprints, as ``"dotted.key: old -> new"`` lines."""
    old, new = _named(old), _named(new)
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            sub = f"{key}.{k}" if key else str(k)
            if k not in old:
                out.append(f"{sub}: new ({_brief(new[k])})")
            elif k not in new:
                out.append(f"{sub}: gone (was {_brief(old[k])})")
            else:
                out += describe_changes(old[k], new[k], sub)
        return out
    return [] if old == new else [f"{key or 'fingerprint'}: {_brief(old)} -> {_brief(new)}"]


def _as_rows(name: str, value: Any, rows: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise CacheError(f"{name} must return a tensor, got {type(value).__name__}")
    if value.ndim == 0 or value.shape[0] != rows:
        raise CacheError(f"{name} returned shape {tuple(value.shape)} for a batch of {rows}")
    return value.detach().to("cpu")


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------------


class _BuildLock:
    """An exclusive ``flock`` on ``<cache_dir>/.build.lock``: one builder at a time per cache folder.

    Parallel jobs sharing a ``cache.dir`` then take turns: the first builds, the others wait and find (and verify)
    the finished cache. Where ``fcntl`` does not exist (Windows) there is no lock.
    """

    def __init__(self, cache_dir: Path) -> None:
        self.path = cache_dir / ".build.lock"
        self._handle: Any = None

    def __enter__(self) -> _BuildLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        self._handle = self.path.open("a+")
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process building the input cache in %s", self.path.parent)
            fcntl.flock(self._handle, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.close()  # releases the lock
            self._handle = None


def _one_builder_at_a_time(build: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    @functools.wraps(build)
    def locked(dataset: Dataset, cache_dir: str | os.PathLike[str], *args: Any, **kwargs: Any) -> dict[str, Any]:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        with _BuildLock(Path(cache_dir)):
            return build(dataset, cache_dir, *args, **kwargs)

    return locked


@_one_builder_at_a_time
def build_input_cache(
    dataset: Dataset,
    cache_dir: str | os.PathLike[str],
    *,
    encode_images: EncodeImages,
    encode_prompts: EncodePrompts,
    encode_reference: EncodeReference | None,
    settings: Mapping[str, Any] | None = None,
    shard_size: int = 256,
    batch_size: int = 8,
    dtype: torch.dtype | str = torch.float16,
    on_stale: str = "error",
    verify: bool = True,
    progress: bool = True,
    encode_null_image: Callable[[], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Build (or finish, or check) the input cache of ``dataset`` under ``cache_dir``.

    Args:
        dataset: a pair dataset (items as in :mod:`patchdpo_fast.data.dataset`), read in index order.
        cache_dir: output folder (created).
        encode_images: ``(N, 3, H, W)`` pixels in [0, 1] -> ``(N, C, h, w)`` latents (already scaled as the UNet
            expects). Called once per batch on the reference and generated images together.
        encode_prompts: list of N prompts -> ``(prompt_embeds (N, L, D), pooled (N, P) or None)``.
        encode_reference: ``(N, 3, H, W)`` reference pixels in [0, 1] -> ``(N, T, F)`` image features; ``None``
            caches no image features (a model without an IP-Adapter, conditioned on text only).
        settings: JSON-able description of everything else the cached tensors depend on (encoder weights and
            dtypes, resolution, preprocessing: :func:`~patchdpo_fast.data.cache_settings.input_cache_settings` for a
            training config); part of the fingerprint, so changing it invalidates the cache, and a stale cache's
            error names each setting that differs (:func:`describe_changes`).
        shard_size: pairs per shard.
        batch_size: pairs per encoder call.
        dtype: storage dtype of the encoder outputs (quality maps stay float32).
        on_stale: when ``cache_dir`` holds a cache with another fingerprint: ``"error"`` raises
            :class:`CacheError`, ``"rebuild"`` deletes it and starts over.
        verify: check the SHA-256 of already finished shards before trusting them (size is always checked).
        progress: show a tqdm progress bar.
        encode_null_image: ``() -> (1, T, F)`` image features of the dropped image prompt; default:
            ``encode_reference`` of a black image.

    Concurrent builders of one ``cache_dir`` (parallel jobs sharing a cache) take turns through a file lock, and
    identical builds write byte-identical shards.

    Returns:
        The cache index (as written to ``index.json``).

    Raises:
        CacheError: stale cache with ``on_stale="error"``, or encoder outputs with the wrong batch dimension.
    """
    if on_stale not in ("error", "rebuild"):
        raise ValueError(f"on_stale must be 'error' or 'rebuild', got {on_stale!r}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError("shard_size and batch_size must be >= 1")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for stray in cache_dir.glob(f"{_TMP_PREFIX}*"):
        stray.unlink(missing_ok=True)
    storage = _DTYPES[_dtype_name(dtype)]
    num_items = len(dataset)  # type: ignore[arg-type]
    fingerprint, described = cache_fingerprint(dataset, settings, shard_size=shard_size, dtype=storage)

    index = _read_index(cache_dir)
    if index is not None and index["fingerprint"] != fingerprint:
        changes = describe_changes(index.get("described"), described)
        shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
        if on_stale == "error":
            raise CacheError(
                f"the input cache in {cache_dir} was built from other data or encoder settings "
                f"(fingerprint {index['fingerprint'][:12]}..., expected {fingerprint[:12]}...): {shown}; "
                "delete it or set cache.on_stale=rebuild"
            )
        logger.warning("input cache in %s is stale (%s); rebuilding it", cache_dir, shown)
        for entry in [*index["shards"], index.get("null") or {}]:
            if entry.get("file"):
                (cache_dir / entry["file"]).unlink(missing_ok=True)
        (cache_dir / INDEX_NAME).unlink()
        index = None
    if index is None:
        index = {
            "format": CACHE_FORMAT_VERSION,
            "fingerprint": fingerprint,
            "described": described,
            "num_items": num_items,
            "shard_size": shard_size,
            "dtype": _dtype_name(storage),
            "null": None,
            "shards": [],
            "complete": False,
        }
        _write_index(cache_dir, index)

    _check_bad_records(cache_dir, index, dataset)

    # Which recorded shards can be trusted?
    num_shards = (num_items + shard_size - 1) // shard_size
    good: dict[int, dict[str, Any]] = {}
    for entry in index["shards"]:
        problem = _entry_problem(cache_dir, entry, verify)
        if problem is None:
            good[entry["shard"]] = entry
        else:
            logger.warning("input cache shard %d is unusable and will be rebuilt: %s", entry["shard"], problem)
    if len(good) != len(index["shards"]):
        index["shards"] = sorted(good.values(), key=lambda e: e["shard"])
        index["complete"] = False
        _write_index(cache_dir, index)

    with torch.no_grad():
        if index.get("null") is None or _entry_problem(cache_dir, index["null"], verify) is not None:
            index["null"] = _write_null(
                cache_dir, dataset, encode_prompts, encode_reference, storage, encode_null_image
            )
            _write_index(cache_dir, index)

        done = sum(e["stop"] - e["start"] for e in good.values())
        bar = tqdm(total=num_items, initial=done, desc="caching inputs", unit="pair", disable=not progress)
        try:
            for shard in range(num_shards):
                if shard in good:
                    continue
                start, stop = shard * shard_size, min(num_items, (shard + 1) * shard_size)
                entry = _write_shard(
                    cache_dir, dataset, shard, start, stop, batch_size, storage,
                    encode_images, encode_prompts, encode_reference, bar,
                )  # fmt: skip
                good[shard] = entry
                index["shards"] = sorted(good.values(), key=lambda e: e["shard"])
                _record_bad_records(index, dataset)
                _write_index(cache_dir, index)
        finally:
            bar.close()
    index["complete"] = True
    _write_index(cache_dir, index)
    return index


def _record_bad_records(index: dict[str, Any], dataset: Dataset) -> None:
    """Add the records the dataset skipped (``on_bad_record='skip'``: another pair's data stands in their rows)."""
    bad = getattr(dataset, "bad_records", None)
    if not bad:
        return
    describe = getattr(dataset, "describe", None)
    known = {int(e["index"]): e for e in index.get("bad_records", [])}
    for i in sorted(set(bad) - set(known)):
        known[i] = {"index": int(i), "record": describe(i) if describe else f"item {i}"}
    index["bad_records"] = [known[i] for i in sorted(known)]


def _check_bad_records(cache_dir: Path, index: Mapping[str, Any], dataset: Dataset) -> None:
    """A cache built while skipping bad records must not silently stand in for data read with stricter settings."""
    bad = index.get("bad_records") or []
    if not bad:
        return
    shown = ", ".join(e["record"] for e in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    policy = getattr(dataset, "on_bad_record", None)
    if policy == "error":
        raise CacheError(
            f"the input cache in {cache_dir} was built with data.on_bad_record=skip and stands in other pairs for "
            f"{len(bad)} bad record(s): {shown}. Fix those records and delete the cache, or set "
            "data.on_bad_record=skip"
        )
    limit = getattr(dataset, "max_bad_records", None)
    if limit is not None and len(bad) > limit:
        raise CacheError(
            f"the input cache in {cache_dir} skipped {len(bad)} bad record(s) ({shown}), more than "
            f"data.max_bad_records={limit}"
        )


def _write_null(
    cache_dir: Path,
    dataset: Dataset,
    encode_prompts: EncodePrompts,
    encode_reference: EncodeReference | None,
    storage: torch.dtype,
    encode_null_image: Callable[[], torch.Tensor] | None = None,
) -> dict[str, Any]:
    ref = dataset[0]["ref_pixels"]
    embeds, pooled = encode_prompts([""])
    tensors = {"prompt_embeds": _cast(_as_rows("encode_prompts", embeds, 1), storage)}
    if pooled is not None:
        tensors["pooled"] = _cast(_as_rows("encode_prompts (pooled)", pooled, 1), storage)
    if encode_null_image is not None:
        features = encode_null_image()
    elif encode_reference is not None:
        features = encode_reference(torch.zeros((1, *ref.shape), dtype=ref.dtype))
    else:
        features = None  # text-only conditioning: no image features
    if features is not None:
        tensors["image_features"] = _cast(_as_rows("encode_reference", features, 1), storage)
    data = safetensors_save(tensors)
    _atomic_write(cache_dir / NULL_NAME, data)
    return {"file": NULL_NAME, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _write_shard(
    cache_dir: Path,
    dataset: Dataset,
    shard: int,
    start: int,
    stop: int,
    batch_size: int,
    storage: torch.dtype,
    encode_images: EncodeImages,
    encode_prompts: EncodePrompts,
    encode_reference: EncodeReference | None,
    bar: tqdm,
) -> dict[str, Any]:
    columns: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("latents_ref", "latents_gen", "prompt_embeds", "pooled", "image_features", "q_ref", "q_gen")
    }
    indices: list[int] = []
    prompts: list[str] = []
    for lo in range(start, stop, batch_size):
        items = [dataset[i] for i in range(lo, min(stop, lo + batch_size))]
        n = len(items)
        ref = torch.stack([it["ref_pixels"] for it in items])
        gen = torch.stack([it["gen_pixels"] for it in items])
        batch_prompts = [it["prompt"] for it in items]
        latents = _as_rows("encode_images", encode_images(torch.cat([ref, gen])), 2 * n)
        embeds, pooled = encode_prompts(batch_prompts)
        columns["latents_ref"].append(latents[:n])
        columns["latents_gen"].append(latents[n:])
        columns["prompt_embeds"].append(_as_rows("encode_prompts", embeds, n))
        if pooled is not None:
            columns["pooled"].append(_as_rows("encode_prompts (pooled)", pooled, n))
        if encode_reference is not None:
            columns["image_features"].append(_as_rows("encode_reference", encode_reference(ref), n))
        columns["q_ref"].append(torch.stack([torch.as_tensor(it["q_ref"], dtype=torch.float32) for it in items]))
        columns["q_gen"].append(torch.stack([torch.as_tensor(it["q_gen"], dtype=torch.float32) for it in items]))
        indices += [int(it["index"]) for it in items]
        prompts += batch_prompts
        bar.update(n)
    tensors = {}
    for key, parts in columns.items():
        if parts:
            joined = torch.cat(parts)
            tensors[key] = joined.contiguous() if key in ("q_ref", "q_gen") else _cast(joined, storage)
    tensors["index"] = torch.tensor(indices, dtype=torch.int64)
    # one metadata key: safetensors writes several in a per-process random order, and identical builds must give
    # byte-identical shards (the item range is in index.json and the "index" tensor)
    metadata = {"prompts": json.dumps(prompts)}
    data = safetensors_save(tensors, metadata=metadata)
    name = f"shard_{shard:05d}.safetensors"
    _atomic_write(cache_dir / name, data)
    return {
        "shard": shard,
        "file": name,
        "start": start,
        "stop": stop,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def verify_input_cache(cache_dir: str | os.PathLike[str]) -> list[str]:
    """Check every file of a cache against its recorded size and SHA-256.

    Returns:
        One message per problem (missing or corrupted file, incomplete build); empty when the cache is sound.
    """
    cache_dir = Path(cache_dir)
    index = _read_index(cache_dir)
    if index is None:
        return [f"no input cache in {cache_dir} ({INDEX_NAME} missing)"]
    problems = []
    if not index.get("complete"):
        problems.append(f"input cache in {cache_dir} is incomplete")
    for entry in [*index["shards"], *([index["null"]] if index.get("null") else [])]:
        problem = _entry_problem(cache_dir, entry, verify=True)
        if problem:
            problems.append(problem)
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


class CachedPairDataset(Dataset):
    """Training items read from an input cache built by :func:`build_input_cache`.

    Items are dicts with ``latents_ref``, ``latents_gen``, ``prompt_embeds``, ``pooled`` (when cached),
    ``image_features`` (cache dtype), ``q_ref``, ``q_gen`` (float32), ``index`` (int) and ``prompt`` (str).
    Shards are opened lazily (memory-mapped) and only the requested rows are read; at most ``max_open_shards``
    stay open (least recently used closed first). Open handles are not pickled, so the dataset can be sent to
    DataLoader workers.

    Args:
        cache_dir: the cache folder.
        expected_fingerprint: refuse a cache built with another fingerprint (see :func:`cache_fingerprint`).
        verify: check each shard's SHA-256 the first time this process opens it (its size is always checked).
        max_open_shards: LRU size of open shard handles.

    Raises:
        CacheError: missing, incomplete or stale cache; a corrupted shard (on first access to it).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        expected_fingerprint: str | None = None,
        verify: bool = True,
        max_open_shards: int = 4,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        index = _read_index(self.cache_dir)
        if index is None:
            raise CacheError(f"no input cache in {self.cache_dir} ({INDEX_NAME} missing); build it first")
        if index.get("format") != CACHE_FORMAT_VERSION:
            raise CacheError(f"input cache in {self.cache_dir} has format {index.get('format')}, "
                             f"expected {CACHE_FORMAT_VERSION}; rebuild it")  # fmt: skip
        if expected_fingerprint is not None and index["fingerprint"] != expected_fingerprint:
            raise CacheError(
                f"input cache in {self.cache_dir} is stale: fingerprint {index['fingerprint'][:12]}..., "
                f"expected {expected_fingerprint[:12]}...; rebuild it"
            )
        if not index.get("complete"):
            raise CacheError(f"input cache in {self.cache_dir} is incomplete; run the cache build to finish it")
        self.index = index
        self.fingerprint: str = index["fingerprint"]
        self.shards: list[dict[str, Any]] = sorted(index["shards"], key=lambda e: e["start"])
        self._starts = [e["start"] for e in self.shards]
        self.verify = verify
        self.max_open_shards = max(1, max_open_shards)
        self._open: OrderedDict[int, tuple[Any, list[str], set[str]]] = OrderedDict()
        self._checked: set[int] = set()
        covered = sum(e["stop"] - e["start"] for e in self.shards)
        if covered != index["num_items"]:
            raise CacheError(f"input cache in {self.cache_dir} covers {covered} of {index['num_items']} items")

    def __len__(self) -> int:
        return int(self.index["num_items"])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def _check(self, entry: Mapping[str, Any], key: int) -> None:
        if key in self._checked:
            return
        problem = _entry_problem(self.cache_dir, entry, self.verify)
        if problem:
            raise CacheError(f"corrupted input cache: {problem}; rebuild it (the build redoes only bad shards)")
        self._checked.add(key)

    def _handle(self, shard_pos: int) -> tuple[Any, list[str], set[str]]:
        if shard_pos in self._open:
            self._open.move_to_end(shard_pos)
            return self._open[shard_pos]
        entry = self.shards[shard_pos]
        self._check(entry, shard_pos)
        handle = safe_open(str(self.cache_dir / entry["file"]), framework="pt")
        prompts = json.loads(handle.metadata().get("prompts", "[]"))
        self._open[shard_pos] = (handle, prompts, set(handle.keys()))
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return self._open[shard_pos]

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} cached pairs")
        index %= n
        pos = bisect.bisect_right(self._starts, index) - 1
        handle, prompts, keys = self._handle(pos)
        row = index - self.shards[pos]["start"]
        item: dict[str, Any] = {}
        for key in ("latents_ref", "latents_gen", "prompt_embeds", "pooled", "image_features", "q_ref", "q_gen"):
            if key in keys:
                item[key] = handle.get_slice(key)[row]
        item["index"] = int(handle.get_slice("index")[row])
        if prompts:
            item["prompt"] = prompts[row]
        return item

    def null_conditioning(self) -> dict[str, torch.Tensor]:
        """Unconditional inputs for conditioning dropout, each with a leading batch dim of 1:
        ``prompt_embeds`` and ``pooled`` of the empty prompt, ``image_features`` of the dropped image prompt."""
        entry = self.index.get("null")
        if not entry:
            raise CacheError(f"input cache in {self.cache_dir} has no null conditioning")
        self._check(entry, -1)
        from safetensors.torch import load_file

        return load_file(str(self.cache_dir / entry["file"]))
