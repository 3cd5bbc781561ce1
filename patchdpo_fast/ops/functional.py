"""Public functional API of the PatchDPO loss family.

Each loss validates its inputs (shapes, dtypes, devices, ``beta`` a real number in ``(0, MAX_BETA]``, finite patch
weights; quality maps in [0, 1] for :func:`patchdpo_weights`), picks a backend (``"auto"``: the fused Triton kernels
for CUDA tensors and under ``TRITON_INTERPRET=1``, the PyTorch reference otherwise) and returns a
:class:`PatchLossOutput`.
"""

from __future__ import annotations

import torch

from patchdpo_fast.ops import reference
from patchdpo_fast.ops.autograd import FusedPatchLoss, one_pass_eligible
from patchdpo_fast.ops.dispatch import resolve_backend
from patchdpo_fast.ops.types import PatchLossOutput
from patchdpo_fast.ops.validation import (
    check_beta,
    check_finite_inputs,
    check_loss_inputs,
    check_quality_maps,
    check_quality_values,
    check_weight_finite,
)

__all__ = ["diffusion_dpo_loss", "patch_dpo_loss", "patch_weighted_mse", "patchdpo_weights"]


def _fused(
    pred: torch.Tensor,
    target: torch.Tensor,
    ref_pred: torch.Tensor | None,
    weight: torch.Tensor | None,
    beta: float,
    is_dpo: bool,
) -> PatchLossOutput:
    # The MSE gradient needs no reduction first: when one is wanted, the forward kernel writes it in the same pass.
    one_pass = one_pass_eligible(pred, is_dpo)
    loss, model_err, model_mse, ref_err, log_ratio, acc = FusedPatchLoss.apply(
        pred, target.detach(), None if ref_pred is None else ref_pred.detach(),
        None if weight is None else weight.detach(), beta, is_dpo, one_pass,
    )  # fmt: skip
    if not is_dpo:
        return PatchLossOutput(loss=loss, model_err=model_err, model_mse=model_mse)
    return PatchLossOutput(
        loss=loss, model_err=model_err, model_mse=model_mse, ref_err=ref_err, log_ratio=log_ratio, implicit_acc=acc
    )


def patch_weighted_mse(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    check_finite: bool = False,
) -> PatchLossOutput:
    """Official PatchDPO loss: ``mean_{i,p} w[i,p] * m[i,p]``.

    Args:
        pred: model noise prediction ``(N, C, H, W)``; the only input that receives a gradient.
        target: regression target (noise or v) ``(N, C, H, W)``.
        weight: patch weights ``(N, h, w)`` or ``(N, 1, h, w)`` with ``H % h == W % w == 0``, typically
            ``patchdpo_weights(q_ref, q_gen, "official")``; ``None`` gives the plain MSE.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        check_finite: raise a ValueError if any input holds NaN/Inf (costs a device sync on a GPU). On the CPU
            the (small) weight map is always checked (free there): a non-finite weight is a ValueError on every
            backend. On a GPU nothing is read back unless asked for, so a call never stalls the host.

    Equals ``mean(W * (pred - target)**2)`` of the official code for a full-resolution ``W`` (``s = 1``).
    """
    op = "patch_weighted_mse"
    check_loss_inputs(op, pred, target, None, weight, pairs=False)
    if check_finite:
        check_finite_inputs(op, pred=pred, target=target, weight=weight)
    else:
        check_weight_finite(op, weight)
    if resolve_backend(op, backend, pred, target, weight) == "triton":
        return _fused(pred, target, None, weight, 0.0, False)
    return reference.patch_weighted_mse_reference(pred, target, weight)


def diffusion_dpo_loss(
    pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    beta: float = 5000.0,
    *,
    backend: str = "auto",
    check_finite: bool = False,
) -> PatchLossOutput:
    """Diffusion-DPO (Wallace et al. 2023): ``-mean logsigmoid(-beta/2 * D)``.

    ``D = (m_w - m_l) - (r_w - r_l)`` per pair with per-sample mean errors of the model (``pred``) and of the
    frozen reference model (``ref_pred``). ``N = 2B``: the B winners first, then the B losers.
    """
    op = "diffusion_dpo_loss"
    check_loss_inputs(op, pred, target, ref_pred, None, pairs=True)
    beta = check_beta(op, beta)
    if check_finite:
        check_finite_inputs(op, pred=pred, ref_pred=ref_pred, target=target)
    if resolve_backend(op, backend, pred, ref_pred, target) == "triton":
        return _fused(pred, target, ref_pred, None, beta, True)
    return reference.diffusion_dpo_loss_reference(pred, ref_pred, target, beta)


def patch_dpo_loss(
    pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    beta: float = 5000.0,
    *,
    backend: str = "auto",
    check_finite: bool = False,
) -> PatchLossOutput:
    """Patch-level DPO: Diffusion-DPO whose per-sample errors are weighted patch means.

    ``D = sum_p a_p (m_w,p - r_w,p)/P - sum_p b_p (m_l,p - r_l,p)/P`` with winner weights ``a`` (first B rows of
    ``weight``, default ``1 - q_ref``) and signed loser weights ``b`` (last B rows, default ``1 - 2 q_gen``).
    With all-ones weights it equals :func:`diffusion_dpo_loss`.
    """
    op = "patch_dpo_loss"
    check_loss_inputs(op, pred, target, ref_pred, weight, pairs=True)
    beta = check_beta(op, beta)
    if check_finite:
        check_finite_inputs(op, pred=pred, ref_pred=ref_pred, target=target, weight=weight)
    else:
        check_weight_finite(op, weight)
    if resolve_backend(op, backend, pred, ref_pred, target, weight) == "triton":
        return _fused(pred, target, ref_pred, weight, beta, True)
    return reference.patch_dpo_loss_reference(pred, ref_pred, target, weight, beta)


def patchdpo_weights(
    q_ref: torch.Tensor, q_gen: torch.Tensor, mode: str = "official", *, check_values: bool | None = None
) -> torch.Tensor:
    """Weight maps ``(2B, h, w)`` from quality maps ``q_ref``, ``q_gen`` of shape ``(B, h, w)`` in [0, 1].

    ``mode="official"`` gives ``cat[1 - q_ref, q_gen]`` (for :func:`patch_weighted_mse`); ``mode="dpo"`` gives
    ``cat[1 - q_ref, 1 - 2 * q_gen]`` (for :func:`patch_dpo_loss`).

    ``check_values``: check that the maps lie in [0, 1]; ``None`` (default) checks CPU maps only (free there),
    ``True`` also GPU maps (a device sync), ``False`` never. The trainer checks the maps when it loads them.

    Raises:
        ValueError: maps of the wrong shape or dtype, or (when checked) values outside [0, 1] or NaN.
    """
    check_quality_maps("patchdpo_weights", q_ref, q_gen)
    if check_values is not False:
        check_quality_values("patchdpo_weights", force=bool(check_values), q_ref=q_ref, q_gen=q_gen)
    if q_ref.dim() == 4:
        q_ref, q_gen = q_ref[:, 0], q_gen[:, 0]
    return reference.patchdpo_weights_reference(q_ref, q_gen, mode)
