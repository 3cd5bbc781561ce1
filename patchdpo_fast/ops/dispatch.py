"""Backend selection for the loss ops (xformers-style: each backend declares what it supports).

* ``triton``: the fused kernels in ``patchdpo_fast.kernels``; CUDA tensors, or CPU tensors when Triton runs in
  its interpreter (``TRITON_INTERPRET=1`` set before the kernels were imported); fp16, bf16, fp32.
* ``torch``: the PyTorch reference in ``patchdpo_fast.ops.reference``; any device; fp16, bf16, fp32, fp64.

``auto`` takes the first backend, in that order, that supports the inputs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["BACKENDS", "Backend", "resolve_backend", "triton_status"]


@functools.cache
def triton_status() -> tuple[bool, bool, str]:
    """``(importable, interpreter_mode, reason)`` for the Triton kernels; cached after the first call."""
    try:
        from patchdpo_fast.kernels import patch_loss
    except Exception as exc:  # ImportError, or a broken Triton install
        return False, False, f"Triton kernels cannot be imported ({type(exc).__name__}: {exc})"
    return True, patch_loss.INTERPRET, ""


@dataclass(frozen=True)
class Backend:
    """A loss implementation and the inputs it supports."""

    name: str
    dtypes: frozenset[torch.dtype]

    def unsupported_reason(self, device: torch.device, dtypes: set[torch.dtype]) -> str | None:
        """Why this backend cannot run on ``device`` with ``dtypes``, or None if it can."""
        bad = sorted(str(d) for d in dtypes - self.dtypes)
        if bad:
            ok = ", ".join(sorted(str(d) for d in self.dtypes))
            return f"backend {self.name!r} supports dtypes {ok}, got {', '.join(bad)}"
        if self.name == "triton":
            importable, interpret, why = triton_status()
            if not importable:
                return why
            if device.type != "cuda" and not (interpret and device.type == "cpu"):
                return (
                    f"backend 'triton' runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1), "
                    f"got tensors on {device}"
                )
        return None


BACKENDS: dict[str, Backend] = {
    "triton": Backend("triton", frozenset({torch.float16, torch.bfloat16, torch.float32})),
    "torch": Backend("torch", frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})),
}


def resolve_backend(op: str, requested: str, *tensors: torch.Tensor | None) -> str:
    """Name of the backend that will run ``op`` on ``tensors``; ValueError if ``requested`` cannot."""
    present = [t for t in tensors if t is not None]
    device = present[0].device
    dtypes = {t.dtype for t in present}
    if requested == "auto":
        for backend in BACKENDS.values():
            if backend.unsupported_reason(device, dtypes) is None:
                return backend.name
        raise ValueError(f"{op}: no backend supports tensors on {device} with dtypes {dtypes}")  # pragma: no cover
    if requested not in BACKENDS:
        raise ValueError(f"{op}: `backend` must be 'auto', 'triton' or 'torch', got {requested!r}")
    reason = BACKENDS[requested].unsupported_reason(device, dtypes)
    if reason is not None:
        raise ValueError(f"{op}: {reason}")
    return requested
