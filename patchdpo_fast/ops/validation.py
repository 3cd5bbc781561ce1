"""Input checks shared by every loss op: each failure is a ValueError naming the argument and what was expected."""

from __future__ import annotations

import math
import numbers

import torch

__all__ = [
    "FLOAT_DTYPES",
    "MAX_BETA",
    "check_beta",
    "check_finite_inputs",
    "check_loss_inputs",
    "check_quality_maps",
    "check_quality_values",
    "check_weight_finite",
    "host_checkable",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_tensor(op: str, name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{op}: `{name}` must have a floating dtype (float16, bfloat16, float32 or float64), got {t.dtype}"
        )
    return t


def check_loss_inputs(
    op: str,
    pred: torch.Tensor,
    target: torch.Tensor,
    ref_pred: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    *,
    pairs: bool,
) -> None:
    """Validate ``pred``/``target``/``ref_pred`` ``(N, C, H, W)`` and an optional weight map ``(N, h, w)``.

    ``pairs=True`` (DPO losses) additionally requires an even ``N = 2B`` with winners first.
    """
    _check_tensor(op, "pred", pred)
    if pred.dim() != 4:
        raise ValueError(f"{op}: `pred` must be 4-D (N, C, H, W), got shape {_shape(pred)}")
    if pred.numel() == 0:
        raise ValueError(f"{op}: `pred` must not be empty, got shape {_shape(pred)}")
    others = [("target", target)] + ([("ref_pred", ref_pred)] if ref_pred is not None else [])
    for name, t in others:
        _check_tensor(op, name, t)
        if t.shape != pred.shape:
            raise ValueError(
                f"{op}: `{name}` must have the same shape as `pred` {_shape(pred)} (N, C, H, W), got {_shape(t)}"
            )
        if t.device != pred.device:
            raise ValueError(f"{op}: `{name}` is on {t.device} but `pred` is on {pred.device}; move them together")
    n, _, height, width = pred.shape
    if pairs and n % 2 != 0:
        raise ValueError(
            f"{op}: the batch must hold pairs, N = 2B with the B winners first and the B losers second; "
            f"got N = {n} (`pred` shape {_shape(pred)})"
        )
    if weight is None:
        return
    _check_tensor(op, "weight", weight)
    if weight.device != pred.device:
        raise ValueError(f"{op}: `weight` is on {weight.device} but `pred` is on {pred.device}; move them together")
    if not (weight.dim() == 3 or (weight.dim() == 4 and weight.shape[1] == 1)):
        raise ValueError(f"{op}: `weight` must have shape (N, h, w) or (N, 1, h, w), got {_shape(weight)}")
    if weight.shape[0] != n:
        raise ValueError(
            f"{op}: `weight` must have one map per sample, shape ({n}, h, w) to match `pred` {_shape(pred)}; "
            f"got {_shape(weight)}"
        )
    gh, gw = weight.shape[-2], weight.shape[-1]
    if gh == 0 or gw == 0 or height % gh != 0 or width % gw != 0:
        raise ValueError(
            f"{op}: `weight` grid (h, w) = ({gh}, {gw}) must divide the spatial size (H, W) = ({height}, {width}) "
            f"of `pred` (integer patch stride H/h, W/w)"
        )


#: Largest accepted DPO temperature. Far above any useful value (Diffusion-DPO uses a few thousand): beyond it the
#: logsigmoid of ``-beta/2 * D`` is a step function of the float32 rounding of ``D``, and near 3.4e38 beta itself
#: overflows float32.
MAX_BETA = 1e8


def check_beta(op: str, beta: float) -> float:
    """``beta`` must be a real number (not a bool or a string) in ``(0, MAX_BETA]``; returns it as a float."""
    if isinstance(beta, torch.Tensor) and beta.numel() == 1 and beta.dtype != torch.bool:
        beta = beta.item()
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise ValueError(f"{op}: `beta` must be a real number (float), got {type(beta).__name__} {beta!r}")
    value = float(beta)
    if not math.isfinite(value) or value <= 0 or value > MAX_BETA:
        raise ValueError(f"{op}: `beta` must be a finite number in (0, {MAX_BETA:g}], got {beta!r}")
    return value


def host_checkable(t: torch.Tensor | None) -> bool:
    """Whether reading a value check of ``t`` back is free: on the CPU it is; on a GPU it is a device sync, which
    stalls the host until the queued work is done (a loss op must not do that on every call: the first GPU run
    measured the fused ops' calls 2-10x slower than eager from such checks alone)."""
    return t is not None and t.device.type == "cpu"


def check_weight_finite(op: str, weight: torch.Tensor | None, *, force: bool = False) -> None:
    """Patch weights must be finite (a NaN/Inf weight would give NaN on one backend and Inf on the other).

    Checked where it is free (:func:`host_checkable`) or when ``force`` (the ops' ``check_finite=True``); on a GPU
    otherwise a non-finite weight gives a non-finite loss, which the trainer's ``train.nan_policy`` catches.
    """
    if weight is None or not (force or host_checkable(weight)):
        return
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"{op}: `weight` contains {bad} non-finite value(s) (NaN or Inf); weights must be finite")


def check_quality_values(op: str, *, force: bool = False, **maps: torch.Tensor) -> None:
    """Quality maps must lie in [0, 1] (NaN is refused too): checked where it is free (:func:`host_checkable`, the
    CPU) or when ``force`` (one device sync for each map on a GPU)."""
    for name, q in maps.items():
        if not (force or host_checkable(q)):
            continue
        bad = (q < 0) | (q > 1) | torch.isnan(q)
        if bool(bad.any()):
            raise ValueError(
                f"{op}: `{name}` holds {int(bad.sum())} value(s) outside [0, 1] or NaN "
                f"(min {float(q.nan_to_num(0.5).min()):g}, max {float(q.nan_to_num(0.5).max()):g}); quality maps "
                "are probabilities-like scores in [0, 1]"
            )


def check_finite_inputs(op: str, **tensors: torch.Tensor | None) -> None:
    """Raise if any given tensor holds NaN or Inf (one device sync; opt-in through ``check_finite=True``)."""
    for name, t in tensors.items():
        if t is not None and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{op}: `{name}` contains {bad} non-finite value(s) (NaN or Inf)")


def check_quality_maps(op: str, q_ref: torch.Tensor, q_gen: torch.Tensor) -> None:
    """Quality maps: both ``(B, h, w)`` (or ``(B, 1, h, w)``), same shape, device and a floating dtype."""
    for name, q in (("q_ref", q_ref), ("q_gen", q_gen)):
        _check_tensor(op, name, q)
        if not (q.dim() == 3 or (q.dim() == 4 and q.shape[1] == 1)):
            raise ValueError(f"{op}: `{name}` must have shape (B, h, w) or (B, 1, h, w), got {_shape(q)}")
    if q_ref.shape != q_gen.shape:
        raise ValueError(f"{op}: `q_gen` must have the same shape as `q_ref` {_shape(q_ref)}, got {_shape(q_gen)}")
    if q_ref.device != q_gen.device:
        raise ValueError(f"{op}: `q_gen` is on {q_gen.device} but `q_ref` is on {q_ref.device}")
