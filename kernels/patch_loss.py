"""Fused Triton kernels for the PatchDPO loss family and their launch helpers.

Three kernels (DESIGN.md section 3):

1. ``_patch_loss_fwd_kernel``: one pass over ``pred``, ``target`` (and ``ref_pred``) that reduces each tile of a
   sample straight to fp32 partial sums: ``sum w*(pred-target)^2``, ``sum (pred-target)^2`` and
   ``sum w*((pred-target)^2 - (ref_pred-target)^2)`` (the model-minus-reference error, accumulated as
   ``(pred-ref_pred)*(pred+ref_pred-2*target)`` so that it does not cancel when the two models are close).
   The patch weight of an element is gathered from the small ``(N, h, w)`` map by integer division of its
   coordinates; no squared-error tensor and no upsampled weight map exist.
2. ``_patch_loss_epilogue_kernel``: a single program that finishes the per-sample sums and computes the pair
   log-ratio, the logsigmoid loss, the implicit accuracy and the per-sample backward coefficients.
3. ``_patch_loss_bwd_kernel``: one pass writing ``grad_pred = grad_output * coef_i * w_i,p * 2 (pred - target) /
   (C*H*W)``.

Every tensor is addressed through its own strides with int64 offsets, so non-contiguous and channels_last
inputs need no copy. Loads are upcast to fp32 before any arithmetic (fp16/bf16 inputs); results are never
rounded into low-precision buffers except the final ``grad_pred`` store.

Each sample is viewed as a 2-D ``[rows, cols]`` array whose ``cols`` are contiguous in memory for the two
common layouts: NCHW (``rows = (c, y)``, ``cols = x``) and channels_last (``rows = y``, ``cols = (x, c)``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = [
    "INTERPRET",
    "TileConfig",
    "patch_loss_backward",
    "patch_loss_forward",
    "tile_config",
]

#: True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` set before import).
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

_LAYOUT_NCHW = 0
_LAYOUT_NHWC = 1


@triton.jit
def _tile_offsets(
    pid_r,
    pid_k,
    C,
    H,
    W,
    LAYOUT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Coordinates of one tile: row/col index vectors split into (c, y) and (x, c) parts, plus the mask."""
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    if LAYOUT == 0:  # NCHW: rows enumerate (c, y), cols enumerate x
        row_mask = rows < C * H
        col_mask = cols < W
        c_row = rows // H
        y = rows % H
        x = cols
        c_col = cols * 0
    else:  # channels_last: rows enumerate y, cols enumerate (x, c)
        row_mask = rows < H
        col_mask = cols < W * C
        c_row = rows * 0
        y = rows
        x = cols // C
        c_col = cols % C
    mask = row_mask[:, None] & col_mask[None, :]
    return c_row.to(tl.int64), y.to(tl.int64), x.to(tl.int64), c_col.to(tl.int64), mask


@triton.jit
def _strided_load(ptr, n, c_row, y, x, c_col, s_n, s_c, s_h, s_w, mask):
    """Load one tile of an ``(N, C, H, W)`` tensor through its strides and upcast it to fp32."""
    row_off = c_row * s_c + y * s_h
    col_off = c_col * s_c + x * s_w
    offs = n * s_n + row_off[:, None] + col_off[None, :]
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _weight_load(ptr, n, y, x, SH, SW, s_n, s_h, s_w, mask):
    """Gather the patch weight of every element of a tile from the ``(N, h, w)`` map (never upsampled)."""
    offs = n * s_n + ((y // SH) * s_h)[:, None] + ((x // SW) * s_w)[None, :]
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _patch_loss_fwd_kernel(
    # -- inputs, each (N, C, H, W) with its own strides ------------------------------------------------
    pred_ptr, s_pn, s_pc, s_ph, s_pw,
    target_ptr, s_tn, s_tc, s_th, s_tw,
    ref_ptr, s_rn, s_rc, s_rh, s_rw,  # ignored unless HAS_REF
    # -- patch weights (N, h, w) --------------------------------------------------------------------------
    weight_ptr, s_wn, s_wh, s_ww,  # ignored unless HAS_WEIGHT
    # -- output: fp32 partial sums, contiguous (3, N, T) --------------------------------------------------
    # [0] sum w*(pred-t)^2, [1] sum (pred-t)^2, [2] sum w*((pred-t)^2 - (ref-t)^2); one column per tile
    partial_ptr,
    # -- sizes ---------------------------------------------------------------------------------------------
    N, C, H, W,
    SH, SW,  # patch stride: weight cell (y // SH, x // SW)
    T,  # tiles per sample
    plane,  # N * T: distance between the three partial-sum planes
    # -- compile-time switches -----------------------------------------------------------------------------
    LAYOUT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_REF: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    c_row, y, x, c_col, mask = _tile_offsets(pid_r, pid_k, C, H, W, LAYOUT, BLOCK_R, BLOCK_K)

    pred = _strided_load(pred_ptr, pid_n, c_row, y, x, c_col, s_pn, s_pc, s_ph, s_pw, mask)
    target = _strided_load(target_ptr, pid_n, c_row, y, x, c_col, s_tn, s_tc, s_th, s_tw, mask)
    diff = pred - target
    sq = diff * diff
    if HAS_WEIGHT:
        w = _weight_load(weight_ptr, pid_n, y, x, SH, SW, s_wn, s_wh, s_ww, mask)
        wsq = w * sq
    else:
        wsq = sq

    tile = pid_r * tl.num_programs(2) + pid_k
    out = partial_ptr + pid_n * T + tile
    tl.store(out, tl.sum(tl.sum(wsq, axis=1), axis=0))
    tl.store(out + plane, tl.sum(tl.sum(sq, axis=1), axis=0))
    if HAS_REF:
        # The DPO log-ratio needs m - r, a small difference of two large errors when the reference model is close
        # to the policy (exactly equal at step 0). Accumulating (pred-t)^2 - (ref-t)^2 = (pred-ref)(pred+ref-2t)
        # directly avoids that cancellation.
        ref = _strided_load(ref_ptr, pid_n, c_row, y, x, c_col, s_rn, s_rc, s_rh, s_rw, mask)
        dsq = (pred - ref) * (diff + (ref - target))
        if HAS_WEIGHT:
            dsq = w * dsq
        tl.store(out + 2 * plane, tl.sum(tl.sum(dsq, axis=1), axis=0))


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


@triton.jit
def _patch_loss_epilogue_kernel(
    # -- input: fp32 partial sums (3, N, T) from the forward kernel ---------------------------------------
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
    # -- compile-time switches ------------------------------------------------------------------------------
    IS_DPO: tl.constexpr,
    BLOCK_S: tl.constexpr,  # >= number of lanes (samples for MSE, pairs for DPO)
    BLOCK_T: tl.constexpr,
):  # fmt: skip
    lanes = tl.arange(0, BLOCK_S)
    if IS_DPO:
        B = N // 2
        lm = lanes < B
        win = lanes
        lose = lanes + B
        wm_w = _row_sums(partial_ptr, win, lm, T, BLOCK_S, BLOCK_T) * inv_numel
        wm_l = _row_sums(partial_ptr, lose, lm, T, BLOCK_S, BLOCK_T) * inv_numel
        m_w = _row_sums(partial_ptr + plane, win, lm, T, BLOCK_S, BLOCK_T) * inv_numel
        m_l = _row_sums(partial_ptr + plane, lose, lm, T, BLOCK_S, BLOCK_T) * inv_numel
        # model minus reference error per sample, accumulated without cancellation by the forward kernel
        dd_w = _row_sums(partial_ptr + 2 * plane, win, lm, T, BLOCK_S, BLOCK_T) * inv_numel
        dd_l = _row_sums(partial_ptr + 2 * plane, lose, lm, T, BLOCK_S, BLOCK_T) * inv_numel
        wr_w = wm_w - dd_w
        wr_l = wm_l - dd_l

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

        tl.store(model_err_ptr + win, wm_w, mask=lm)
        tl.store(model_err_ptr + lose, wm_l, mask=lm)
        tl.store(model_mse_ptr + win, m_w, mask=lm)
        tl.store(model_mse_ptr + lose, m_l, mask=lm)
        tl.store(ref_err_ptr + win, wr_w, mask=lm)
        tl.store(ref_err_ptr + lose, wr_l, mask=lm)
        tl.store(coef_ptr + win, g, mask=lm)
        tl.store(coef_ptr + lose, -g, mask=lm)
        tl.store(log_ratio_ptr + lanes, log_ratio, mask=lm)
        tl.store(acc_ptr, acc)
        tl.store(loss_ptr, loss)
    else:
        lm = lanes < N
        wm = _row_sums(partial_ptr, lanes, lm, T, BLOCK_S, BLOCK_T) * inv_numel
        m = _row_sums(partial_ptr + plane, lanes, lm, T, BLOCK_S, BLOCK_T) * inv_numel
        inv_n = inv_lanes
        tl.store(model_err_ptr + lanes, wm, mask=lm)
        tl.store(model_mse_ptr + lanes, m, mask=lm)
        tl.store(coef_ptr + lanes, wm * 0.0 + inv_n, mask=lm)
        tl.store(loss_ptr, tl.sum(tl.where(lm, wm, 0.0), axis=0) * inv_n)


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
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    c_row, y, x, c_col, mask = _tile_offsets(pid_r, pid_k, C, H, W, LAYOUT, BLOCK_R, BLOCK_K)

    g = tl.load(grad_out_ptr) * tl.load(coef_ptr + pid_n) * scale
    pred = _strided_load(pred_ptr, pid_n, c_row, y, x, c_col, s_pn, s_pc, s_ph, s_pw, mask)
    target = _strided_load(target_ptr, pid_n, c_row, y, x, c_col, s_tn, s_tc, s_th, s_tw, mask)
    grad = g * (pred - target)
    if HAS_WEIGHT:
        grad = grad * _weight_load(weight_ptr, pid_n, y, x, SH, SW, s_wn, s_wh, s_ww, mask)
    offs = pid_n * s_gn + (c_row * s_gc + y * s_gh)[:, None] + (c_col * s_gc + x * s_gw)[None, :]
    tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileConfig:
    """Tile shape and warp count of the streaming kernels."""

    block_r: int
    block_k: int
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

    On the GPU a tile holds about 4096 elements (8 warps): enough bytes in flight per program for a streaming
    kernel while keeping register use low. Under the interpreter every program instance costs ~1 ms of Python,
    so tiles are made as large as 64K elements. ``PATCHDPO_FAST_TILE="R,K,WARPS"`` overrides the choice (for
    tuning on new hardware).
    """
    override = os.environ.get("PATCHDPO_FAST_TILE")
    if override:
        r, k, warps = (int(v) for v in override.split(","))
        return TileConfig(r, k, warps)
    rows, cols = (c * h, w) if layout == _LAYOUT_NCHW else (h, w * c)
    budget = 65536 if interpret else 4096
    block_k = min(triton.next_power_of_2(cols), 1024 if interpret else 256)
    block_r = min(triton.next_power_of_2(rows), max(1, budget // block_k))
    return TileConfig(block_r, block_k, 8 if block_r * block_k >= 4096 else 4)


def _strides4(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)  # type: ignore[return-value]


def _weight_view(weight: torch.Tensor | None) -> tuple[torch.Tensor | None, tuple[int, int, int], int, int]:
    if weight is None:
        return None, (0, 0, 0), 1, 1
    w3 = weight[:, 0] if weight.dim() == 4 else weight
    return w3, tuple(w3.stride()), w3.shape[1], w3.shape[2]  # type: ignore[return-value]


def _grid(n: int, c: int, h: int, w: int, layout: int, cfg: TileConfig) -> tuple[int, int, int]:
    rows, cols = (c * h, w) if layout == _LAYOUT_NCHW else (h, w * c)
    return n, triton.cdiv(rows, cfg.block_r), triton.cdiv(cols, cfg.block_k)


def patch_loss_forward(
    pred: torch.Tensor,
    target: torch.Tensor,
    ref_pred: torch.Tensor | None,
    weight: torch.Tensor | None,
    beta: float,
    is_dpo: bool,
) -> dict[str, torch.Tensor]:
    """Run the fused forward pass and the pair epilogue.

    Inputs must already be validated (see ``patchdpo_fast.ops.validation``). Returns fp32 tensors ``loss``,
    ``model_err``, ``model_mse``, ``ref_err``, ``log_ratio``, ``implicit_acc`` and ``coef`` (the per-sample
    backward coefficient consumed by :func:`patch_loss_backward`). For the MSE loss (``is_dpo=False``)
    ``ref_err``, ``log_ratio`` and ``implicit_acc`` are empty.
    """
    n, c, h, w = pred.shape
    layout = _layout(pred)
    cfg = tile_config(c, h, w, layout)
    grid = _grid(n, c, h, w, layout, cfg)
    tiles = grid[1] * grid[2]
    w3, w_strides, gh, gw = _weight_view(weight)
    dev = pred.device
    f32 = torch.float32

    partial = torch.empty((3, n, tiles), device=dev, dtype=f32)
    _patch_loss_fwd_kernel[grid](
        pred, *pred.stride(),
        target, *target.stride(),
        ref_pred if ref_pred is not None else pred, *_strides4(ref_pred),
        w3 if w3 is not None else pred, *w_strides,
        partial,
        n, c, h, w,
        h // gh, w // gw,
        tiles,
        n * tiles,
        LAYOUT=layout,
        HAS_WEIGHT=weight is not None,
        HAS_REF=ref_pred is not None,
        BLOCK_R=cfg.block_r,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
    )  # fmt: skip

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
    block_s = triton.next_power_of_2(max(lanes, 1))
    block_t = max(1, min(triton.next_power_of_2(tiles), 8192 // block_s))
    _patch_loss_epilogue_kernel[(1,)](
        partial, n, tiles, n * tiles,
        1.0 / (c * h * w), float(beta), 1.0 / max(lanes, 1),
        out["loss"], out["model_err"], out["model_mse"],
        out["ref_err"] if is_dpo else out["model_err"],
        out["coef"],
        out["log_ratio"] if is_dpo else out["model_err"],
        out["implicit_acc"],
        IS_DPO=is_dpo,
        BLOCK_S=block_s,
        BLOCK_T=block_t,
        num_warps=4,
    )  # fmt: skip
    return out


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
    layout = _layout(pred)
    cfg = tile_config(c, h, w, layout)
    grad = torch.empty_like(pred)
    w3, w_strides, gh, gw = _weight_view(weight)
    g_out = grad_output.detach().reshape(1).to(torch.float32)
    _patch_loss_bwd_kernel[_grid(n, c, h, w, layout, cfg)](
        pred, *pred.stride(),
        target, *target.stride(),
        w3 if w3 is not None else pred, *w_strides,
        coef,
        g_out,
        grad, *grad.stride(),
        c, h, w,
        h // gh, w // gw,
        2.0 / (c * h * w),
        LAYOUT=layout,
        HAS_WEIGHT=weight is not None,
        BLOCK_R=cfg.block_r,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
    )  # fmt: skip
    return grad
