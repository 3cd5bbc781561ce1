"""What the input cache of a training run depends on, from its config: the encoder part of the cache fingerprint.

The cached tensors (:mod:`patchdpo_fast.data.cache`) are the VAE latents of both images, the text conditioning of
the prompt, the CLIP image features of the reference image and the quality maps. They depend on, and the
fingerprint holds, exactly:

* the data: the pair dataset's own ``fingerprint()`` (pairs, their files, resolution, quality-map grid);
* the encoder weights: per component (``vae``, ``text_encoder`` + ``tokenizer``, ``text_encoder_2`` +
  ``tokenizer_2``, ``image_encoder``) the tiny model's seed, or the folder it loads from with the name, size and
  modification time of every file in it (the convention the manifest fingerprint uses for data files);
* the encoders' dtypes: the VAE always runs in fp32, the text and image encoders in ``train.mixed_precision``'s;
* the resolution and the preprocessing (VAE posterior sample scaled by the VAE's factor, the CLIP resize / crop /
  normalization, the null conditioning), versioned by :data:`PREPROCESSING_VERSION`;
* the storage layout: ``cache.dtype`` and ``cache.shard_size``.

Nothing else: UNet and adapter settings (``model.gradient_checkpointing``, ``attention_backend``, ``ip_scale``,
``num_ip_tokens``, ``train_resampler``, ``ip_adapter_path``), the loss, the optimizer and the loop leave a cache
valid. :func:`~patchdpo_fast.data.cache.build_input_cache` names every setting that differs when it finds a stale
cache.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from patchdpo_fast.config import TrainConfig

__all__ = ["PREPROCESSING_VERSION", "input_cache_fingerprint", "input_cache_settings"]

#: Bump when the code that turns pixels and prompts into cached tensors changes what it computes.
PREPROCESSING_VERSION = 2  # 2: a dropped image prompt is the image encoder on an all-zero input

_ENCODER_DTYPES = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _folder_identity(folder: Path) -> dict[str, Any]:
    """A local weights folder: its resolved path and (relative name, size, mtime_ns) of every file under it."""
    folder = Path(folder)
    files = []
    if folder.is_dir():
        for root, dirs, names in os.walk(folder, followlinks=True):
            dirs.sort()
            for name in sorted(names):
                path = Path(root) / name
                try:
                    stat = path.stat()
                except OSError:
                    continue
                files.append([path.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns])
    return {"folder": str(folder.resolve()), "files": files if folder.is_dir() else None}


def input_cache_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The encoder settings of ``cfg`` that the cached tensors depend on (see the module docstring).

    Keys: ``vae``, ``text_encoder``, ``text_encoder_2``, ``image_encoder`` (each ``weights`` and ``dtype``, text
    encoders also ``tokenizer``), ``resolution`` and ``preprocessing``. Given to
    :func:`~patchdpo_fast.data.cache.build_input_cache` as ``settings``, so they appear as ``encoders.<key>`` in
    the fingerprint and in the stale-cache message.
    """
    m = cfg.model
    dtype = _ENCODER_DTYPES[cfg.train.mixed_precision]

    # the tiny SD1.5 model has other encoder weights than the tiny SDXL one (recorded only for it, so the caches of
    # tiny SDXL runs keep their fingerprints)
    tiny_id = {"tiny_seed": m.tiny_seed, **({"tiny_architecture": m.tiny_architecture} if m.tiny_architecture != "sdxl"
                                            else {})}  # fmt: skip

    def weights(sub: str) -> dict[str, Any]:
        if m.tiny:
            return dict(tiny_id)
        return _folder_identity(Path(m.pretrained_path) / sub)

    image = None  # no IP-Adapter (model.use_ip_adapter=false): no image encoder, no image features cached
    if m.use_ip_adapter:
        image = dict(tiny_id) if m.tiny else _folder_identity(Path(m.image_encoder_path))
    second = {"weights": weights("text_encoder_2"), "tokenizer": weights("tokenizer_2"), "dtype": dtype}
    if m.tiny and m.tiny_architecture == "sd15":
        second = None  # one text encoder (a pretrained SD1.5 folder records its absent text_encoder_2/ as such)
    return {
        "vae": {"weights": weights("vae"), "dtype": "float32"},
        "text_encoder": {"weights": weights("text_encoder"), "tokenizer": weights("tokenizer"), "dtype": dtype},
        "text_encoder_2": second,
        "image_encoder": {"weights": image, "dtype": dtype} if image is not None else None,
        "resolution": cfg.data.resolution,
        "preprocessing": {
            "version": PREPROCESSING_VERSION,
            "latents": "VAE posterior sample of pixels in [-1, 1], times the VAE scaling factor",
            "image_features": "CLIP penultimate hidden states; shorter side resized (bicubic, antialiased) to the "
            "encoder's size, center crop, CLIP mean/std",
            "null_conditioning": "empty prompt; image encoder on an all-zero input (IP-Adapter's dropped image)",
        },
    }


def input_cache_fingerprint(cfg: TrainConfig, dataset: Dataset | None = None) -> tuple[str, dict[str, Any]]:
    """``(sha256, described)`` of the input cache that ``cfg`` builds, without building models or the cache.

    ``dataset`` defaults to the run's pair dataset (:func:`~patchdpo_fast.data.build_pair_dataset`).
    """
    import torch

    from patchdpo_fast.data.cache import cache_fingerprint
    from patchdpo_fast.data.dataset import build_pair_dataset

    if dataset is None:
        dataset = build_pair_dataset(cfg.data, needs_quality=cfg.loss.effective_weight_mode != "uniform")
    return cache_fingerprint(
        dataset, input_cache_settings(cfg), shard_size=cfg.cache.shard_size, dtype=getattr(torch, cfg.cache.dtype)
    )
