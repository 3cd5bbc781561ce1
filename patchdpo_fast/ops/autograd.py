"""Autograd Function around the fused Triton kernels (forward + epilogue, single-pass backward)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = ["FusedPatchLoss"]


class FusedPatchLoss(torch.autograd.Function):
    """Differentiable w.r.t. ``pred`` only; ``target``, ``ref_pred`` and ``weight`` take no gradient.

    Returns ``(loss, model_err, model_mse, ref_err, log_ratio, implicit_acc)``; all but ``loss`` are
    non-differentiable logging terms.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        pred: torch.Tensor,
        target: torch.Tensor,
        ref_pred: torch.Tensor | None,
        weight: torch.Tensor | None,
        beta: float,
        is_dpo: bool,
    ) -> tuple[torch.Tensor, ...]:
        from patchdpo_fast.kernels.patch_loss import patch_loss_forward

        out = patch_loss_forward(pred, target, ref_pred, weight, beta, is_dpo)
        ctx.save_for_backward(pred, target, weight, out["coef"])
        terms = (out["model_err"], out["model_mse"], out["ref_err"], out["log_ratio"], out["implicit_acc"])
        ctx.mark_non_differentiable(*terms)
        return (out["loss"], *terms)

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor, *_: torch.Tensor):  # type: ignore[override]
        from patchdpo_fast.kernels.patch_loss import patch_loss_backward

        pred, target, weight, coef = ctx.saved_tensors
        grad_pred = None
        if ctx.needs_input_grad[0]:
            grad_pred = patch_loss_backward(pred, target, weight, coef, grad_loss)
        return grad_pred, None, None, None, None, None
