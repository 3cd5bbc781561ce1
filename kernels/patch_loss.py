"""Fused Triton kernels for the PatchDPO loss family and their launch helpers.

Kernels (DESIGN.md section 3):

1. ``_patch_loss_fwd_kernel``: one pass over ``pred``, ``target`` (and ``ref_pred``) that reduces each tile of a
   sample straight to fp32 partial sums: ``sum w*(pred-target)^2``, ``sum (pred-target)^2`` and
   ``sum w*((pred-target)^2 - (ref_pred-target)^2)`` (the model-minus-reference error, accumulated as
   ``(pred-ref_pred)*(pred+ref_pred-2*target)`` so that it does not cancel when the two models are close). No
   squared-error tensor and no upsampled weight map exist. With ``WRITE_GRAD`` (the MSE loss, whose gradient
   ``2 w (pred - target) / (N*C*H*W)`` needs no reduction first) the same pass also writes ``grad_pred``: forward
   and backward together read pred, target and the weights once and write the gradient once.
2. ``_patch_loss_epilogue_kernel``: finishes the per-sample sums and computes the pair log-ratio, the logsigmoid
   loss, the implicit accuracy and the per-sample backward coefficients; one program per 128 lanes (samples or
   pairs), with ``_block_sum_kernel`` adding the programs' shares of the loss in a fixed order when there are
   several (deterministic; registers do not grow with the batch).
3. ``_patch_loss_bwd_kernel``: one pass writing ``grad_pred = grad_output * coef_i * w_i,p * 2 (pred - target) /
   (C*H*W)`` (the DPO losses, whose coefficient needs the whole forward reduction).
4. ``_scale_kernel``: multiplies the one-pass gradient by ``grad_output`` in place; it reads ``grad_output`` on the
   device and returns at once when it is 1 (no host synchronization, no traffic in the common case).

Tiles are 3-D blocks ``[BLOCK_C, BLOCK_H, BLOCK_W]`` of one sample, arranged so that the contiguous dimension is
last: ``(c, y, x)`` for NCHW and ``(y, x, c)`` for channels_last. The patch weight depends on ``(y, x)`` only, so
each program loads the ``[BLOCK_H, BLOCK_W]`` weights of its pixels once and broadcasts them over the channels
(instead of gathering one weight per element); within a patch's row the repeated weight addresses of neighbouring
pixels are one transaction for the hardware. Every tensor is addressed through its own strides with int64 offsets,
so non-contiguous inputs need no copy. Loads are upcast to fp32 before any arithmetic (fp16/bf16 inputs); results
are never rounded into low-precision buffers except the final ``grad_pred`` store.

Launch helpers start kernels through :func:`patchdpo_fast.kernels.launch.launch`, so that launches can be recorded
(ahead-of-time compile checks, byte counts) instead of run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import launch as _launch
from .launch import nbytes as _nbytes

__all__ = [
    "INTERPRET",
    "MAX_BATCH",
    "TileConfig",
    "patch_loss_backward",
    "patch_loss_epilogue",
    "patch_loss_forward",
    "scale_gradient_",
    "tile_config",
]

#: True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` set before import).
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: samples per call: the batch is the second grid dimension, which CUDA limits to 65535
MAX_BATCH = 65535

_LAYOUT_NCHW = 0
_LAYOUT_NHWC = 1


@triton.jit
def _idx(v, WIDE: tl.constexpr):
    """Index vectors are int32 unless a sample's offsets may exceed 2**31 - 1 (``WIDE``, decided by the launcher)."""
    if WIDE:
        return v.to(tl.int64)
    return v


@triton.jit
def _pixel_tile(pid_t, C, H, W, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                WIDE: tl.constexpr):  # fmt: skip
    """NCHW: tile ``pid_t`` as channels ``[c_lo, c_hi)`` and pixel coordinates ``y [BH, 1]``, ``x [1, BW]``."""
    n_w = tl.cdiv(W, BLOCK_W)
    n_h = tl.cdiv(H, BLOCK_H)
    pid_w = pid_t % n_w
    rest = pid_t // n_w
    pid_h = rest % n_h
    c_lo = (rest // n_h) * BLOCK_C
    c_hi = tl.minimum(c_lo + BLOCK_C, C)
    y = (pid_h * BLOCK_H + tl.arange(0, BLOCK_H))[:, None]
    x = (pid_w * BLOCK_W + tl.arange(0, BLOCK_W))[None, :]
    return c_lo, c_hi, _idx(y, WIDE), _idx(x, WIDE), (y < H) & (x < W)


@triton.jit
def _row_tile(pid_t, C, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, WIDE: tl.constexpr):
    """channels_last: tile ``pid_t`` of the ``[H, W*C]`` row view as ``y [BH, 1]`` and ``col, x, c [1, BW]``."""
    n_k = tl.cdiv(W * C, BLOCK_W)
    rows = (pid_t // n_k) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = (pid_t % n_k) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = (rows < H)[:, None] & (cols < W * C)[None, :]
    col = _idx(cols[None, :], WIDE)
    return _idx(rows[:, None], WIDE), col, col // C, col % C, mask


@triton.jit
def _row_offsets(y, col, x, c, s_c, s_h, s_w, DENSE_ROWS: tl.constexpr):
    """In-sample offsets of a channels_last tile; with ``DENSE_ROWS`` (every tensor has ``s_c == 1`` and
    ``s_w == C``) the ``(x, c)`` columns are plain contiguous offsets, which lets the compiler emit vector loads."""
    if DENSE_ROWS:
        return y * s_h + col
    return y * s_h + (x * s_w + c * s_c)


@triton.jit
def _weight_load(base, y, x, SH, SW, s_h, s_w, mask):
    """Patch weights of a tile's pixels from one sample's ``(h, w)`` map (never upsampled), upcast to fp32."""
    return tl.load(base + ((y // SH) * s_h + (x // SW) * s_w), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _fwd_tile(
    pred_ptr, target_ptr, ref_ptr, grad_ptr, p_offs, t_offs, r_offs, g_offs, mask, w, grad_scale,
    HAS_WEIGHT: tl.constexpr, HAS_REF: tl.constexpr, WRITE_GRAD: tl.constexpr,
):  # fmt: skip
    """Elementwise part of the forward on one tile: ``(w*sq, sq, w*(sq - ref_sq))`` (and the gradient store)."""
    pred = tl.load(pred_ptr + p_offs, mask=mask, other=0.0).to(tl.float32)
    target = tl.load(target_ptr + t_offs, mask=mask, other=0.0).to(tl.float32)
    diff = pred - target
    sq = diff * diff
    wsq = w * sq if HAS_WEIGHT else sq
    dsq = sq
    if HAS_REF:
        # The DPO log-ratio needs m - r, a small difference of two large errors when the reference model is close
        # to the policy (exactly equal at step 0). Accumulating (pred-t)^2 - (ref-t)^2 = (pred-ref)(pred+ref-2t)
        # directly avoids that cancellation.
        ref = tl.load(ref_ptr + r_offs, mask=mask, other=0.0).to(tl.float32)
        dsq = (pred - ref) * (diff + (ref - target))
        if HAS_WEIGHT:
            dsq = w * dsq
    if WRITE_GRAD:
        grad = grad_scale * diff
        if HAS_WEIGHT:
            grad = grad * w
        tl.store(grad_ptr + g_offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    return wsq, sq, dsq


# T and plane only address the partial sums: no need to compile a variant per divisibility of the batch or size.
@triton.jit(do_not_specialize=["T", "plane"])
def _patch_loss_fwd_kernel(
    # -- inputs, each (N, C, H, W) with its own strides ------------------------------------------------
    pred_ptr, s_pn, s_pc, s_ph, s_pw,
    target_ptr, s_tn, s_tc, s_th, s_tw,
    ref_ptr, s_rn, s_rc, s_rh, s_rw,  # ignored unless HAS_REF
    # -- patch weights (N, h, w) --------------------------------------------------------------------------
    weight_ptr, s_wn, s_wh, s_ww,  # ignored unless HAS_WEIGHT
    # -- output: grad_pred (N, C, H, W), written only when WRITE_GRAD ---------------------------------------
    grad_ptr, s_gn, s_gc, s_gh, s_gw,
    # -- output: fp32 partial sums, contiguous (planes, N, T) ----------------------------------------------
    # [0] sum w*(pred-t)^2, [1] sum (pred-t)^2, [2] sum w*((pred-t)^2 - (ref-t)^2); one column per tile
    partial_ptr,
    # -- sizes ---------------------------------------------------------------------------------------------
    C, H, W,
    SH, SW,  # patch stride: weight cell (y // SH, x // SW)
    T,  # tiles per sample
    plane,  # N * T: distance between the partial-sum planes
    grad_scale,  # 2 / (N*C*H*W): d loss / d pred = grad_scale * w * (pred - target), when WRITE_GRAD
    # -- compile-time switches -----------------------------------------------------------------------------
    LAYOUT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_REF: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    DENSE_ROWS: tl.constexpr,  # channels_last only: every tensor has s_c == 1 and s_w == C
    WIDE: tl.constexpr,  # in-sample offsets need int64
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1).to(tl.int64)
    # per-sample base pointers (int64 arithmetic); offsets inside a sample are int32 unless WIDE
    pred_ptr += pid_n * s_pn
    target_ptr += pid_n * s_tn
    ref_ptr += pid_n * s_rn
    grad_ptr += pid_n * s_gn
    weight_ptr += pid_n * s_wn
    if LAYOUT == 0:
        # NCHW: a [BLOCK_H, BLOCK_W] pixel tile, walked over BLOCK_C channels; its patch weights are loaded once
        # and shared by every channel.
        c_lo, c_hi, y, x, mask = _pixel_tile(pid_t, C, H, W, BLOCK_C, BLOCK_H, BLOCK_W, WIDE)
        w = 1.0
        if HAS_WEIGHT:
            w = _weight_load(weight_ptr, y, x, SH, SW, s_wh, s_ww, mask)
        acc_w = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
        acc_s = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
        acc_d = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
        c = c_lo.to(tl.int64)  # loop-carried int64 channel index (the loop variable is int32)
        for _ in range(c_lo, c_hi):
            wsq, sq, dsq = _fwd_tile(
                pred_ptr + c * s_pc, target_ptr + c * s_tc, ref_ptr + c * s_rc, grad_ptr + c * s_gc,
                y * s_ph + x * s_pw, y * s_th + x * s_tw, y * s_rh + x * s_rw, y * s_gh + x * s_gw,
                mask, w, grad_scale, HAS_WEIGHT, HAS_REF, WRITE_GRAD,
            )  # fmt: skip
            acc_w += wsq
            acc_s += sq
            acc_d += dsq
            c += 1
    else:
        # channels_last: a [BLOCK_H, BLOCK_W] tile of the [H, W*C] row view (contiguous (x, c) columns); the C
        # channels of a pixel are neighbours there and gather the same weight address (one transaction).
        y, col, x, c, mask = _row_tile(pid_t, C, H, W, BLOCK_H, BLOCK_W, WIDE)
        w = 1.0
        if HAS_WEIGHT:
            w = _weight_load(weight_ptr, y, x, SH, SW, s_wh, s_ww, mask)
        acc_w, acc_s, acc_d = _fwd_tile(
            pred_ptr, target_ptr, ref_ptr, grad_ptr,
            _row_offsets(y, col, x, c, s_pc, s_ph, s_pw, DENSE_ROWS),
            _row_offsets(y, col, x, c, s_tc, s_th, s_tw, DENSE_ROWS),
            _row_offsets(y, col, x, c, s_rc, s_rh, s_rw, DENSE_ROWS),
            _row_offsets(y, col, x, c, s_gc, s_gh, s_gw, DENSE_ROWS),
            mask, w, grad_scale, HAS_WEIGHT, HAS_REF, WRITE_GRAD,
        )  # fmt: skip

    out = partial_ptr + pid_n * T + pid_t
    tl.store(out, tl.sum(tl.sum(acc_w, axis=1), axis=0))
    tl.store(out + plane, tl.sum(tl.sum(acc_s, axis=1), axis=0))
    if HAS_REF:
        tl.store(out + 2 * plane, tl.sum(tl.sum(acc_d, axis=1), axis=0))


@triton.jit
def _row_sums(ptr, rows, row_mask, T, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr):
    """Sum the ``T`` partials of each selected row of a contiguous ``(N, T)`` fp32 plane."""
    acc = tl.zeros((BLOCK_S,), dtype=tl.float32)
    base = rows.to(tl.int64) * T
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        m = row_mask[:, None] & (t < T)[None, :]
        vals = tl.load(ptr + base[:, None] + t[None, :], mask=m, other=0.0)
        acc += tl.sum(vals, axis=1)
    return acc


@triton.jit(do_not_specialize=["N", "T", "plane"])
def _patch_loss_epilogue_kernel(
    # -- input: fp32 partial sums (planes, N, T) from the forward kernel ----------------------------------
    partial_ptr, N, T,
    plane,  # N * T
    # -- scalars ---------------------------------------------------------------------------------------------
    inv_numel,  # 1 / (C*H*W): turns sums into means over a sample
    beta,  # DPO temperature (unused for the MSE loss)
    inv_lanes,  # 1 / number of pairs (DPO) or samples (MSE)
    # -- outputs (fp32) --------------------------------------------------------------------------------------
    loss_ptr,  # ()
    model_err_ptr, model_mse_ptr, ref_err_ptr, coef_ptr,  # (N,)
    log_ratio_ptr,  # (N/2,)
    acc_ptr,  # () implicit accuracy
    block_ptr,  # (2, programs) fp32 per-program loss and accuracy shares; unused when SINGLE
    # -- compile-time switches ------------------------------------------------------------------------------
    IS_DPO: tl.constexpr,
    SINGLE: tl.constexpr,  # one program covers every lane: it writes the loss itself
    BLOCK_S: tl.constexpr,  # lanes (samples for MSE, pairs for DPO) per program
    BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Per-sample terms for ``BLOCK_S`` lanes; the loss (and accuracy) as this program's share of the mean.

    With several programs the shares go to ``block_ptr`` and ``_block_sum_kernel`` adds them up in a fixed order
    (deterministic, unlike atomics), so the register footprint per program does not grow with N.
    """
    pid = tl.program_id(0)
    lanes = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    if IS_DPO:
        B = N // 2
        lm = lanes < B
        win = lanes
        lose = lanes + B
        wm_w = _row_sums(partial_ptr, win, lm, T, BLOCK_S, BLOCK_T) * inv_numel
        wm_l = _row_sums(partial_ptr, lose, lm, T, BLOCK_S, BLOCK_T) * inv_numel
        tl.store(model_err_ptr + win, wm_w, mask=lm)
        tl.store(model_err_ptr + lose, wm_l, mask=lm)
        m_w = _row_sums(partial_ptr + plane, win, lm, T, BLOCK_S, BLOCK_T) * inv_numel
        m_l = _row_sums(partial_ptr + plane, lose, lm, T, BLOCK_S, BLOCK_T) * inv_numel
        tl.store(model_mse_ptr + win, m_w, mask=lm)
        tl.store(model_mse_ptr + lose, m_l, mask=lm)
        # model minus reference error per sample, accumulated without cancellation by the forward kernel
        dd_w = _row_sums(partial_ptr + 2 * plane, win, lm, T, BLOCK_S, BLOCK_T) * inv_numel
        dd_l = _row_sums(partial_ptr + 2 * plane, lose, lm, T, BLOCK_S, BLOCK_T) * inv_numel
        tl.store(ref_err_ptr + win, wm_w - dd_w, mask=lm)
        tl.store(ref_err_ptr + lose, wm_l - dd_l, mask=lm)

        log_ratio = dd_w - dd_l
        x = -0.5 * beta * log_ratio
        # Stable logsigmoid(x) = min(x, 0) - log(1 + exp(-|x|)) and sigmoid(-x), which is d/dx logsigmoid(x).
        z = tl.exp(-tl.abs(x))
        # log1p(z): a short series where log(1 + z) would round away most of a small z (confident pairs)
        log1p_z = tl.where(z < 1e-3, z * (1.0 - z * (0.5 - z * (1.0 / 3.0))), tl.log(1.0 + z))
        logsig = tl.minimum(x, 0.0) - log1p_z
        sig_neg = tl.where(x >= 0, z / (1.0 + z), 1.0 / (1.0 + z))
        inv_b = inv_lanes
        loss = -tl.sum(tl.where(lm, logsig, 0.0), axis=0) * inv_b
        # dL/dD = beta / (2B) * sigmoid(-x); winners enter D with +, losers with -.
        g = 0.5 * beta * inv_b * sig_neg
        acc = tl.sum(tl.where(lm & (log_ratio < 0), 1.0, 0.0), axis=0) * inv_b

        tl.store(coef_ptr + win, g, mask=lm)
        tl.store(coef_ptr + lose, -g, mask=lm)
        tl.store(log_ratio_ptr + lanes, log_ratio, mask=lm)
        if SINGLE:
            tl.store(acc_ptr, acc)
            tl.store(loss_ptr, loss)
        else:
            tl.store(block_ptr + pid, loss)
            tl.store(block_ptr + tl.num_programs(0) + pid, acc)
    else:
        lm = lanes < N
        wm = _row_sums(partial_ptr, lanes, lm, T, BLOCK_S, BLOCK_T) * inv_numel
        tl.store(model_err_ptr + lanes, wm, mask=lm)
        m = _row_sums(partial_ptr + plane, lanes, lm, T, BLOCK_S, BLOCK_T) * inv_numel
        tl.store(model_mse_ptr + lanes, m, mask=lm)
        inv_n = inv_lanes
        tl.store(coef_ptr + lanes, wm * 0.0 + inv_n, mask=lm)
        loss = tl.sum(tl.where(lm, wm, 0.0), axis=0) * inv_n
        if SINGLE:
            tl.store(loss_ptr, loss)
        else:
            tl.store(block_ptr + pid, loss)


@triton.jit(do_not_specialize=["P"])
def _block_sum_kernel(
    block_ptr, P,  # (2, P) fp32 per-program shares from the epilogue
    loss_ptr, acc_ptr,
    HAS_ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Second level of the epilogue: add the ``P`` per-program shares of the loss (and accuracy) in order."""
    loss = tl.zeros((BLOCK,), dtype=tl.float32)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        m = p < P
        loss += tl.load(block_ptr + p, mask=m, other=0.0)
        if HAS_ACC:
            acc += tl.load(block_ptr + P + p, mask=m, other=0.0)
    tl.store(loss_ptr, tl.sum(loss, axis=0))
    if HAS_ACC:
        tl.store(acc_ptr, tl.sum(acc, axis=0))


@triton.jit
def _patch_loss_bwd_kernel(
    # -- inputs ------------------------------------------------------------------------------------------------
    pred_ptr, s_pn, s_pc, s_ph, s_pw,
    target_ptr, s_tn, s_tc, s_th, s_tw,
    weight_ptr, s_wn, s_wh, s_ww,  # ignored unless HAS_WEIGHT
    coef_ptr,  # (N,) fp32 per-sample dL/d(model_err) from the epilogue
    grad_out_ptr,  # (1,) fp32 upstream gradient of the loss (loss scaling, accumulation)
    # -- output -------------------------------------------------------------------------------------------------
    grad_ptr, s_gn, s_gc, s_gh, s_gw,
    # -- sizes ----------------------------------------------------------------------------------------------------
    C, H, W, SH, SW,
    scale,  # 2 / (C*H*W)
    LAYOUT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    DENSE_ROWS: tl.constexpr,  # channels_last only: every tensor has s_c == 1 and s_w == C
    WIDE: tl.constexpr,  # in-sample offsets need int64
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1).to(tl.int64)
    g = tl.load(grad_out_ptr) * tl.load(coef_ptr + pid_n) * scale
    pred_ptr += pid_n * s_pn
    target_ptr += pid_n * s_tn
    grad_ptr += pid_n * s_gn
    weight_ptr += pid_n * s_wn
    if LAYOUT == 0:
        c_lo, c_hi, y, x, mask = _pixel_tile(pid_t, C, H, W, BLOCK_C, BLOCK_H, BLOCK_W, WIDE)
        gw = g
        if HAS_WEIGHT:
            gw = g * _weight_load(weight_ptr, y, x, SH, SW, s_wh, s_ww, mask)
        p_offs = y * s_ph + x * s_pw
        t_offs = y * s_th + x * s_tw
        g_offs = y * s_gh + x * s_gw
        c = c_lo.to(tl.int64)
        for _ in range(c_lo, c_hi):
            pred = tl.load(pred_ptr + c * s_pc + p_offs, mask=mask, other=0.0).to(tl.float32)
            target = tl.load(target_ptr + c * s_tc + t_offs, mask=mask, other=0.0).to(tl.float32)
            grad = gw * (pred - target)
            tl.store(grad_ptr + c * s_gc + g_offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)
            c += 1
    else:
        y, col, x, c, mask = _row_tile(pid_t, C, H, W, BLOCK_H, BLOCK_W, WIDE)
        gw = g
        if HAS_WEIGHT:
            gw = g * _weight_load(weight_ptr, y, x, SH, SW, s_wh, s_ww, mask)
        p_offs = _row_offsets(y, col, x, c, s_pc, s_ph, s_pw, DENSE_ROWS)
        t_offs = _row_offsets(y, col, x, c, s_tc, s_th, s_tw, DENSE_ROWS)
        pred = tl.load(pred_ptr + p_offs, mask=mask, other=0.0).to(tl.float32)
        target = tl.load(target_ptr + t_offs, mask=mask, other=0.0).to(tl.float32)
        grad = gw * (pred - target)
        g_offs = _row_offsets(y, col, x, c, s_gc, s_gh, s_gw, DENSE_ROWS)
        tl.store(grad_ptr + g_offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["numel"])
def _scale_kernel(x_ptr, numel, g_ptr, BLOCK: tl.constexpr):
    """``x *= g`` over a dense buffer, where the scalar ``g`` is read on the device; nothing is touched if g == 1."""
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < numel
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(x_ptr + offs, (x * g).to(x_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileConfig:
    """Tile of the streaming kernels and its warp count.

    NCHW: a program covers ``block_h x block_w`` pixels and walks ``block_c`` channels over them (the patch weights
    of its pixels are loaded once). channels_last: ``block_h`` rows by ``block_w`` contiguous ``(x, c)`` elements of
    the ``[H, W*C]`` row view (``block_c`` is 1).
    """

    block_c: int
    block_h: int
    block_w: int
    num_warps: int


def _layout(t: torch.Tensor) -> int:
    """Channels_last layout when the channel stride is 1 and the sample is dense in (H, W, C) order."""
    _, c, _, w = t.shape
    s = t.stride()
    if c > 1 and s[1] == 1 and s[3] == c and s[2] == w * c:
        return _LAYOUT_NHWC
    return _LAYOUT_NCHW


def tile_config(c: int, h: int, w: int, layout: int, interpret: bool = INTERPRET) -> TileConfig:
    """Pick the tile for a ``(C, H, W)`` sample.

    On the GPU: NCHW programs take 1024 pixels per step (4 warps, 8 elements per thread: one or two 16-byte vector
    loads), in rows of at most 64, and walk up to 16 channels; channels_last programs take 2048 elements (8 warps,
    8 per thread) in rows of at most 256 contiguous elements. One tile shape then serves every latent size from
    64 px up (fewer compiles), and the tiles compile without register spills on sm_80 and sm_90 for every dtype
    (``patchdpo kernels-report``). Under the interpreter every program instance costs ~1 ms of Python, so tiles are
    made as large as 64K elements. ``PATCHDPO_FAST_TILE="C,H,W,WARPS"`` overrides the choice (for tuning on new
    hardware; sizes are rounded up to powers of two, C is ignored for channels_last).
    """
    override = os.environ.get("PATCHDPO_FAST_TILE")
    if override:
        bc, bh, bw, warps = (int(v) for v in override.split(","))
        bh, bw = (triton.next_power_of_2(max(1, v)) for v in (bh, bw))
        return TileConfig(max(1, bc) if layout == _LAYOUT_NCHW else 1, bh, bw, warps)
    if layout == _LAYOUT_NCHW:
        pixels = 65536 if interpret else 1024
        block_w = min(triton.next_power_of_2(w), 1024 if interpret else 64)
        block_h = max(1, min(triton.next_power_of_2(h), pixels // block_w))
        block_c = c if interpret else min(c, 16)
        warps = 4 if block_h * block_w >= 1024 else max(1, min(4, block_h * block_w // 256))
        return TileConfig(block_c, block_h, block_w, warps)
    budget = 65536 if interpret else 2048
    block_w = min(triton.next_power_of_2(w * c), 1024 if interpret else 256)
    block_h = max(1, min(triton.next_power_of_2(h), budget // block_w))
    return TileConfig(1, block_h, block_w, 8 if block_h * block_w >= 2048 else 4)


def _dense_rows(layout: int, c: int, *tensors: torch.Tensor | None) -> bool:
    """channels_last tiles may use plain column offsets: every tensor has channel stride 1 and pixel stride C."""
    return layout == _LAYOUT_NHWC and all(t is None or (t.stride(1) == 1 and t.stride(3) == c) for t in tensors)


def _wide(*tensors: torch.Tensor | None) -> bool:
    """Whether offsets inside one sample might not fit int32 (tiles may overhang each dimension by < its size)."""
    for t in tensors:
        if t is not None:
            reach = sum(abs(st) * n for st, n in zip(t.stride()[1:], t.shape[1:], strict=True))
            if 2 * reach >= 2**31:
                return True
    return False


def _tiles(c: int, h: int, w: int, layout: int, cfg: TileConfig) -> int:
    if layout == _LAYOUT_NCHW:
        return triton.cdiv(c, cfg.block_c) * triton.cdiv(h, cfg.block_h) * triton.cdiv(w, cfg.block_w)
    return triton.cdiv(h, cfg.block_h) * triton.cdiv(w * c, cfg.block_w)


def _strides4(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)  # type: ignore[return-value]


def _weight_view(weight: torch.Tensor | None) -> tuple[torch.Tensor | None, tuple[int, int, int], int, int]:
    if weight is None:
        return None, (0, 0, 0), 1, 1
    w3 = weight[:, 0] if weight.dim() == 4 else weight
    return w3, tuple(w3.stride()), w3.shape[1], w3.shape[2]  # type: ignore[return-value]


def _is_dense(t: torch.Tensor) -> bool:
    """Its elements fill a contiguous block of memory in some dimension order (what ``torch.empty_like`` makes)."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape, strict=True) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _check_batch(n: int) -> None:
    if n > MAX_BATCH:
        raise ValueError(
            f"the fused PatchDPO kernels take at most {MAX_BATCH} samples per call (CUDA grid limit), got N = {n}; "
            "split the batch"
        )


def _epilogue_config(lanes: int, tiles: int, interpret: bool = INTERPRET) -> tuple[int, int, int]:
    """``(BLOCK_S, BLOCK_T, programs)`` of the epilogue for ``lanes`` samples/pairs with ``tiles`` partials each.

    A program owns at most 128 lanes on the GPU (one lane per thread of its 4 warps, so registers do not grow with N)
    and reads ``[BLOCK_S, BLOCK_T]`` slabs of about 1024 partial sums at a time; under the interpreter 1024 lanes and
    64K-element slabs (fewer, larger program instances).
    """
    cap, slab = (1024, 65536) if interpret else (128, 1024)
    block_s = min(triton.next_power_of_2(max(lanes, 1)), cap)
    block_t = max(1, min(triton.next_power_of_2(max(tiles, 1)), slab // block_s))
    return block_s, block_t, triton.cdiv(max(lanes, 1), block_s)


def patch_loss_epilogue(partial: torch.Tensor, numel: int, beta: float, is_dpo: bool) -> dict[str, torch.Tensor]:
    """Reduce the forward kernel's ``(planes, N, T)`` fp32 partial sums to the loss and per-sample terms.

    ``numel`` is ``C*H*W`` (the elements of one sample). Returns the dictionary described in
    :func:`patch_loss_forward`. One program per 128 lanes (samples for the MSE, pairs for DPO); when there are
    several, a second one-program kernel adds their shares of the loss in a fixed order.
    """
    _, n, tiles = partial.shape
    dev, f32 = partial.device, torch.float32
    half = n // 2 if is_dpo else 0
    out = {
        "loss": torch.empty((), device=dev, dtype=f32),
        "model_err": torch.empty(n, device=dev, dtype=f32),
        "model_mse": torch.empty(n, device=dev, dtype=f32),
        "ref_err": torch.empty(n if is_dpo else 0, device=dev, dtype=f32),
        "coef": torch.empty(n, device=dev, dtype=f32),
        "log_ratio": torch.empty(half, device=dev, dtype=f32),
        "implicit_acc": torch.empty((), device=dev, dtype=f32),
    }
    lanes = half if is_dpo else n
    block_s, block_t, programs = _epilogue_config(lanes, tiles)
    single = programs == 1
    shares = out["loss"] if single else torch.empty((2, programs), device=dev, dtype=f32)
    share_bytes = 4 * programs * (2 if is_dpo else 1)
    scalars = (("loss", 4),) + ((("implicit_acc", 4),) if is_dpo else ())
    per_sample = ("model_err", "model_mse", "coef", *(("ref_err", "log_ratio") if is_dpo else ()))
    _launch(
        _patch_loss_epilogue_kernel,
        (programs,),
        (
            partial, n, tiles, n * tiles,
            1.0 / numel, float(beta), 1.0 / max(lanes, 1),
            out["loss"], out["model_err"], out["model_mse"],
            out["ref_err"] if is_dpo else out["model_err"],
            out["coef"],
            out["log_ratio"] if is_dpo else out["model_err"],
            out["implicit_acc"],
            shares,
        ),
        {"IS_DPO": is_dpo, "SINGLE": single, "BLOCK_S": block_s, "BLOCK_T": block_t, "num_warps": 4},
        lambda: (
            (("partial sums", _nbytes(partial)),),
            tuple((k, _nbytes(out[k])) for k in per_sample) + (scalars if single else (("loss shares", share_bytes),)),
        ),
    )  # fmt: skip
    if not single:
        _launch(
            _block_sum_kernel,
            (1,),
            (shares, programs, out["loss"], out["implicit_acc"]),
            {"HAS_ACC": is_dpo, "BLOCK": min(triton.next_power_of_2(programs), 1024), "num_warps": 4},
            lambda: ((("loss shares", share_bytes),), scalars),
        )
    return out


def patch_loss_forward(
    pred: torch.Tensor,
    target: torch.Tensor,
    ref_pred: torch.Tensor | None,
    weight: torch.Tensor | None,
    beta: float,
    is_dpo: bool,
    write_grad: bool = False,
) -> dict[str, torch.Tensor]:
    """Run the fused forward pass and the pair epilogue.

    Inputs must already be validated (see ``patchdpo_fast.ops.validation``). Returns fp32 tensors ``loss``,
    ``model_err``, ``model_mse``, ``ref_err``, ``log_ratio``, ``implicit_acc`` and ``coef`` (the per-sample
    backward coefficient consumed by :func:`patch_loss_backward`). For the MSE loss (``is_dpo=False``)
    ``ref_err``, ``log_ratio`` and ``implicit_acc`` are empty.

    ``write_grad=True`` (MSE loss only) also returns ``grad_pred``, the gradient of ``loss`` for a grad_output of 1,
    written by the same pass (pred's dtype and, where pred is dense, its memory layout); scale it with
    :func:`scale_gradient_`.
    """
    if write_grad and (is_dpo or ref_pred is not None):
        raise ValueError("write_grad is for the MSE loss: the DPO gradient needs the whole forward reduction first")
    n, c, h, w = pred.shape
    _check_batch(n)
    layout = _layout(pred)
    cfg = tile_config(c, h, w, layout)
    tiles = _tiles(c, h, w, layout, cfg)
    w3, w_strides, gh, gw = _weight_view(weight)
    has_ref = ref_pred is not None
    partial = torch.empty((3 if has_ref else 2, n, tiles), device=pred.device, dtype=torch.float32)
    grad = torch.empty_like(pred) if write_grad else None
    _launch(
        _patch_loss_fwd_kernel,
        (tiles, n),
        (
            pred, *pred.stride(),
            target, *target.stride(),
            ref_pred if has_ref else pred, *_strides4(ref_pred),
            w3 if w3 is not None else pred, *w_strides,
            grad if grad is not None else pred, *_strides4(grad),
            partial,
            c, h, w,
            h // gh, w // gw,
            tiles,
            n * tiles,
            2.0 / (n * c * h * w),
        ),
        {
            "LAYOUT": layout,
            "HAS_WEIGHT": weight is not None,
            "HAS_REF": has_ref,
            "WRITE_GRAD": write_grad,
            "DENSE_ROWS": _dense_rows(layout, c, pred, target, ref_pred, grad),
            "WIDE": _wide(pred, target, ref_pred, grad, w3),
            "BLOCK_C": cfg.block_c,
            "BLOCK_H": cfg.block_h,
            "BLOCK_W": cfg.block_w,
            "num_warps": cfg.num_warps,
        },
        lambda: (
            (("pred", _nbytes(pred)), ("target", _nbytes(target)), ("ref_pred", _nbytes(ref_pred)),
             ("weight", _nbytes(w3))),
            (("partial sums", _nbytes(partial)), ("grad_pred", _nbytes(grad))),
        ),
    )  # fmt: skip
    out = patch_loss_epilogue(partial, c * h * w, beta, is_dpo)
    if grad is not None:
        out["grad_pred"] = grad
    return out


def scale_gradient_(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """Multiply a dense gradient by the 1-element ``grad_output`` in place, on the device, without a host sync.

    The kernel reads ``grad_output`` and returns at once when it equals 1 (the common case costs one tiny launch
    and no traffic). For fp16/bf16 gradients a scale other than a power of two rounds the gradient a second time.
    """
    if not _is_dense(grad):
        raise ValueError(
            f"scale_gradient_ needs a dense gradient (no gaps or overlaps in memory), got strides {grad.stride()}"
        )
    g = grad_output.detach().reshape(1)
    numel = grad.numel()
    block = 65536 if INTERPRET else 4096

    def traffic():
        moves = float(g.float()) != 1.0 if g.device.type != "meta" else True
        touched = _nbytes(grad) if moves else 0
        return (("grad_output", g.element_size()), ("grad_pred", touched)), (("grad_pred", touched),)

    _launch(_scale_kernel, (triton.cdiv(numel, block),), (grad, numel, g), {"BLOCK": block, "num_warps": 8}, traffic)
    return grad


def patch_loss_backward(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    coef: torch.Tensor,
    grad_output: torch.Tensor,
) -> torch.Tensor:
    """Write ``grad_pred = grad_output * coef_i * w_i,p * 2 (pred - target) / (C*H*W)`` in one pass.

    ``grad_output`` is a 0-d or 1-element tensor on ``pred``'s device (read by the kernel, no host sync). The
    gradient has ``pred``'s dtype and, where ``pred`` is dense, its memory layout.
    """
    n, c, h, w = pred.shape
    _check_batch(n)
    layout = _layout(pred)
    cfg = tile_config(c, h, w, layout)
    grad = torch.empty_like(pred)
    w3, w_strides, gh, gw = _weight_view(weight)
    g_out = grad_output.detach().reshape(1).to(torch.float32)
    _launch(
        _patch_loss_bwd_kernel,
        (_tiles(c, h, w, layout, cfg), n),
        (
            pred, *pred.stride(),
            target, *target.stride(),
            w3 if w3 is not None else pred, *w_strides,
            coef,
            g_out,
            grad, *grad.stride(),
            c, h, w,
            h // gh, w // gw,
            2.0 / (c * h * w),
        ),
        {
            "LAYOUT": layout,
            "HAS_WEIGHT": weight is not None,
            "DENSE_ROWS": _dense_rows(layout, c, pred, target, grad),
            "WIDE": _wide(pred, target, grad, w3),
            "BLOCK_C": cfg.block_c,
            "BLOCK_H": cfg.block_h,
            "BLOCK_W": cfg.block_w,
            "num_warps": cfg.num_warps,
        },
        lambda: (
            (("pred", _nbytes(pred)), ("target", _nbytes(target)), ("weight", _nbytes(w3)),
             ("coef", _nbytes(coef)), ("grad_output", 4)),
            (("grad_pred", _nbytes(grad)),),
        ),
    )  # fmt: skip
    return grad
