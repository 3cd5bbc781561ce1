"""Exponential moving average of the trainable weights (``optim.use_ema``, off by default).

After every optimizer step the fp32 shadow copy moves towards the weights: ``ema = decay * ema + (1 - decay) * w``.
Checkpoints keep the shadow weights (``ema.safetensors``), so a resumed run continues them exactly; the run's exports
(adapter, UNet LoRA, UNet) are written from the averaged weights, swapped in for the export and swapped back.

The shadow costs one fp32 copy of the trainable weights per rank: a few MB for the adapter or a LoRA, 10 GB for a
fully trained SDXL UNet. Under DeepSpeed ZeRO-3 the weights are sharded across ranks and the average is refused (the
config check names ``optim.use_ema``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["EMA_FILE", "EMAWeights", "build_ema"]

#: The checkpoint file of the moving average.
EMA_FILE = "ema.safetensors"


class EMAWeights:
    """An fp32 moving average of the ``(name, parameter)`` pairs given (those that train).

    Args:
        named_params: the trainable parameters, by name (the names key the checkpoint file).
        decay: the average's decay per optimizer step, in ``[0, 1)``.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.params = dict(named_params)
        if not self.params:
            raise ValueError("no trainable parameters to average")
        self.shadow = {n: p.detach().to(torch.float32, copy=True) for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        """Move the average one optimizer step towards the current weights."""
        for name, param in self.params.items():
            self.shadow[name].lerp_(param.detach().to(torch.float32), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow weights (not copied), keyed by parameter name."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load :meth:`state_dict` output (strict: the same names and shapes)."""
        missing, unexpected = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(f"EMA state mismatch: missing {missing[:6]}, unexpected {unexpected[:6]}")
        for name, value in state.items():
            if value.shape != self.shadow[name].shape:
                raise ValueError(f"EMA {name}: shape {tuple(value.shape)} != {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(value)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Context manager: the parameters hold the averaged weights inside it, their own weights again after it."""
        with torch.no_grad():
            saved = {n: p.detach().clone() for n, p in self.params.items()}
            for name, param in self.params.items():
                param.copy_(self.shadow[name].to(param.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(saved[name])


def build_ema(cfg: Any, module: nn.Module, ds_config: Mapping[str, Any] | None) -> EMAWeights | None:
    """The run's moving average (``optim.use_ema``) of ``module``'s trainable parameters, or None when it is off.

    Raises:
        UserError: ``optim.use_ema`` with a DeepSpeed JSON that selects ZeRO stage 3.
    """
    if not cfg.optim.use_ema:
        return None
    stage = int((ds_config or {}).get("zero_optimization", {}).get("stage", 0))
    if stage == 3:
        from patchdpo_fast.errors import UserError

        raise UserError("optim.use_ema needs whole weights on every rank, but the DeepSpeed config selects ZeRO-3")
    return EMAWeights([(n, p) for n, p in module.named_parameters() if p.requires_grad], cfg.optim.ema_decay)
