"""Training pair data: the dataset manifest, pair construction, the procedural demo set, datasets and the input cache.

* :mod:`~patchdpo_fast.data.manifest` – the versioned, validated JSONL manifest (:class:`Manifest`), see
  ``docs/data.md``.
* :mod:`~patchdpo_fast.data.build_pairs` – ``patchdpo build-pairs``: generate pairs with the pre-trained model.
* :mod:`~patchdpo_fast.data.import_official` – ``patchdpo import-official``: the official PatchDPO layout.
* :mod:`~patchdpo_fast.data.procedural` – deterministic synthetic pairs, in memory or written as a manifest.
* :mod:`~patchdpo_fast.data.dataset` – pair datasets (:class:`ManifestPairDataset`, ...), :class:`ResumableSampler`.
* :mod:`~patchdpo_fast.data.files` – validating image / quality-map readers and atomic writers.
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
    ManifestPairDataset,
    OnDiskPairDataset,
    PairRecord,
    ProceduralPairDataset,
    ResumableSampler,
    adapt_quality_map,
    build_pair_dataset,
    read_manifest,
)
from patchdpo_fast.data.files import (
    load_image,
    load_quality_map,
    probe_quality_map,
    read_quality_array,
    save_image_atomic,
    write_quality_map,
)
from patchdpo_fast.data.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    GeneratedImage,
    Manifest,
    ManifestError,
    ManifestPair,
    ManifestProblem,
    ManifestRecord,
    ValidationReport,
    is_manifest_file,
    merge_manifests,
)
from patchdpo_fast.data.procedural import ProceduralPair, ProceduralPairs, write_procedural_manifest

__all__ = [
    "CACHE_FORMAT_VERSION",
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "CacheError",
    "CachedPairDataset",
    "GeneratedImage",
    "Manifest",
    "ManifestError",
    "ManifestPair",
    "ManifestPairDataset",
    "ManifestProblem",
    "ManifestRecord",
    "OnDiskPairDataset",
    "PairRecord",
    "ProceduralPair",
    "ProceduralPairDataset",
    "ProceduralPairs",
    "ResumableSampler",
    "ValidationReport",
    "adapt_quality_map",
    "build_input_cache",
    "build_pair_dataset",
    "cache_fingerprint",
    "is_manifest_file",
    "load_image",
    "load_quality_map",
    "merge_manifests",
    "probe_quality_map",
    "read_manifest",
    "read_quality_array",
    "save_image_atomic",
    "verify_input_cache",
    "write_procedural_manifest",
    "write_quality_map",
]
