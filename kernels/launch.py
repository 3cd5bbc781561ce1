"""Kernel launches that can be recorded: for ahead-of-time compile checks and for counting memory traffic.

Every launch helper in ``patchdpo_fast.kernels`` starts its kernels through :func:`launch`. Normally that is just
``kernel[grid](*args, **kwargs)``. Inside :func:`record_launches` each launch is also appended to the recorder as a
:class:`Launch`: the kernel, its grid, the exact arguments the launch helper passed (so the JIT's own binder can
specialize them later, see ``patchdpo_fast.kernels.aot``) and the bytes the kernel reads and writes in DRAM. With
``execute=False`` nothing runs, so launch helpers can be driven with tensors on the ``meta`` device (no memory,
no GPU) to list the specializations they would compile at any shape.

Byte counts are per tensor argument the kernel touches: a tensor the kernel loads counts its full size once as
read, a tensor it stores to counts its full size once as written (the streaming kernels touch every element of
what they read or write exactly once; re-reads of a small weight map from cache are not DRAM traffic).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Launch", "LaunchRecorder", "launch", "nbytes", "record_launches"]

#: ``(what, bytes)`` pairs, e.g. ``("pred", 2 * 1024**2)``
Traffic = tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]


def nbytes(t: torch.Tensor | None) -> int:
    """Bytes of the elements of ``t`` (0 for None); for a strided view, only the elements it addresses."""
    return 0 if t is None else t.numel() * t.element_size()


@dataclass(frozen=True)
class Launch:
    """One recorded kernel launch."""

    kernel: Any  # triton.runtime.jit.JITFunction (or InterpretedFunction under TRITON_INTERPRET=1)
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    reads: tuple[tuple[str, int], ...]
    writes: tuple[tuple[str, int], ...]

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", repr(self.kernel))

    @property
    def bytes_read(self) -> int:
        return sum(b for _, b in self.reads)

    @property
    def bytes_written(self) -> int:
        return sum(b for _, b in self.writes)

    @property
    def programs(self) -> int:
        total = 1
        for g in self.grid:
            total *= int(g)
        return total


@dataclass
class LaunchRecorder:
    """The launches made inside :func:`record_launches`, in order."""

    execute: bool = True
    launches: list[Launch] = field(default_factory=list)

    @property
    def bytes_read(self) -> int:
        return sum(x.bytes_read for x in self.launches)

    @property
    def bytes_written(self) -> int:
        return sum(x.bytes_written for x in self.launches)

    @property
    def bytes_moved(self) -> int:
        return self.bytes_read + self.bytes_written

    def by_tensor(self) -> dict[str, int]:
        """Bytes moved per tensor name (reads and writes summed), over all launches."""
        out: dict[str, int] = {}
        for x in self.launches:
            for what, b in (*x.reads, *x.writes):
                out[what] = out.get(what, 0) + b
        return out


_ACTIVE: contextvars.ContextVar[LaunchRecorder | None] = contextvars.ContextVar("patchdpo_launches", default=None)


@contextlib.contextmanager
def record_launches(execute: bool = True) -> Iterator[LaunchRecorder]:
    """Record every kernel launch made by the launch helpers inside the block.

    ``execute=False`` records without running anything (inputs may then live on the ``meta`` device).
    """
    recorder = LaunchRecorder(execute=execute)
    token = _ACTIVE.set(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)


def launch(
    kernel: Any,
    grid: tuple[int, ...],
    args: Sequence[Any],
    kwargs: dict[str, Any],
    traffic: Callable[[], Traffic],
) -> None:
    """Launch ``kernel[grid](*args, **kwargs)``; inside :func:`record_launches` also record it.

    ``traffic`` returns ``(reads, writes)`` as ``(name, bytes)`` pairs; it is only called while recording, so the
    common path pays nothing for it.
    """
    recorder = _ACTIVE.get()
    if recorder is not None:
        reads, writes = traffic()
        recorder.launches.append(Launch(kernel, tuple(grid), tuple(args), dict(kwargs), tuple(reads), tuple(writes)))
        if not recorder.execute:
            return
    kernel[grid](*args, **kwargs)
