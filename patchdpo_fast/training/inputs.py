"""From the training data to model inputs: the dataset (raw pairs or the input cache), the endless batch stream and
:class:`ModelInputs`, which turns a batch into latents, conditioning and quality maps on the training device."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from patchdpo_fast.config import TrainConfig
from patchdpo_fast.errors import UserError
from patchdpo_fast.training.distributed import DistEnv

__all__ = ["BatchStream", "ModelInputs", "build_data", "collate", "release_encoders"]


class BatchStream(torch.utils.data.Sampler[list[int]]):
    """Endless stream of index batches drawn from a resumable sampler, crossing epochs without dropping items."""

    def __init__(self, sampler: Any, batch_size: int) -> None:
        self.sampler = sampler
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        def indices() -> Iterator[int]:
            while True:
                yield from iter(self.sampler)

        stream = indices()
        while True:
            yield [next(stream) for _ in range(self.batch_size)]


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensors of dataset items; integers become a list of ints, anything else a list."""
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], (int, np.integer)):
            out[key] = [int(v) for v in values]
        else:
            out[key] = values
    return out


class ModelInputs:
    """Turns a data batch into model inputs, from the input cache or by running the encoders (per step).

    ``__call__(batch, step)`` returns ``lat_ref`` / ``lat_gen`` (VAE latents of the two images of each pair),
    ``embeds`` / ``pooled`` (text conditioning; ``pooled`` is None for an SD1.5-class UNet), ``feats`` (the image
    prompt's features; None without an IP-Adapter) and the quality maps ``q_ref`` / ``q_gen``. ``null`` holds the
    conditioning of an empty prompt / image, which the dropout of :func:`~patchdpo_fast.training.batch.apply_dropout`
    substitutes.
    """

    def __init__(self, cfg: TrainConfig, models: Any, env: DistEnv, cached: Any | None) -> None:
        self.cfg = cfg
        self.models = models
        self.env = env
        self.cached = cached
        if cached is not None:
            null = cached.null_conditioning()
        else:
            with torch.no_grad():
                embeds, pooled = models.encode_prompts([""])
                feats = models.null_image_features() if models.ip_unet.has_ip_adapter else None
                null = {"prompt_embeds": embeds, "pooled": pooled, "image_features": feats}
        # "pooled" is absent or None for an SD1.5-class UNet (no added conditioning)
        self.null = {k: v.to(env.device) for k, v in null.items() if v is not None}

    def __call__(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        dev = self.env.device
        if self.cached is not None:
            lat_ref, lat_gen = batch["latents_ref"].to(dev).float(), batch["latents_gen"].to(dev).float()
            embeds, pooled = batch["prompt_embeds"].to(dev), batch.get("pooled")
            pooled = None if pooled is None else pooled.to(dev)
            feats = batch.get("image_features")  # absent without an IP-Adapter (model.use_ip_adapter=false)
            feats = None if feats is None else feats.to(dev)
        else:
            with torch.no_grad():
                gen = torch.Generator(device=self.models.device).manual_seed(
                    self.cfg.train.seed * 1_000_003 + step * 101 + self.env.rank
                )
                pixels = torch.cat([batch["ref_pixels"], batch["gen_pixels"]]).to(dev)
                latents = self.models.encode_images(pixels * 2 - 1, generator=gen)
                lat_ref, lat_gen = latents.chunk(2)
                embeds, pooled = self.models.encode_prompts(batch["prompt"])
                feats = None
                if self.models.ip_unet.has_ip_adapter:
                    feats = self.models.encode_reference_images(batch["ref_pixels"].to(dev))
        return {
            "lat_ref": lat_ref,
            "lat_gen": lat_gen,
            "embeds": embeds,
            "pooled": pooled,
            "feats": feats,
            "q_ref": batch["q_ref"].to(dev),
            "q_gen": batch["q_gen"].to(dev),
        }


def build_data(cfg: TrainConfig, models: Any, env: DistEnv) -> tuple[Any, Any | None]:
    """The training dataset (cached features or raw pairs) and the cache handle (None without a cache).

    With ``cache.enabled`` rank 0 builds (or reuses) the input cache while the other ranks wait; the encoders are then
    released unless sample grids need them.
    """
    from patchdpo_fast.data import CachedPairDataset, build_input_cache, build_pair_dataset
    from patchdpo_fast.data.cache_settings import input_cache_settings

    raw = build_pair_dataset(cfg.data, needs_quality=cfg.loss.effective_weight_mode != "uniform")
    preference = int(getattr(raw, "num_preference_pairs", 0))
    if preference and cfg.model.use_ip_adapter:
        raise UserError(
            f"data.manifest_path {cfg.data.manifest_path} holds {preference} plain preference pair(s) (winner/loser, "
            "no reference photo): an IP-Adapter would take the winner itself as its image prompt. Train them without "
            "one: model.use_ip_adapter=false with model.trainable unet_lora or unet (docs/data.md)"
        )
    if not cfg.cache.enabled:
        return raw, None
    # exactly what the cached tensors depend on: encoder weights and dtypes, resolution, preprocessing (the data,
    # the quality-map grid and the storage layout come from the dataset and the cache options)
    settings = input_cache_settings(cfg)
    if env.is_main:  # one process encodes; the others wait for the finished cache
        build_input_cache(
            raw,
            cfg.cache.dir,
            encode_images=lambda p: models.encode_images(p.to(models.device) * 2 - 1, sample=True),
            encode_prompts=models.encode_prompts,
            encode_reference=(lambda p: models.encode_reference_images(p.to(models.device)))
            if models.ip_unet.has_ip_adapter
            else None,
            settings=settings,
            shard_size=cfg.cache.shard_size,
            batch_size=cfg.cache.encode_batch_size,
            dtype=getattr(torch, cfg.cache.dtype),
            on_stale=cfg.cache.on_stale,
            progress=True,
            encode_null_image=models.null_image_features if models.ip_unet.has_ip_adapter else None,
        )
    env.barrier()
    cached = CachedPairDataset(cfg.cache.dir)
    if cfg.samples.references is None:  # sample grids (samples.references) draw with the encoders
        release_encoders(models, env)  # the cache serves every input: latents, text and image conditioning, maps
    return cached, cached


def release_encoders(models: Any, env: DistEnv) -> None:
    """With the input cache built, nothing calls the VAE or the text/image encoders again: drop them.

    On every device, the CPU included: for an fp32 SDXL-size run the encoders' ~6 GB are what keeps a step from
    fitting next to the UNet.
    """
    models.release_encoders()
    gc.collect()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
