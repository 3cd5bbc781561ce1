"""Optimizer and learning-rate schedule construction for the training loop."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

__all__ = ["build_lr_scheduler", "build_optimizer", "lr_multiplier"]


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """``adamw`` (torch AdamW) or ``adamw8bit`` (bitsandbytes AdamW8bit: 8-bit blockwise optimizer states)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check model.train_resampler and the adapter setup")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:  # pragma: no cover - bitsandbytes is a declared dependency
            raise ImportError("optim.optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes)") from exc
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"optim.optimizer must be 'adamw' or 'adamw8bit', got {name!r}")


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """Linear warmup over ``warmup_steps``, then ``constant``, ``linear`` decay to 0 or ``cosine`` decay to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"optim.lr_schedule must be 'constant', 'linear' or 'cosine', got {schedule!r}")


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int, schedule: str
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`lr_multiplier`; its ``state_dict`` is JSON-serializable."""
    lr_multiplier(0, warmup_steps, max_steps, schedule)  # validate the schedule name now
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup_steps, max_steps, schedule)
    )
