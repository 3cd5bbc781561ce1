"""Building a run's models and engine from its config, and the record of the DPO reference adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from patchdpo_fast.config import TrainConfig, resolve_deepspeed_config
from patchdpo_fast.errors import UserError
from patchdpo_fast.training.distributed import DistEnv
from patchdpo_fast.training.optim import build_lr_scheduler, build_optimizer
from patchdpo_fast.training.trainable import TrainableMode, TrainableSetup

__all__ = ["WEIGHT_DTYPES", "build_engine", "build_models", "check_reference", "reference_record"]

#: ``train.mixed_precision`` -> the dtype of the frozen weights (and of autocast)
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_models(cfg: TrainConfig, env: DistEnv) -> Any:
    """The run's :class:`~patchdpo_fast.models.PatchDPOModels` on ``env.device``, in the ``model.trainable`` mode."""
    from patchdpo_fast.models import build_models as build

    m = cfg.model
    if not m.tiny and m.base_architecture != "auto":  # a contradicting setting is refused before any weight loads
        from patchdpo_fast.training.memory import resolve_architecture

        resolve_architecture(cfg)
    return build(
        tiny=m.tiny,
        seed=m.tiny_seed,
        tiny_architecture=m.tiny_architecture,
        prediction_type=m.prediction_type,
        use_ip_adapter=m.use_ip_adapter,
        pretrained_model_path=m.pretrained_path,
        image_encoder_path=m.image_encoder_path,
        ip_adapter_path=m.ip_adapter_path,
        weight_dtype=WEIGHT_DTYPES[cfg.train.mixed_precision],
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


def reference_record(cfg: TrainConfig, models: Any, trainable: TrainableSetup | None = None) -> dict[str, Any] | None:
    """What the DPO reference is, for checkpoints: the run's initial adapter (``kind: initial adapter``) or, for full
    UNet finetuning, the frozen copy of the initial UNet and adapter (``kind: initial UNet``); where it came from and
    its SHA-256.

    The reference never changes during a run, so checkpoints store this record instead of its weights; a resumed run
    rebuilds the same reference from its configuration and :func:`check_reference` compares the hashes. ``None``
    when the loss needs no reference. Call it before the engine exists (ZeRO-3 partitions the weights).
    """
    m = cfg.model
    origin: dict[str, Any] = {"ip_adapter_path": str(m.ip_adapter_path) if m.ip_adapter_path else None,
                              "train_resampler": m.train_resampler, "num_ip_tokens": m.num_ip_tokens}  # fmt: skip
    if m.tiny:
        origin.update(tiny=True, tiny_seed=m.tiny_seed)
    else:
        origin.update(pretrained_path=str(m.pretrained_path))
    unet_sha256 = trainable.reference_fingerprint() if trainable is not None else None
    if unet_sha256 is not None:
        origin.update(reference_dtype=str(next(trainable.reference.parameters()).dtype).removeprefix("torch."))
        return {"kind": "initial UNet", "sha256": unet_sha256, "origin": origin}
    sha256 = models.ip_unet.reference_fingerprint()
    if sha256 is None:
        return None
    return {"kind": "initial adapter", "sha256": sha256, "origin": origin}


def check_reference(path: Path, stored: dict[str, Any] | None, current: dict[str, Any] | None) -> None:
    """Refuse to resume a DPO run against another reference adapter than the one its checkpoint was trained with."""
    if stored is None or current is None or stored.get("sha256") == current["sha256"]:
        return

    def label(record: dict[str, Any]) -> str:
        return "reference UNet" if record.get("kind") == "initial UNet" else "reference adapter"

    raise UserError(
        f"checkpoint {path} was trained against the {label(stored)} {stored['sha256'][:16]}... built from "
        f"{stored.get('origin')}, but this configuration builds the {label(current)} {current['sha256'][:16]}... from "
        f"{current['origin']}. The DPO reference is the run's {current.get('kind', 'initial adapter')} and is not "
        "stored in checkpoints: resume with the model settings and the unchanged weight files that started the run"
    )


def build_engine(cfg: TrainConfig, models: Any, env: DistEnv, trainable: TrainableSetup | None = None) -> Any:
    """The optimizer side of the run: a :class:`~patchdpo_fast.training.engine.PlainEngine` (one process or DDP) or,
    with ``deepspeed.enabled``, a :class:`~patchdpo_fast.training.engine.DeepSpeedEngine`; ``trainable``'s separate
    frozen reference (full UNet finetuning with a DPO loss) is attached to it."""
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
