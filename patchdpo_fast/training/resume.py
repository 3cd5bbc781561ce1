"""What ``--resume`` checks before it continues a run, and which changed settings it applies.

A checkpoint records the configuration it was written with (``config.yaml``). Resuming compares it with the
configuration of the resumed job, key by key:

* settings that an exact continuation depends on (data and its order, batch size, loss, model, optimizer type,
  precision, seeds, ...) must be equal: a difference is refused with every differing key named
  (:class:`ResumeConfigError`);
* settings listed in :data:`RESUME_MUTABLE` (learning rate and schedule, run length, logging, checkpointing,
  failure handling, worker counts, implementation backends) may change; the trainer applies them and logs each
  change.

Keys that only one of the two configurations has (a config written by another version of the library) are not
compared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from patchdpo_fast.errors import UserError

__all__ = [
    "RESUME_MUTABLE",
    "ResumeConfigError",
    "SettingChange",
    "apply_optimizer_settings",
    "check_resume_config",
    "compare_resume_configs",
    "flatten_config",
]

#: Dotted config keys that may differ between a checkpoint and the job resuming it (applied and logged).
RESUME_MUTABLE: frozenset[str] = frozenset(
    {
        "optim.lr",
        "optim.weight_decay",
        "optim.betas",
        "optim.eps",
        "optim.max_grad_norm",
        "optim.warmup_steps",
        "optim.lr_schedule",
        "train.max_steps",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.output_dir",
        "train.resume_from",
        "train.nan_policy",
        "train.max_nan_skips",
        "train.export_dtype",
        "train.unet_export_dtype",
        "data.num_workers",
        "data.validate_files",
        "data.on_bad_record",
        "data.max_bad_records",
        "cache.dir",
        "cache.on_stale",
        "cache.encode_batch_size",
        "model.attention_backend",
        "model.xformers_fallback",
        "model.gradient_checkpointing",
        "loss.backend",
    }
)

#: The optimizer hyperparameters a checkpoint's optimizer state carries (restored from it unless re-applied).
_OPTIMIZER_KEYS = ("optim.lr", "optim.weight_decay", "optim.betas", "optim.eps")
_SCHEDULE_KEYS = ("optim.lr", "optim.warmup_steps", "optim.lr_schedule", "train.max_steps")


class ResumeConfigError(UserError):
    """The resumed job's configuration differs from the checkpoint's in settings an exact resume depends on."""


@dataclass(frozen=True)
class SettingChange:
    """One config key whose value differs between the checkpoint and the resumed job."""

    key: str
    saved: Any
    current: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.saved!r} -> {self.current!r}"


def flatten_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-4}}`` -> ``{"optim.lr": 1e-4}`` (lists and tuples stay values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_config(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool | str):
        return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    return a == b


def compare_resume_configs(
    saved: Mapping[str, Any], current: Mapping[str, Any]
) -> tuple[list[SettingChange], list[SettingChange]]:
    """Compare a checkpoint's config with the resuming job's (both nested mappings as in ``config.yaml``).

    Returns:
        ``(refused, applied)``: changed keys that break an exact resume, and changed keys of
        :data:`RESUME_MUTABLE`.
    """
    a, b = flatten_config(saved), flatten_config(current)
    refused, applied = [], []
    for key in sorted(set(a) & set(b)):
        if _same(a[key], b[key]):
            continue
        change = SettingChange(key, a[key], b[key])
        (applied if key in RESUME_MUTABLE else refused).append(change)
    return refused, applied


def check_resume_config(saved: Mapping[str, Any], current: Mapping[str, Any], checkpoint: str) -> list[SettingChange]:
    """:func:`compare_resume_configs`, raising on refused changes.

    Returns:
        The applied changes.

    Raises:
        ResumeConfigError: naming every refused key with both values.
    """
    refused, applied = compare_resume_configs(saved, current)
    if refused:
        shown = "; ".join(str(c) for c in refused)
        raise ResumeConfigError(
            f"cannot resume {checkpoint}: {len(refused)} setting(s) differ from the checkpoint's and would break an "
            f"exact resume: {shown}. Resume with the checkpoint's settings (its config.yaml), or start a new run "
            "in another train.output_dir"
        )
    return applied


def apply_optimizer_settings(optimizer: Any, scheduler: Any, cfg: Any, changed: set[str]) -> None:
    """Re-apply the resumed job's optimizer hyperparameters over those restored from the checkpoint.

    Loading an optimizer state restores the checkpoint's ``lr``, ``weight_decay``, ``betas`` and ``eps``; for each
    of those keys in ``changed`` the config's value replaces it. When the learning rate or its schedule changed,
    every group's current ``lr`` is recomputed from the (new) base rate and the (new) schedule at the resumed step.
    """
    o = cfg.optim
    groups = optimizer.param_groups
    if "optim.weight_decay" in changed:
        for group in groups:
            group["weight_decay"] = o.weight_decay
    if "optim.betas" in changed:
        for group in groups:
            group["betas"] = tuple(o.betas)
    if "optim.eps" in changed:
        for group in groups:
            group["eps"] = o.eps
    if "optim.lr" in changed:
        for group in groups:
            group["initial_lr"] = o.lr
        if scheduler is not None:
            scheduler.base_lrs = [o.lr for _ in groups]
        else:
            for group in groups:
                group["lr"] = o.lr
    if scheduler is not None and changed & set(_SCHEDULE_KEYS):
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if lambdas is not None:
            lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, lambdas, strict=True)]
            for group, lr in zip(groups, lrs, strict=True):
                group["lr"] = lr
            scheduler._last_lr = lrs
