"""Autograd Function around the fused Triton kernels.

Two paths:

* DPO losses (and the MSE loss when no gradient is wanted or `pred` is fp16): forward pass + epilogue, then a backward
  pass that re-reads ``pred``, ``target`` and the weights with the per-sample coefficients from the epilogue.
* ``patch_weighted_mse`` when ``pred`` needs a gradient (``one_pass=True``, see :func:`one_pass_eligible`): its
  gradient ``2 w (pred - target) / (N*C*H*W)`` needs no reduction first, so the forward kernel writes it in the
  same pass (forward + backward read every input once and write the gradient once, as fused LLM loss kernels do).
  The backward only multiplies it by ``grad_output`` in place, on the device, and skips even that when
  ``grad_output`` is 1. The precomputed gradient is handed to autograd once; a second backward through the same
  graph (``retain_graph=True``) recomputes it with the backward kernel.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = ["FusedPatchLoss", "one_pass_eligible"]


def one_pass_eligible(pred: torch.Tensor, is_dpo: bool) -> bool:
    """Whether the loss takes the one-pass forward + gradient path.

    Only the MSE loss (its gradient needs no reduction first), only when a gradient is wanted (``pred`` requires
    grad and grad mode is on; otherwise the forward writes nothing extra), and not for fp16 ``pred``: the one-pass
    gradient is rounded into ``pred``'s dtype before ``grad_output`` is known, and fp16's narrow exponent range
    would flush small gradients to zero before a GradScaler's loss scale reaches them. The fp16 path applies
    ``grad_output`` in fp32 and rounds once, as before; bf16 has fp32's range, so scaling after rounding loses
    nothing there.
    """
    return not is_dpo and pred.requires_grad and torch.is_grad_enabled() and pred.dtype != torch.float16


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
        one_pass: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        from patchdpo_fast.kernels.patch_loss import patch_loss_forward

        one_pass = one_pass and not is_dpo
        out = patch_loss_forward(pred, target, ref_pred, weight, beta, is_dpo, write_grad=one_pass)
        ctx.grad_pred = out.get("grad_pred")  # type: ignore[attr-defined]
        ctx.save_for_backward(pred, target, weight, out["coef"])
        terms = (out["model_err"], out["model_mse"], out["ref_err"], out["log_ratio"], out["implicit_acc"])
        ctx.mark_non_differentiable(*terms)
        return (out["loss"], *terms)

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor, *_: torch.Tensor):  # type: ignore[override]
        from patchdpo_fast.kernels.patch_loss import patch_loss_backward, scale_gradient_

        # Taken off the context before it is returned, so that autograd can adopt the buffer as `pred.grad`
        # without a copy.
        grad_pred = ctx.grad_pred  # type: ignore[attr-defined]
        ctx.grad_pred = None  # type: ignore[attr-defined]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        if grad_pred is not None:
            grad_pred = scale_gradient_(grad_pred, grad_loss)
        else:
            pred, target, weight, coef = ctx.saved_tensors
            grad_pred = patch_loss_backward(pred, target, weight, coef, grad_loss)
        return grad_pred, None, None, None, None, None, None
