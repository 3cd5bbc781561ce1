"""Training pair data: a built-in procedural pair set, on-disk pairs, a resumable sampler and the input cache.

* :mod:`~patchdpo_fast.data.procedural` – deterministic synthetic (reference, generated, prompt, quality maps) pairs.
* :mod:`~patchdpo_fast.data.dataset` – pair datasets, validating image / quality-map loaders, :class:`ResumableSampler`.
* :mod:`~patchdpo_fast.data.cache` – encode once into safetensors shards, then train from :class:`CachedPairDataset`.
"""

from patchdpo_fast.data.cache import (
    CACHE_FORMAT_VERSION,
    CachedPairDataset,
    CacheError,
    build_input_cache,
    cache_fingerprint,
    verify_input_cache,
)
from patchdpo_fast.data.dataset import (
    OnDiskPairDataset,
    PairRecord,
    ProceduralPairDataset,
    ResumableSampler,
    build_pair_dataset,
    load_image,
    load_quality_map,
    read_manifest,
)
from patchdpo_fast.data.procedural import ProceduralPair, ProceduralPairs

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CacheError",
    "CachedPairDataset",
    "OnDiskPairDataset",
    "PairRecord",
    "ProceduralPair",
    "ProceduralPairDataset",
    "ProceduralPairs",
    "ResumableSampler",
    "build_input_cache",
    "build_pair_dataset",
    "cache_fingerprint",
    "load_image",
    "load_quality_map",
    "read_manifest",
    "verify_input_cache",
]
