"""PatchDPO training of IP-Adapter-Plus on SDXL: one CPU for the tiny default, many GPUs at SDXL scale.

Launch::

    python -m patchdpo_fast.train --config configs/tiny_cpu.yaml              # single process
    patchdpo train --config configs/tiny_cpu.yaml --set train.max_steps=10   # same, through the CLI
    torchrun --nproc_per_node 8 -m patchdpo_fast.train --config ...          # plain DDP
    deepspeed --num_gpus 8 patchdpo_fast/train.py --config configs/sdxl_ipadapter_plus.yaml   # DeepSpeed ZeRO

Each optimizer step: B pairs per rank (reference image = winner, generated image = loser) share noise, timestep and
conditioning; the policy adapter predicts the noise for both, the frozen reference adapter too for the DPO losses,
and the fused loss ops of :mod:`patchdpo_fast.ops` weight the error maps with the pairs' quality maps. Checkpoints
are atomic and pickle-free; ``--resume`` continues bit-exactly on the CPU; the result is an IP-Adapter safetensors
file that stock diffusers loads with ``pipeline.load_ip_adapter``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchdpo_fast.config import (
    TrainConfig,
    config_to_dict,
    dump_config,
    load_config,
    resolve_deepspeed_config,
)
from patchdpo_fast.errors import UserError
from patchdpo_fast.training.batch import apply_dropout, compute_loss, draw_pair_noise, loss_weights, order_pairs
from patchdpo_fast.training.checkpoint import (
    CheckpointDir,
    CheckpointError,
    checkpoint_run_id,
    find_checkpoint,
    list_checkpoints,
    new_run_id,
    prune_checkpoints,
    quarantine_checkpoint,
    trainer_state_problems,
    verify_checkpoint,
)
from patchdpo_fast.training.distributed import DistEnv, setup_distributed
from patchdpo_fast.training.ema import EMA_FILE, EMAWeights, build_ema
from patchdpo_fast.training.export import EXPORT_DTYPES, export_run
from patchdpo_fast.training.memory import log_startup_plan
from patchdpo_fast.training.metrics import MetricsLogger
from patchdpo_fast.training.optim import build_lr_scheduler, build_optimizer
from patchdpo_fast.training.resume import apply_optimizer_settings, check_resume_config
from patchdpo_fast.training.state_io import atomic_write_json, load_state, save_state
from patchdpo_fast.training.trainable import TrainableMode, TrainableSetup, setup_trainable
from patchdpo_fast.utils import write_safetensors

__all__ = ["TrainResult", "main", "train"]

logger = logging.getLogger("patchdpo_fast.train")

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_EXPORT_DTYPES = EXPORT_DTYPES  # the export dtypes (patchdpo_fast.training.export)


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    adapter_path: Path | None
    final_step: int
    nan_skips: int
    last_checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    fixed_batch_loss_start: float | None = None  #: see :func:`fixed_batch_loss`
    fixed_batch_loss_end: float | None = None


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


class _BatchStream(torch.utils.data.Sampler[list[int]]):
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


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
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


class _Inputs:
    """Turns a data batch into model inputs, from the input cache or by running the encoders (per step)."""

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


def _build_data(cfg: TrainConfig, models: Any, env: DistEnv) -> tuple[Any, Any | None]:
    """The training dataset (cached features or raw pairs) and the cache handle (None without a cache)."""
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
        _release_encoders(models, env)  # the cache serves every input: latents, text and image conditioning, maps
    return cached, cached


def _release_encoders(models: Any, env: DistEnv) -> None:
    """With the input cache built, nothing calls the VAE or the text/image encoders again: drop them.

    On every device, the CPU included: for an fp32 SDXL-size run the encoders' ~6 GB are what keeps a step from
    fitting next to the UNet.
    """
    models.release_encoders()
    gc.collect()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# Models and engine
# ---------------------------------------------------------------------------------------------------------------


def _build_models(cfg: TrainConfig, env: DistEnv) -> Any:
    from patchdpo_fast.models import build_models

    m = cfg.model
    models = build_models(
        tiny=m.tiny,
        seed=m.tiny_seed,
        tiny_architecture=m.tiny_architecture,
        prediction_type=m.prediction_type,
        use_ip_adapter=m.use_ip_adapter,
        pretrained_model_path=m.pretrained_path,
        image_encoder_path=m.image_encoder_path,
        ip_adapter_path=m.ip_adapter_path,
        weight_dtype=_DTYPES[cfg.train.mixed_precision],
        device=env.device,
        train_resampler=m.train_resampler,
        attention_backend=m.attention_backend,
        xformers_fallback=m.xformers_fallback,
        ip_scale=m.ip_scale,
        num_ip_tokens=m.num_ip_tokens,
        gradient_checkpointing=m.gradient_checkpointing,
        # what trains; only the DPO losses with a training adapter read the in-module reference adapter
        **TrainableMode.from_config(m).build_kwargs(cfg.loss.uses_reference_model),
    )
    return models


def _reference_record(cfg: TrainConfig, models: Any) -> dict[str, Any] | None:
    """What the DPO reference adapter is, for checkpoints: the initial adapter, where it came from and its SHA-256.

    The reference never changes during a run, so checkpoints store this record instead of its weights; a resumed run
    rebuilds the same initial adapter from its configuration and :func:`_check_reference` compares the hashes.
    ``None`` when the loss needs no reference.
    """
    sha256 = models.ip_unet.reference_fingerprint()
    if sha256 is None:
        return None
    m = cfg.model
    origin: dict[str, Any] = {"ip_adapter_path": str(m.ip_adapter_path) if m.ip_adapter_path else None,
                              "train_resampler": m.train_resampler, "num_ip_tokens": m.num_ip_tokens}  # fmt: skip
    if m.tiny:
        origin.update(tiny=True, tiny_seed=m.tiny_seed)
    else:
        origin.update(pretrained_path=str(m.pretrained_path))
    return {"kind": "initial adapter", "sha256": sha256, "origin": origin}


def _check_reference(path: Path, stored: dict[str, Any] | None, current: dict[str, Any] | None) -> None:
    """Refuse to resume a DPO run against another reference adapter than the one its checkpoint was trained with."""
    if stored is None or current is None or stored.get("sha256") == current["sha256"]:
        return
    raise UserError(
        f"checkpoint {path} was trained against the reference adapter {stored['sha256'][:16]}... built from "
        f"{stored.get('origin')}, but this configuration builds the reference {current['sha256'][:16]}... from "
        f"{current['origin']}. The DPO reference is the run's initial adapter and is not stored in checkpoints: "
        "resume with the model settings and the unchanged weight files that started the run"
    )


def _build_engine(cfg: TrainConfig, models: Any, env: DistEnv, trainable: TrainableSetup | None = None) -> Any:
    from patchdpo_fast.training.engine import DeepSpeedEngine, PlainEngine

    o, t = cfg.optim, cfg.train
    module = models.ip_unet
    ds_config = resolve_deepspeed_config(cfg, env.world_size)
    if ds_config is None:
        optimizer = build_optimizer(module.parameters(), o.optimizer, o.lr, o.weight_decay, tuple(o.betas), o.eps)
        scheduler = build_lr_scheduler(optimizer, o.warmup_steps, t.max_steps, o.lr_schedule)
        reference = trainable.wrap_reference(None) if trainable is not None else None
        return PlainEngine(module, optimizer, scheduler, env, t.gradient_accumulation_steps, o.max_grad_norm,
                           t.mixed_precision, reference=reference)  # fmt: skip
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = build_optimizer(module.parameters(), o.optimizer, o.lr, o.weight_decay, tuple(o.betas), o.eps)
        ds_config.setdefault("zero_allow_untested_optimizer", True)
    engine = DeepSpeedEngine(
        module,
        optimizer,
        lambda opt: build_lr_scheduler(opt, o.warmup_steps, t.max_steps, o.lr_schedule),
        ds_config,
        env,
    )
    if trainable is not None:  # after the policy: ZeRO-3 shards the frozen reference UNet like it
        engine.reference = trainable.wrap_reference(ds_config)
    return engine


# ---------------------------------------------------------------------------------------------------------------
# Run ownership and resume checks
# ---------------------------------------------------------------------------------------------------------------


class RunFolderError(UserError):
    """A fresh run was pointed at an output folder that holds another run's checkpoints."""


@dataclass
class _Run:
    """This run's identity (the run id recorded in its checkpoints) and what ``--resume`` found.

    Only rank 0 writes checkpoint manifests and prunes, so only its run id matters in a multi-rank job.
    """

    run_id: str
    checkpoint: Path | None = None
    changed: list[Any] = field(default_factory=list)  #: applied setting changes (resume.SettingChange)
    fixed_batch_loss_start: float | None = None

    def trainer_fields(self) -> dict[str, Any]:
        """What each checkpoint's trainer state records about the run."""
        return {"run_id": self.run_id, "fixed_batch_loss_start": self.fixed_batch_loss_start}

    def resumed(self, trainer: dict[str, Any], engine: Any, cfg: TrainConfig) -> None:
        """After the checkpoint's state is loaded: re-apply changed optimizer settings, keep the run's start loss."""
        value = trainer.get("fixed_batch_loss_start")
        self.fixed_batch_loss_start = None if value is None else float(value)
        keys = {change.key for change in self.changed}
        if keys:
            scheduler = getattr(engine, "scheduler", None)
            optimizer = scheduler.optimizer if scheduler is not None else engine.optimizer
            apply_optimizer_settings(optimizer, scheduler, cfg, keys)


def _saved_config(ckpt: Path, strict: bool = True) -> dict[str, Any] | None:
    import yaml

    file = ckpt / "config.yaml"
    if not file.is_file():
        return None
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        if not strict:
            return None
        raise CheckpointError(f"{file}: cannot read the checkpoint's config ({exc})") from None
    return data if isinstance(data, dict) else None


def _remove_previous_run(out_dir: Path, root: Path, existing: list[tuple[int, Path]]) -> None:
    """``--overwrite``: delete the checkpoints and run outputs of the run that owned ``out_dir``."""
    removed = []
    if root.exists():
        shutil.rmtree(root)
        removed.append(f"{len(existing)} checkpoint(s) up to {existing[-1][1].name}")
    for name in ("ip_adapter.safetensors", "unet", "unet_lora", "summary.json", "metrics.jsonl", "run.json",
                 "tensorboard"):  # fmt: skip
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    logger.warning("--overwrite: removed the previous run from %s: %s", out_dir, ", ".join(removed))


def _checkpoint_problems(ckpt: Path, env: DistEnv) -> list[str]:
    """This rank's share of the checks of a checkpoint: file checksums, then (rank 0) the trainer counters."""
    problems = verify_checkpoint(ckpt, rank=env.rank if env.distributed else None)
    if not problems and env.is_main:
        saved = _saved_config(ckpt, strict=False) or {}
        data, loop = saved.get("data") or {}, saved.get("train") or {}
        per_step = None
        if isinstance(data.get("pairs_per_batch"), int) and isinstance(loop.get("gradient_accumulation_steps"), int):
            per_step = data["pairs_per_batch"] * loop["gradient_accumulation_steps"]
        problems = trainer_state_problems(ckpt, per_step)
    return problems


def _select_checkpoint(out_dir: Path, resume: str, env: DistEnv) -> Path | None:
    """The checkpoint to resume: the one given (it must be intact) or, for ``latest``, the newest intact one.

    A corrupt newest checkpoint (a file missing, truncated or altered, nonsense counters) is skipped with a warning
    naming the file and moved aside (``step_N.corrupt``), so the run continues from the previous intact one.
    """
    if resume != "latest":
        ckpt = find_checkpoint(out_dir, resume)
        problems = _checkpoint_problems(ckpt, env)
        if env.any(bool(problems)):
            raise CheckpointError(f"cannot resume {ckpt}: " + "; ".join(problems or ["a file failed its check"]))
        return ckpt
    candidates = [path for _, path in reversed(list_checkpoints(out_dir / "checkpoints"))]
    for ckpt in candidates:
        problems = _checkpoint_problems(ckpt, env)
        if not env.any(bool(problems)):
            return ckpt
        env.barrier()  # every rank has checked before rank 0 moves the checkpoint away
        if env.is_main:
            aside = quarantine_checkpoint(ckpt)
            logger.warning("skipping corrupt checkpoint %s (moved to %s): %s", ckpt, aside.name,
                           "; ".join(problems or ["a file failed its check on another rank"]))  # fmt: skip
        env.barrier()
    if candidates:
        raise CheckpointError(
            f"no intact checkpoint in {out_dir / 'checkpoints'}: all {len(candidates)} failed their checks (see the "
            "warnings above; they were moved aside as step_N.corrupt)"
        )
    return None


@contextlib.contextmanager
def _reading_checkpoint(path: Path) -> Iterator[None]:
    """Turn a failure to load a (verified) checkpoint into a :class:`CheckpointError` naming it."""
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load checkpoint {path}: {exc}") from exc


def _check_before_loading(cfg: TrainConfig, env: DistEnv) -> None:
    """Settings that can only be checked on this machine, checked before any model loads."""
    from patchdpo_fast.ops.dispatch import BACKENDS

    if cfg.loss.backend == "triton":
        reason = BACKENDS["triton"].unsupported_reason(env.device, {torch.float32})
        if reason is not None:
            raise UserError(f"loss.backend=triton cannot run here: {reason}; use loss.backend=auto or torch")
    if cfg.model.ip_adapter_path is not None:
        from patchdpo_fast.models.checks import check_ip_adapter_file

        check_ip_adapter_file(cfg.model.ip_adapter_path, "model.ip_adapter_path")
    if cfg.cache.enabled and Path(cfg.cache.dir).exists() and not Path(cfg.cache.dir).is_dir():
        raise UserError(f"cache.dir {cfg.cache.dir} is a file; expected a folder (created when missing)")


def _claim_output_dir(cfg: TrainConfig, env: DistEnv, resume: str | None, overwrite: bool) -> _Run:
    """Find the checkpoint to resume (checking its settings) or make sure a fresh run owns its output folder."""
    out_dir = Path(cfg.train.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"train.output_dir {out_dir} is a file; expected a folder (created when missing)")
    root = out_dir / "checkpoints"
    ckpt = _select_checkpoint(out_dir, resume, env) if resume else None
    if ckpt is not None:
        saved = _saved_config(ckpt)
        changed = check_resume_config(saved, config_to_dict(cfg), str(ckpt)) if saved is not None else []
        if env.is_main:
            if saved is None:
                logger.warning("%s has no config.yaml: the resumed settings cannot be checked", ckpt)
            for change in changed:
                logger.warning("resume: setting changed since the checkpoint, applied: %s", change)
        run = _Run(checkpoint_run_id(ckpt) or new_run_id(), ckpt, changed)
    else:
        if resume is not None and env.is_main:
            logger.warning("--resume: no checkpoint in %s; starting a fresh run", root)
        existing = list_checkpoints(root)
        if existing and not overwrite:
            raise RunFolderError(
                f"train.output_dir {out_dir} already holds {len(existing)} checkpoint(s) of another run (newest: "
                f"{existing[-1][1]}); continue it with --resume, choose another train.output_dir, or pass "
                "--overwrite to delete that run's checkpoints and outputs"
            )
        env.barrier()  # every rank has looked before rank 0 deletes
        if existing and env.is_main:
            _remove_previous_run(out_dir, root, existing)
        run = _Run(new_run_id())
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "run.json", {"run_id": run.run_id, "resumed_from": str(ckpt) if ckpt else None})
    env.barrier()
    return run


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [
            torch.from_numpy(v.astype(np.int64)) if isinstance(v, np.ndarray) else v
            for v in np.random.get_state(legacy=True)
        ],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(
    cfg: TrainConfig, env: DistEnv, engine: Any, models: Any, step: int, consumed: int, nan_skips: int, run: _Run,
    reference: dict[str, Any] | None = None, trainable: TrainableSetup | None = None, ema: EMAWeights | None = None,
) -> Path:  # fmt: skip
    root = Path(cfg.train.output_dir) / "checkpoints"
    ckpt = CheckpointDir(root, step, run.run_id)
    if env.is_main:
        ckpt.begin()
    env.barrier()
    global_state, rank_state = engine.state()  # collective for DeepSpeed
    with engine.gathered():
        adapter = models.adapter_state_dict() if env.is_main else None
        # the UNet side of the mode (unet.safetensors, unet_lora.safetensors); the reference is never stored
        unet_files = trainable.checkpoint_tensors(models.ip_unet) if env.is_main and trainable is not None else {}
    if rank_state is not None:
        save_state(rank_state, ckpt.tmp / f"engine_rank{env.rank}")
        ckpt.record_digests([f"engine_rank{env.rank}.json", f"engine_rank{env.rank}.safetensors"], f"rank{env.rank}")
    if env.is_main:
        # the policy only, straight from the weights (no copy); the reference adapter is recorded, not stored
        meta = {"reference": json.dumps(reference)} if reference is not None else None
        write_safetensors(adapter, ckpt.tmp / "adapter.safetensors", metadata=meta)
        for name, tensors in unet_files.items():
            write_safetensors(tensors, ckpt.tmp / name)
        if ema is not None:
            write_safetensors(ema.state_dict(), ckpt.tmp / EMA_FILE)
        save_state(
            {
                "engine": global_state,
                "rng": _rng_state(),
                "step": step,
                "consumed_per_rank": consumed,
                "nan_skips": nan_skips,
                "world_size": env.world_size,
                **run.trainer_fields(),
            },
            ckpt.tmp / "trainer",
        )
        dump_config(cfg, ckpt.tmp / "config.yaml")
    env.barrier()
    if env.is_main:
        ckpt.commit()
        for gone in prune_checkpoints(root, cfg.train.keep_checkpoints, run.run_id):
            logger.debug("pruned checkpoint %s", gone)
    env.barrier()
    return ckpt.final


def _load_checkpoint(path: Path, env: DistEnv, engine: Any, ema: EMAWeights | None = None) -> dict[str, Any]:
    trainer = load_state(path / "trainer")
    if ema is not None:
        from safetensors.torch import load_file

        if not (path / EMA_FILE).is_file():
            raise FileNotFoundError(f"checkpoint {path} has no {EMA_FILE}, but optim.use_ema is true")
        ema.load_state_dict(load_file(str(path / EMA_FILE)))
    rank_file = path / f"engine_rank{env.rank}"
    rank_state = load_state(rank_file) if rank_file.with_suffix(".json").exists() else None
    engine.load_state(trainer["engine"], rank_state)
    _set_rng_state(trainer["rng"])
    return trainer


def _load_adapter_weights(
    path: Path, models: Any, reference: dict[str, Any] | None, trainable: TrainableSetup | None = None
) -> dict[str, Any] | None:
    """Load a checkpoint's policy adapter (and the UNet side of ``trainable``'s mode: the UNet or its LoRA) after
    checking its reference record; returns the run's reference record.

    Checkpoints written before the reference was left out hold its weights: they are loaded into the reference.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = path / "adapter.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no adapter.safetensors")
    with safe_open(str(file), framework="pt") as handle:
        stored = json.loads((handle.metadata() or {}).get("reference", "null"))
    _check_reference(path, stored, reference)
    if trainable is not None:
        trainable.load_checkpoint(path, models.ip_unet)
    if models.load_adapter_state_dict(load_file(str(file))):  # an older checkpoint that stored the reference
        return None if reference is None else {**reference, "sha256": models.ip_unet.reference_fingerprint()}
    return reference


def _forward_loss(cfg: TrainConfig, models: Any, engine: Any, inputs: _Inputs, x: dict[str, torch.Tensor], rnd: Any,
                  train: bool) -> Any:  # fmt: skip
    """Noise both images of each pair identically, run the policy (and reference) and compute the loss.

    ``loss.type=reconstruction`` denoises only the generated (target) images; ``loss.pair_order=generated_wins``
    puts the generated images (and their maps) first, as winners.
    """
    dev, l_cfg = inputs.env.device, cfg.loss
    b = x["lat_ref"].shape[0]
    reps = 1 if l_cfg.type == "reconstruction" else 2
    noise = rnd.noise.to(dev).repeat(reps, 1, 1, 1)
    t = rnd.timesteps.to(dev).repeat(reps)
    latents, q_win, q_lose = order_pairs(
        l_cfg.type, l_cfg.pair_order, x["lat_ref"], x["lat_gen"], x["q_ref"], x["q_gen"]
    )
    sched = models.noise_scheduler
    noisy = sched.add_noise(latents, noise, t)
    target = sched.get_velocity(latents, noise, t) if sched.config.prediction_type == "v_prediction" else noise
    embeds = apply_dropout(x["embeds"], inputs.null["prompt_embeds"], rnd.drop_text).repeat(reps, 1, 1)
    feats = None  # no IP-Adapter (model.use_ip_adapter=false): text-only conditioning
    if x["feats"] is not None:
        feats = apply_dropout(x["feats"], inputs.null["image_features"], rnd.drop_image).repeat(reps, 1, 1)
    pooled = time_ids = None  # SD1.5-class UNets take no added conditioning (read from the UNet's config)
    if models.added_conditioning:
        pooled = apply_dropout(x["pooled"], inputs.null["pooled"], rnd.drop_text).repeat(reps, 1)
        time_ids = models.add_time_ids(reps * b, cfg.data.resolution).to(dev)
    args = (noisy, t, embeds, pooled, time_ids, feats)
    if train:
        pred = engine.forward(*args)
    else:
        with torch.no_grad():
            pred = engine.module(*args, use_reference=False)
    if l_cfg.type == "reconstruction":
        return compute_loss("mse", pred, target, None, None, l_cfg.beta, l_cfg.backend)
    ref_pred = engine.reference_forward(*args) if l_cfg.uses_reference_model else None
    if ref_pred is not None and ref_pred.dtype != pred.dtype:  # a reference UNet kept in a cheaper dtype
        ref_pred = ref_pred.to(pred.dtype)
    weight = loss_weights(l_cfg.type, l_cfg.effective_weight_mode, q_win, q_lose, tuple(pred.shape[-2:]))
    return compute_loss(l_cfg.type, pred, target, ref_pred, weight, l_cfg.beta, l_cfg.backend)


def fixed_batch_loss(cfg: TrainConfig, models: Any, engine: Any, inputs: _Inputs, dataset: Any) -> float:
    """The configured loss on the first pairs of the dataset with fixed noise, timesteps and no dropout.

    Logged at the start and the end of a run: the same number before and after training shows whether the run
    learned. For the DPO losses it starts at log 2 (policy = reference).
    """
    indices = list(range(min(len(dataset), max(2, cfg.data.pairs_per_batch))))
    x = inputs(_collate([dataset[i] for i in indices]), 0)
    rnd = draw_pair_noise(cfg.train.seed + 7919, 0, indices, tuple(x["lat_ref"].shape[1:]),
                          models.noise_scheduler.config.num_train_timesteps, 0.0, 0.0, 0.0)  # fmt: skip
    return float(_forward_loss(cfg, models, engine, inputs, x, rnd, train=False).loss)


def _maybe_sample(cfg: TrainConfig, env: DistEnv, engine: Any, models: Any, step: int, force: bool) -> None:
    """Write ``samples/step_N.png`` (see :class:`~patchdpo_fast.config.SamplesConfig`) when it is due."""
    s_cfg = cfg.samples
    if s_cfg.references is None or not (force or (s_cfg.every and step % s_cfg.every == 0)):
        return
    from patchdpo_fast.training.samples import write_sample_grid

    with engine.gathered():
        if env.is_main:
            path = Path(cfg.train.output_dir) / "samples" / f"step_{step:08d}.png"
            write_sample_grid(s_cfg, models, cfg.data.resolution, path)
            logger.info("samples at step %d: %s", step, path)
    env.barrier()


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------


_WINDOW_KEYS = ("loss", "model_mse", "implicit_acc", "log_ratio")


def _window_means(window: list[dict[str, float]], env: DistEnv) -> dict[str, float]:
    """The logged metrics of a window of micro-steps: means over the micro-steps and over the ranks.

    Every rank saw the same number of equal micro-batches (a non-finite loss skips the micro-step on all of them), so
    the mean of the ranks' means is the mean over the global batch, as one rank with the whole batch would log it.
    One small all-reduce; every rank must call it at the same steps.
    """
    keys = [k for k in _WINDOW_KEYS if window and k in window[0]]
    if not keys:  # every micro-step of the window was skipped, on every rank alike
        return {}
    n = len(window)
    sums = torch.tensor([sum(w.get(k, 0.0) for w in window) / n for k in keys], dtype=torch.float64)
    if env.distributed:
        sums = env.all_reduce_sum(sums.to(env.device if env.backend == "nccl" else "cpu")).cpu() / env.world_size
    return {k: float(v) for k, v in zip(keys, sums, strict=True)}


def train(
    cfg: TrainConfig, *, resume: str | None = None, local_rank: int | None = None, overwrite: bool = False
) -> TrainResult:
    """Train with ``cfg``; ``resume`` ('latest' or a checkpoint path) overrides ``train.resume_from``.

    A fresh run (no checkpoint to resume) refuses an output folder that holds another run's checkpoints unless
    ``overwrite``, which deletes them first. A resume checks the checkpoint's settings against ``cfg``
    (:mod:`patchdpo_fast.training.resume`).

    Raises:
        UserError: the output folder belongs to another run, the resume is refused, or the checkpoint is unusable.
    """
    env = setup_distributed(cfg.deepspeed.enabled, local_rank)
    try:
        return _train(cfg, env, resume if resume is not None else cfg.train.resume_from, overwrite)
    finally:
        env.shutdown()


def _train(cfg: TrainConfig, env: DistEnv, resume: str | None, overwrite: bool = False) -> TrainResult:
    t_cfg, d_cfg = cfg.train, cfg.data
    out_dir = Path(t_cfg.output_dir)
    torch.manual_seed(t_cfg.seed + env.rank)
    np.random.seed((t_cfg.seed + env.rank) % 2**32)
    random.seed(t_cfg.seed + env.rank)
    _check_before_loading(cfg, env)
    run = _claim_output_dir(cfg, env, resume, overwrite)
    ckpt_path = run.checkpoint
    if env.is_main:
        dump_config(cfg, out_dir / "config.yaml")
        logger.info("output directory: %s (rank 0 of %d, device %s)", out_dir, env.world_size, env.device)

    models = _build_models(cfg, env)
    # what trains (LoRA on, the frozen reference UNet copied from the initial weights) before any checkpoint loads
    trainable = setup_trainable(cfg, models)
    if env.is_main:  # counted from the real models' tensors; activations on a meta twin (nothing allocated)
        log_startup_plan(cfg, models, env.world_size, trainable.reference)
    reference = _reference_record(cfg, models)  # hashed before DeepSpeed casts or partitions anything
    if ckpt_path is not None:  # adapter weights go in before DeepSpeed partitions them
        with _reading_checkpoint(ckpt_path):
            reference = _load_adapter_weights(ckpt_path, models, reference, trainable)
    dataset, cached = _build_data(cfg, models, env)
    inputs = _Inputs(cfg, models, env, cached)
    # the moving average starts from the (resumed) fp32 weights, before DeepSpeed casts them
    ema = build_ema(cfg, models.ip_unet, resolve_deepspeed_config(cfg, env.world_size))
    engine = _build_engine(cfg, models, env, trainable)

    from patchdpo_fast.data import ResumableSampler

    sampler = ResumableSampler(len(dataset), seed=d_cfg.shuffle_seed, rank=env.rank, world_size=env.world_size,
                               drop_last=d_cfg.drop_last)  # fmt: skip
    step, nan_skips, consumed = 0, 0, 0
    if ckpt_path is not None:
        with _reading_checkpoint(ckpt_path):
            trainer = _load_checkpoint(ckpt_path, env, engine, ema)
        if trainer["world_size"] != env.world_size and cfg.deepspeed.enabled:
            raise CheckpointError(f"checkpoint {ckpt_path} was written by {trainer['world_size']} ranks; resuming "
                                  f"DeepSpeed ZeRO state needs the same number, got {env.world_size}")  # fmt: skip
        step, nan_skips, consumed = int(trainer["step"]), int(trainer["nan_skips"]), int(trainer["consumed_per_rank"])
        sampler.load_state_dict(sampler.state_dict(consumed=consumed))
        run.resumed(trainer, engine, cfg)
        if env.is_main:
            logger.info("resumed from %s at step %d", ckpt_path, step)

    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=_BatchStream(sampler, d_cfg.pairs_per_batch),
        num_workers=d_cfg.num_workers,
        collate_fn=_collate,
        persistent_workers=d_cfg.num_workers > 0,
    )
    batches = iter(loader)
    scheduler_cfg = models.noise_scheduler.config
    metrics = MetricsLogger(out_dir, enabled=env.is_main, resume_step=step)
    history: list[dict[str, Any]] = []
    last_ckpt: Path | None = ckpt_path
    progress = None
    if env.is_main:
        from tqdm.auto import tqdm

        progress = tqdm(total=t_cfg.max_steps, initial=step, desc="patchdpo", dynamic_ncols=True, file=sys.stderr)

    _maybe_sample(cfg, env, engine, models, step, force=step == 0)
    if ckpt_path is None:  # a resumed run keeps the loss its checkpoints recorded at step 0
        run.fixed_batch_loss_start = fixed_batch_loss(cfg, models, engine, inputs, dataset)
        if env.is_main:
            logger.info("fixed-batch loss at step %d: %.6f", step, run.fixed_batch_loss_start)
    eval_start = run.fixed_batch_loss_start
    window: list[dict[str, float]] = []
    t_window = time.perf_counter()
    pairs_per_step = d_cfg.pairs_per_batch * t_cfg.gradient_accumulation_steps * env.world_size
    while step < t_cfg.max_steps:
        skipped_step = False
        for _ in range(t_cfg.gradient_accumulation_steps):
            batch = next(batches)
            consumed += len(batch["index"])
            x = inputs(batch, step)
            rnd = draw_pair_noise(
                t_cfg.seed, step, batch["index"], tuple(x["lat_ref"].shape[1:]), scheduler_cfg.num_train_timesteps,
                d_cfg.drop_image, d_cfg.drop_text, d_cfg.drop_both,
            )  # fmt: skip
            out = _forward_loss(cfg, models, engine, inputs, x, rnd, train=True)
            loss_value = float(out.loss.detach())
            if env.any(not math.isfinite(loss_value)):
                if t_cfg.nan_policy == "error":
                    raise FloatingPointError(f"non-finite loss ({loss_value}) at step {step}; nan_policy=error")
                engine.skip_micro_step()
                skipped_step = True
                continue
            engine.backward(out.loss)
            if engine.step() and ema is not None:
                ema.update()
            window.append(
                {
                    "loss": loss_value,
                    "model_mse": float(out.model_mse.mean()),
                    **({"implicit_acc": float(out.implicit_acc)} if out.implicit_acc is not None else {}),
                    **({"log_ratio": float(out.log_ratio.mean())} if out.log_ratio is not None else {}),
                }
            )
        if skipped_step:
            nan_skips += 1
            if env.is_main:
                logger.warning("step %d: non-finite loss, step skipped (%d skipped so far)", step, nan_skips)
            if nan_skips > t_cfg.max_nan_skips:
                raise FloatingPointError(
                    f"{nan_skips} steps had a non-finite loss (train.max_nan_skips={t_cfg.max_nan_skips})"
                )
        step += 1

        if step % t_cfg.log_every == 0 or step == t_cfg.max_steps:
            elapsed = time.perf_counter() - t_window
            record: dict[str, Any] = _window_means(window, env)
            steps_in_window = t_cfg.log_every if step % t_cfg.log_every == 0 else step % t_cfg.log_every
            record.update(
                lr=engine.lr(),
                grad_norm=engine.last_grad_norm,
                nan_skips=nan_skips,
                steps_per_s=steps_in_window / elapsed if elapsed > 0 else None,
                pairs_per_s=steps_in_window * pairs_per_step / elapsed if elapsed > 0 else None,
                epoch=consumed // max(1, len(sampler)),
            )
            history.append({"step": step, **record})
            metrics.log(step, record)
            if progress is not None:
                post = {"loss": f"{record.get('loss', float('nan')):.4f}"}
                if "implicit_acc" in record:
                    post["acc"] = f"{record['implicit_acc']:.2f}"
                if record["steps_per_s"]:
                    post["it/s"] = f"{record['steps_per_s']:.2f}"
                progress.set_postfix(post)
            window, t_window = [], time.perf_counter()
        if progress is not None:
            progress.update(1)
        if step % t_cfg.checkpoint_every == 0 or step == t_cfg.max_steps:
            last_ckpt = _save_checkpoint(cfg, env, engine, models, step, consumed, nan_skips, run, reference,
                                         trainable, ema)  # fmt: skip
        _maybe_sample(cfg, env, engine, models, step, force=step == t_cfg.max_steps)

    if progress is not None:
        progress.close()
    eval_end = fixed_batch_loss(cfg, models, engine, inputs, dataset)
    if env.is_main:
        logger.info("fixed-batch loss at step %d: %.6f (at step 0: %s)", step, eval_end, eval_start)
    metrics.close()
    adapter_path = None
    with engine.gathered():
        if env.is_main:
            with ema.applied() if ema is not None else contextlib.nullcontext():  # exports hold the average
                exports = export_run(cfg, models, trainable.mode, out_dir)  # adapter, UNet LoRA or full UNet
            adapter_path = exports.get("adapter")  # None without an IP-Adapter (model.use_ip_adapter=false)
            atomic_write_json(
                out_dir / "summary.json",
                {"final_step": step, "nan_skips": nan_skips, "adapter": str(adapter_path) if adapter_path else None,
                 "exports": {k: str(v) for k, v in exports.items()}, "trainable": trainable.mode.name,
                 "fixed_batch_loss_start": eval_start, "fixed_batch_loss_end": eval_end,
                 "last_checkpoint": str(last_ckpt) if last_ckpt else None, "world_size": env.world_size},
            )  # fmt: skip
    env.barrier()
    return TrainResult(out_dir, adapter_path, step, nan_skips, last_ckpt, history, eval_start, eval_end)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``patchdpo train`` / ``python -m patchdpo_fast.train`` / ``deepspeed patchdpo_fast/train.py``.

    User errors (config, data, paths, a refused resume) propagate; :func:`patchdpo_fast.cli.run_command` prints
    them as one line with exit status 2.
    """
    parser = argparse.ArgumentParser(prog="patchdpo train", description="PatchDPO training of IP-Adapter-Plus.")
    parser.add_argument("--config", default="configs/tiny_cpu.yaml", help="YAML config (default: the tiny CPU demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.max_steps=100 (repeatable)")  # fmt: skip
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="resume from the newest checkpoint in train.output_dir or from a given path")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an output_dir holding another run (deletes its checkpoints)")  # fmt: skip
    parser.add_argument("--export-dtype", choices=sorted(_EXPORT_DTYPES), default=None,
                        help="dtype of the exported ip_adapter.safetensors and UNet LoRA (same as --set "
                             "train.export_dtype=...; default fp16 like the official files, fp32 keeps the exact "
                             "master weights)")  # fmt: skip
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    if args.export_dtype is not None:
        overrides.append(f"train.export_dtype={args.export_dtype}")
    cfg = load_config(args.config, overrides)  # a ConfigError names the key (reported by cli.run_command)
    result = train(cfg, resume=args.resume, local_rank=args.local_rank, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        adapter = str(result.adapter_path) if result.adapter_path else None
        print(json.dumps({"output_dir": str(result.output_dir), "adapter": adapter,
                          "final_step": result.final_step, "nan_skips": result.nan_skips,
                          "last_checkpoint": str(result.last_checkpoint)}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    from patchdpo_fast.cli import run_command

    raise SystemExit(run_command("train", main))
