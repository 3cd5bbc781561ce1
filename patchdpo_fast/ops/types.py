"""Result type shared by every loss op."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PatchLossOutput"]


@dataclass(frozen=True)
class PatchLossOutput:
    """What every PatchDPO loss returns.

    Attributes:
        loss: scalar loss (fp32, or fp64 for fp64 inputs on the PyTorch backend), differentiable with respect to
            ``pred`` only.
        model_err: ``(N,)`` detached per-sample model error as it enters the loss: the weighted patch mean
            ``sum_p w[i,p] * m[i,p] / P`` (the plain per-sample MSE when the loss has no weights).
        model_mse: ``(N,)`` detached, unweighted per-sample MSE of ``pred`` against ``target`` (for logging).
        ref_err: ``(N,)`` detached per-sample reference error, weighted like ``model_err``; ``None`` for losses
            without a reference model.
        log_ratio: ``(N/2,)`` detached pair log-ratio ``D`` (winner minus loser, model minus reference); ``None``
            for non-DPO losses. Negative ``D`` means the model prefers the winner more than the reference does.
        implicit_acc: detached scalar, the fraction of pairs with ``D < 0``; ``None`` for non-DPO losses.
    """

    loss: torch.Tensor
    model_err: torch.Tensor
    model_mse: torch.Tensor
    ref_err: torch.Tensor | None = None
    log_ratio: torch.Tensor | None = None
    implicit_acc: torch.Tensor | None = None
