"""PyTorch reference definitions of the PatchDPO loss family (DESIGN.md section 2).

This module is the specification: the Triton kernels in ``patchdpo_fast.kernels`` must match it. It is
written for readability, not speed (it materializes the squared-error tensor), and it is differentiable
with ordinary autograd with respect to ``pred`` only.

Notation, for inputs of shape ``(N, C, H, W)`` and weight maps of shape ``(N, h, w)`` with integer patch
strides ``sh = H / h`` and ``sw = W / w``:

* ``m[i, p]``: mean over the ``C * sh * sw`` elements of patch ``p`` of sample ``i`` of ``(pred - target)**2``;
* ``r[i, p]``: the same with ``ref_pred`` in place of ``pred``;
* ``P = h * w`` patches per sample.

Losses:

* patch_weighted_mse (official PatchDPO): ``L = mean_{i,p} w[i,p] * m[i,p]``;
* diffusion_dpo (Wallace et al.): ``D = (m_w - m_l) - (r_w - r_l)`` with per-sample means,
  ``L = -mean logsigmoid(-beta / 2 * D)``;
* patch_dpo: ``D = sum_p a_p (m_w,p - r_w,p) / P - sum_p b_p (m_l,p - r_l,p) / P`` with the winner rows of the
  weight map as ``a`` and the (signed) loser rows as ``b``; ``L = -mean logsigmoid(-beta / 2 * D)``.

Winners are the first ``N / 2`` samples, losers the last ``N / 2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from patchdpo_fast.ops.types import PatchLossOutput

__all__ = [
    "accumulation_dtype",
    "diffusion_dpo_loss_reference",
    "patch_dpo_loss_reference",
    "patch_mse",
    "patch_weighted_mse_reference",
    "patchdpo_weights_reference",
]


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when any input is fp64 (used by gradcheck)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def patch_mse(pred: torch.Tensor, target: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per-sample, per-patch mean squared error ``m[i, p]`` of shape ``(N, h, w)``.

    ``grid = (h, w)`` is the patch grid; each patch covers ``C * (H/h) * (W/w)`` elements.
    """
    acc = accumulation_dtype(pred, target)
    n, c, height, width = pred.shape
    h, w = grid
    sq_err = (pred.to(acc) - target.to(acc)).pow(2)
    return sq_err.reshape(n, c, h, height // h, w, width // w).mean(dim=(1, 3, 5))


def _weight_grid(weight: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Weight map as ``(N, h, w)`` in the accumulation dtype, detached (weights take no gradient)."""
    if weight.dim() == 4:
        weight = weight[:, 0]
    return weight.detach().to(acc)


def _dpo_terms(
    model_err: torch.Tensor, ref_err: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair log-ratio ``D``, loss and implicit accuracy from per-sample model / reference errors."""
    half = model_err.shape[0] // 2
    model_diff = model_err[:half] - model_err[half:]
    ref_diff = ref_err[:half] - ref_err[half:]
    log_ratio = model_diff - ref_diff
    loss = -F.logsigmoid(-0.5 * beta * log_ratio).mean()
    implicit_acc = (log_ratio.detach() < 0).to(log_ratio.dtype).mean()
    return log_ratio, loss, implicit_acc


def patch_weighted_mse_reference(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> PatchLossOutput:
    """Official PatchDPO loss ``mean_{i,p} w[i,p] * m[i,p]``; plain MSE when ``weight`` is None."""
    acc = accumulation_dtype(pred, target)
    n = pred.shape[0]
    if weight is None:
        grid = (1, 1)
        w = torch.ones(n, 1, 1, dtype=acc, device=pred.device)
    else:
        w = _weight_grid(weight, acc)
        grid = (w.shape[1], w.shape[2])
    m = patch_mse(pred, target.detach(), grid)
    model_err = (w * m).mean(dim=(1, 2))
    loss = model_err.mean()
    model_mse = m.detach().mean(dim=(1, 2))
    return PatchLossOutput(loss=loss, model_err=model_err.detach(), model_mse=model_mse)


def diffusion_dpo_loss_reference(
    pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor, beta: float = 5000.0
) -> PatchLossOutput:
    """Diffusion-DPO loss with per-sample mean errors (winners first, losers second)."""
    target = target.detach()
    model_err = patch_mse(pred, target, (1, 1)).flatten()
    ref_err = patch_mse(ref_pred.detach(), target, (1, 1)).flatten()
    log_ratio, loss, implicit_acc = _dpo_terms(model_err, ref_err, beta)
    return PatchLossOutput(
        loss=loss,
        model_err=model_err.detach(),
        model_mse=model_err.detach(),
        ref_err=ref_err,
        log_ratio=log_ratio.detach(),
        implicit_acc=implicit_acc,
    )


def patch_dpo_loss_reference(
    pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, beta: float = 5000.0
) -> PatchLossOutput:
    """Patch-level DPO: per-sample errors are weighted patch means ``sum_p w[i,p] * m[i,p] / P``."""
    target = target.detach()
    acc = accumulation_dtype(pred, target, ref_pred)
    w = _weight_grid(weight, acc)
    grid = (w.shape[1], w.shape[2])
    m = patch_mse(pred, target, grid)
    r = patch_mse(ref_pred.detach(), target, grid)
    model_err = (w * m).mean(dim=(1, 2))
    ref_err = (w * r).mean(dim=(1, 2))
    log_ratio, loss, implicit_acc = _dpo_terms(model_err, ref_err, beta)
    return PatchLossOutput(
        loss=loss,
        model_err=model_err.detach(),
        model_mse=m.detach().mean(dim=(1, 2)),
        ref_err=ref_err,
        log_ratio=log_ratio.detach(),
        implicit_acc=implicit_acc,
    )


def patchdpo_weights_reference(q_ref: torch.Tensor, q_gen: torch.Tensor, mode: str = "official") -> torch.Tensor:
    """Weight maps ``(2B, h, w)`` from reference-side and generated-side quality maps ``(B, h, w)``.

    ``official``: ``cat[1 - q_ref, q_gen]`` (reference patches the generator got wrong get extra weight,
    good generated patches are trained like positives). ``dpo``: ``cat[1 - q_ref, 1 - 2 * q_gen]`` (signed loser
    weights: bad generated patches are pushed away, good ones pulled in).
    """
    if mode == "official":
        return torch.cat([1.0 - q_ref, q_gen], dim=0)
    if mode == "dpo":
        return torch.cat([1.0 - q_ref, 1.0 - 2.0 * q_gen], dim=0)
    raise ValueError(f"mode must be 'official' or 'dpo', got {mode!r}")
