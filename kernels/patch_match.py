"""Fused Triton kernel for nearest-patch matching (patch quality estimation, DESIGN.md section 1 step 2).

For query features ``q`` of shape ``(B, Nq, D)`` and key features ``k`` of shape ``(B, Nk, D)`` the kernel computes,
per query row, the maximum cosine similarity to the (optionally masked) keys of the same batch item::

    out[b, i] = max over j with mask[b, j] of  <q[b, i], k[b, j]> / (max(|q[b, i]|, eps) * max(|k[b, j]|, eps))

One program owns ``BLOCK_Q`` queries of one batch item. It first accumulates the squared query norms over the
feature dimension, then walks over the keys ``BLOCK_K`` at a time: a ``(BLOCK_Q, BLOCK_K)`` tile of dot products is
accumulated in fp32 with ``tl.dot`` over ``BLOCK_D`` slices of the features (the key norms are summed from the same
loaded slices), scaled to cosines, masked and folded into a running row maximum. The ``(Nq, Nk)`` similarity
matrix never exists in memory; only the ``(B, Nq)`` fp32 result is written.

Tensors are addressed through their strides with int64 offsets, so non-contiguous inputs need no copy. fp16 and
bf16 tiles go to ``tl.dot`` as they are (exact products, fp32 accumulation); fp32 tiles use IEEE fp32 products
(no TF32 rounding). Under the interpreter every tile is upcast to fp32 first (numpy has no bf16 arithmetic). A key
that is masked out never wins; a row without any valid key gets ``-inf`` (the maximum of an empty set).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import launch as _launch
from .launch import nbytes as _nbytes

__all__ = ["INTERPRET", "MatchTileConfig", "match_tile_config", "patch_match_forward"]

#: True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` set before import).
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _patch_match_kernel(
    # -- query features (B, Nq, D) and key features (B, Nk, D), each with its own strides -------------------------
    q_ptr, s_qb, s_qn, s_qd,
    k_ptr, s_kb, s_kn, s_kd,
    # -- optional key mask (B, Nk), nonzero = valid candidate -------------------------------------------------------
    mask_ptr, s_mb, s_mn,  # ignored unless HAS_MASK
    # -- output: fp32 (B, Nq) row maxima ----------------------------------------------------------------------------
    out_ptr, s_ob, s_on,
    # -- sizes and scalars ------------------------------------------------------------------------------------------
    Nq, Nk, D,
    eps,  # norms are clamped to at least eps (as torch.nn.functional.normalize does)
    # -- compile-time switches --------------------------------------------------------------------------------------
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,  # cast tiles to fp32 before tl.dot (fp32 inputs, mixed dtypes, the interpreter)
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_q = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)

    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_mask = rows < Nq
    rows64 = rows.to(tl.int64)
    q_base = q_ptr + pid_b * s_qb
    k_base = k_ptr + pid_b * s_kb
    dims = tl.arange(0, BLOCK_D)

    # Pass 1: squared norms of this program's queries.
    q_sq = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = (d0 + dims).to(tl.int64)
        m = row_mask[:, None] & (d < D)[None, :]
        q = tl.load(q_base + rows64[:, None] * s_qn + d[None, :] * s_qd, mask=m, other=0.0).to(tl.float32)
        q_sq += tl.sum(q * q, axis=1)
    inv_q = 1.0 / tl.maximum(tl.sqrt(q_sq), eps)

    # Pass 2: tiles of keys, running row maximum of the cosine similarity.
    best = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
    for k0 in range(0, Nk, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < Nk
        cols64 = cols.to(tl.int64)
        acc = tl.zeros((BLOCK_Q, BLOCK_K), dtype=tl.float32)
        k_sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = (d0 + dims).to(tl.int64)
            d_mask = d < D
            q = tl.load(
                q_base + rows64[:, None] * s_qn + d[None, :] * s_qd,
                mask=row_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            # keys loaded already transposed: a (BLOCK_D, BLOCK_K) tile
            kt = tl.load(
                k_base + d[:, None] * s_kd + cols64[None, :] * s_kn,
                mask=d_mask[:, None] & col_mask[None, :],
                other=0.0,
            )
            kt32 = kt.to(tl.float32)
            k_sq += tl.sum(kt32 * kt32, axis=0)
            if UPCAST:  # noqa: SIM108 - a statically resolved branch on a constexpr reads better in a kernel
                acc = tl.dot(q.to(tl.float32), kt32, acc, input_precision="ieee")
            else:
                acc = tl.dot(q, kt, acc)
        inv_k = 1.0 / tl.maximum(tl.sqrt(k_sq), eps)
        sim = acc * inv_q[:, None] * inv_k[None, :]
        valid = col_mask
        if HAS_MASK:
            flag = tl.load(mask_ptr + pid_b * s_mb + cols64 * s_mn, mask=col_mask, other=0)
            valid = valid & (flag != 0)
        sim = tl.where(valid[None, :], sim, float("-inf"))
        best = tl.maximum(best, tl.max(sim, axis=1))

    tl.store(out_ptr + pid_b * s_ob + rows64 * s_on, best, mask=row_mask)


@dataclass(frozen=True)
class MatchTileConfig:
    """Tile of the matching kernel: queries per program, keys per inner step, feature slice, warps."""

    block_q: int
    block_k: int
    block_d: int
    num_warps: int


def match_tile_config(nq: int, nk: int, d: int, itemsize: int, interpret: bool = INTERPRET) -> MatchTileConfig:
    """Pick the tile for ``Nq`` queries, ``Nk`` keys of ``D`` features with ``itemsize`` bytes per element.

    On the GPU: 64 queries x 64 keys per program with a 64-wide feature slice for 16-bit inputs (32 for fp32) keeps
    the fp32 accumulator and both operand tiles in registers with 4 warps (8 for fp32, whose IEEE products run on
    the FMA units: with 4 warps ptxas spilled on sm_80/sm_90, see ``patchdpo kernels-report``). Under the
    interpreter every program instance and every loop iteration costs Python time, so blocks cover whole (small)
    problems: up to 256 queries, 256 keys and 512 features. ``tl.dot`` needs every block dimension >= 16.
    ``PATCHDPO_FAST_MATCH_TILE="Q,K,D,WARPS"`` overrides the choice (for tuning on new hardware).
    """
    override = os.environ.get("PATCHDPO_FAST_MATCH_TILE")
    if override:
        q, k, dd, warps = (int(v) for v in override.split(","))
        return MatchTileConfig(q, k, dd, warps)

    def fit(n: int, cap: int) -> int:
        return max(16, min(triton.next_power_of_2(max(n, 1)), cap))

    if interpret:
        return MatchTileConfig(fit(nq, 256), fit(nk, 256), fit(d, 512), 4)
    return MatchTileConfig(fit(nq, 64), fit(nk, 64), fit(d, 64 if itemsize <= 2 else 32), 4 if itemsize <= 2 else 8)


def patch_match_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    key_mask: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """Launch the kernel; inputs are validated by the caller. Returns the fp32 ``(B, Nq)`` row maxima."""
    b, nq, d = query.shape
    nk = key.shape[1]
    out = torch.empty((b, nq), dtype=torch.float32, device=query.device)
    if key_mask is not None and key_mask.dtype == torch.bool:
        key_mask = key_mask.view(torch.uint8)  # same bytes; Triton loads it as an integer
    upcast = INTERPRET or query.dtype != key.dtype or query.dtype == torch.float32
    cfg = match_tile_config(nq, nk, d, max(query.element_size(), key.element_size()))
    mask_strides = tuple(key_mask.stride()) if key_mask is not None else (0, 0)
    grid = (triton.cdiv(nq, cfg.block_q), b)
    _launch(
        _patch_match_kernel,
        grid,
        (
            query, *query.stride(),
            key, *key.stride(),
            key_mask if key_mask is not None else query, *mask_strides,
            out, *out.stride(),
            nq, nk, d,
            float(eps),
        ),
        {
            "HAS_MASK": key_mask is not None,
            "UPCAST": upcast,
            "BLOCK_Q": cfg.block_q,
            "BLOCK_K": cfg.block_k,
            "BLOCK_D": cfg.block_d,
            "num_warps": cfg.num_warps,
        },
        lambda: (
            (("query", _nbytes(query)), ("key", _nbytes(key)), ("key_mask", _nbytes(key_mask))),
            (("out", _nbytes(out)),),
        ),
    )  # fmt: skip
    return out
