"""The trainer: :class:`Trainer` (one run, built from a config) and its parts: inputs and losses, engines (plain /
DeepSpeed), trainable modes, the run folder, checkpoints, resume, exports, EMA, metrics and the memory plan.
``patchdpo_fast.train`` is the command-line launcher around :class:`Trainer`.

The trainer's modules import torch and the models, so they load on first use: ``from patchdpo_fast.training import
Trainer`` imports :mod:`patchdpo_fast.training.trainer`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainResult", "Trainer"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from patchdpo_fast.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
