"""Nearest-patch matching: per query feature, the maximum cosine similarity to a set of key features.

``patch_match(query, key, key_mask)`` is the operation behind patch quality (DESIGN.md section 1, step 2): the
quality of a generated patch is the best cosine similarity of its feature to the reference patch features, and the
same call with the arguments swapped scores the reference patches.

Backends (same rule as the loss ops, :mod:`patchdpo_fast.ops.dispatch`):

* ``triton``: the fused kernel in ``patchdpo_fast.kernels.patch_match`` (no ``(Nq, Nk)`` similarity matrix in
  memory); CUDA tensors, or CPU tensors when Triton runs in its interpreter (``TRITON_INTERPRET=1`` set before the
  kernel was imported); fp16, bf16, fp32.
* ``torch``: :func:`patch_match_reference`, the readable PyTorch definition (it materializes the similarities, in
  chunks of queries to bound memory); any device; fp16, bf16, fp32, fp64.

``auto`` takes the first backend, in that order, that supports the inputs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["match_backend", "patch_match", "patch_match_reference", "triton_match_status"]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def patch_match_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    eps: float = 1e-12,
    chunk_elements: int = 1 << 24,
) -> torch.Tensor:
    """PyTorch definition: ``out[b, i] = max_j cos(query[b, i], key[b, j])`` over keys with ``key_mask[b, j]``.

    Features are upcast to fp32 (fp64 stays fp64) and normalized as ``x / max(|x|, eps)``. Masked-out keys never win;
    a row without a valid key is ``-inf``. Queries are processed in chunks so that at most ``chunk_elements``
    similarities exist at a time. Returns ``(B, Nq)`` in fp32 (fp64 for fp64 inputs).
    """
    work = torch.float64 if torch.float64 in (query.dtype, key.dtype) else torch.float32
    q = F.normalize(query.to(work), dim=-1, eps=eps)
    k = F.normalize(key.to(work), dim=-1, eps=eps)
    b, nq, _ = q.shape
    nk = k.shape[1]
    out = torch.empty((b, nq), dtype=work, device=q.device)
    step = max(1, chunk_elements // max(1, b * nk))
    for i0 in range(0, nq, step):
        sim = torch.bmm(q[:, i0 : i0 + step], k.transpose(1, 2))  # (B, chunk, Nk)
        if key_mask is not None:
            sim = sim.masked_fill(~key_mask[:, None, :], float("-inf"))
        out[:, i0 : i0 + step] = sim.amax(dim=-1)
    return out


@functools.cache
def triton_match_status() -> tuple[bool, bool, str]:
    """``(importable, interpreter_mode, reason)`` for the matching kernel; cached after the first call."""
    try:
        from patchdpo_fast.kernels import patch_match as kernel
    except Exception as exc:  # ImportError, or a broken Triton install
        return False, False, f"the Triton matching kernel cannot be imported ({type(exc).__name__}: {exc})"
    return True, kernel.INTERPRET, ""


def _triton_unsupported(device: torch.device, dtypes: set[torch.dtype]) -> str | None:
    bad = sorted(str(d) for d in dtypes if d not in _TRITON_DTYPES)
    if bad:
        return f"backend 'triton' supports dtypes float16, bfloat16, float32, got {', '.join(bad)}"
    importable, interpret, why = triton_match_status()
    if not importable:
        return why
    if device.type != "cuda" and not (interpret and device.type == "cpu"):
        return (
            f"backend 'triton' runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1), got tensors on {device}"
        )
    return None


def match_backend(requested: str, query: torch.Tensor, key: torch.Tensor) -> str:
    """Name of the backend that runs :func:`patch_match` on these inputs; ValueError if ``requested`` cannot."""
    if requested not in ("auto", "triton", "torch"):
        raise ValueError(f"patch_match: `backend` must be 'auto', 'triton' or 'torch', got {requested!r}")
    reason = _triton_unsupported(query.device, {query.dtype, key.dtype})
    if requested == "auto":
        return "torch" if reason else "triton"
    if requested == "triton" and reason:
        raise ValueError(f"patch_match: {reason}")
    return requested


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_inputs(query: object, key: object, key_mask: object, eps: float) -> torch.Tensor | None:
    """Validate the inputs (ValueError naming the argument); returns the key mask as a bool tensor or None."""
    for name, t in (("query", query), ("key", key)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"patch_match: `{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT:
            raise ValueError(
                f"patch_match: `{name}` must have a floating dtype (float16, bfloat16, float32 or float64), "
                f"got {t.dtype}"
            )
        if t.dim() != 3:
            raise ValueError(f"patch_match: `{name}` must be 3-D (B, N, D), got shape {_shape(t)}")
        if t.numel() == 0:
            raise ValueError(f"patch_match: `{name}` must not be empty, got shape {_shape(t)}")
    assert isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor)
    if key.device != query.device:
        raise ValueError(f"patch_match: `key` is on {key.device} but `query` is on {query.device}; move them together")
    if key.shape[0] != query.shape[0] or key.shape[2] != query.shape[2]:
        raise ValueError(
            f"patch_match: `key` must have the batch size and feature size of `query` {_shape(query)} "
            f"(B, Nk, D) = ({query.shape[0]}, Nk, {query.shape[2]}), got {_shape(key)}"
        )
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"patch_match: `eps` must be a positive number, got {eps!r}")
    if key_mask is None:
        return None
    if not isinstance(key_mask, torch.Tensor):
        raise ValueError(f"patch_match: `key_mask` must be a torch.Tensor or None, got {type(key_mask).__name__}")
    if key_mask.shape != key.shape[:2]:
        raise ValueError(
            f"patch_match: `key_mask` must have shape (B, Nk) = ({key.shape[0]}, {key.shape[1]}), "
            f"got {_shape(key_mask)}"
        )
    if key_mask.device != key.device:
        raise ValueError(f"patch_match: `key_mask` is on {key_mask.device} but `key` is on {key.device}")
    return key_mask if key_mask.dtype == torch.bool else key_mask != 0


def patch_match(
    query: torch.Tensor,
    key: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    *,
    eps: float = 1e-12,
    backend: str = "auto",
) -> torch.Tensor:
    """Maximum cosine similarity of every query feature to the key features of the same batch item.

    Args:
        query: ``(B, Nq, D)`` features (e.g. generated-image patches); any strides.
        key: ``(B, Nk, D)`` features (e.g. reference-image patches); same dtype family, device, ``B`` and ``D``.
        key_mask: optional ``(B, Nk)``; keys where it is False/0 are not match candidates (e.g. reference
            background). A row without a valid key gets ``-inf``.
        eps: norms are clamped to at least ``eps`` (a zero feature has similarity 0 to everything).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see the module docstring).

    Returns:
        ``(B, Nq)`` fp32 similarities in [-1, 1] (fp64 for fp64 inputs on the torch backend); no gradient flows.
    """
    mask = _check_inputs(query, key, key_mask, eps)
    with torch.no_grad():
        if match_backend(backend, query, key) == "triton":
            from patchdpo_fast.kernels.patch_match import patch_match_forward

            return patch_match_forward(query.detach(), key.detach(), mask, float(eps))
        return patch_match_reference(query.detach(), key.detach(), mask, float(eps))
