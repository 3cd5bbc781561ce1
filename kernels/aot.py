"""Ahead-of-time compilation of recorded kernel launches for a GPU architecture, without a GPU.

The Triton interpreter (``TRITON_INTERPRET=1``, used by the CPU tests) runs kernels as NumPy code and accepts
programs that the real compiler rejects (layouts, shared memory, register pressure). This module compiles a launch
recorded by :func:`patchdpo_fast.kernels.launch.record_launches` the way the JIT would on a device of compute
capability ``cap`` (8.0 = A100, 9.0 = H100/H200): the arguments are specialized by the JIT's own binder (dtypes,
16-byte alignment, integers equal to 1 or divisible by 16), then ``triton.compile`` lowers the kernel to PTX and
runs the ``ptxas`` that ships in the triton wheel. No CUDA driver or device is needed.

From ``ptxas -v`` it reads the registers per thread, the spill stores/loads and the stack frame; from Triton's
metadata the shared memory it allocates. Kernels must be imported without ``TRITON_INTERPRET=1`` (interpreted
functions have no compiler front end), which is why ``patchdpo kernels-report`` runs in its own process.

Uses two non-public pieces of ``triton.runtime.jit`` (``create_function_from_signature`` and
``JITFunction._pack_args``, the binder ``JITFunction.run`` uses); written against triton 3.7.
"""

from __future__ import annotations

import contextlib
import io
import re
import time
from dataclasses import dataclass
from typing import Any

from .launch import Launch

__all__ = ["CompileResult", "compile_launch", "specialization"]

_SPILL_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_RE = re.compile(r"Used (\d+) registers")


@dataclass(frozen=True)
class CompileResult:
    """What one ahead-of-time compile of one kernel specialization produced."""

    kernel: str
    capability: int
    signature: str  # pointer dtypes and specialized scalars, e.g. "pred_ptr=*bf16 ..."
    constexprs: str  # compile-time switches and tile sizes, e.g. "LAYOUT=0 HAS_WEIGHT=True ..."
    num_warps: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int
    global_loads: int  # ld.global instructions in the PTX (vector loads count once)
    compile_s: float
    error: str | None = None

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def ok(self) -> bool:
        return self.error is None and self.spills == 0


def _jit_function(kernel: Any) -> Any:
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, JITFunction):
        raise RuntimeError(
            f"{kernel!r} is not a compilable JITFunction: the kernels were imported with TRITON_INTERPRET=1; run the "
            "ahead-of-time compile in a process without it (patchdpo kernels-report does)"
        )
    return kernel


def _bind(launch: Launch, capability: int) -> tuple[Any, Any, Any, dict, dict, dict]:
    """The JIT's own specialization of ``launch`` for ``cuda:capability``: (fn, target, options, sig, consts, attrs)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _jit_function(launch.kernel)
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    # the same two options JITFunction.run adds before binding
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, spec, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, spec, options)
    return fn, target, options, signature, constexprs, attrs


def specialization(launch: Launch, capability: int) -> tuple[str, str, str]:
    """``(key, signature, constexprs)``: launches with equal keys compile to the same binary."""
    fn, _, options, signature, constexprs, attrs = _bind(launch, capability)
    names = [p.name for p in fn.params]
    const_names = {names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
    sig = " ".join(f"{k}={v}" for k, v in signature.items() if v != "constexpr")
    flags = " ".join(f"{k}={v}" for k, v in const_names.items())
    attr_str = " ".join(f"{names[path[0]]}:{v}" for path, v in sorted(attrs.items()) if len(path) == 1)
    key = f"{fn.__name__}|{capability}|{sig}|{flags}|{attr_str}|warps={options.num_warps}|stages={options.num_stages}"
    return key, sig, flags


def compile_launch(launch: Launch, capability: int) -> CompileResult:
    """Compile ``launch`` for ``sm_<capability>`` and collect registers, spills and shared memory.

    Compile errors do not raise: they come back in ``CompileResult.error`` with the specialization that failed.
    Caching: compiled binaries are taken from Triton's cache when present, but then ptxas does not run and its
    statistics are missing, so callers should point ``TRITON_CACHE_DIR`` at a fresh folder.
    """
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    fn, target, options, signature, constexprs, attrs = _bind(launch, capability)
    _, sig, flags = specialization(launch, capability)
    t0 = time.perf_counter()
    log = io.StringIO()
    previous = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints the `ptxas -v` report instead of deleting it
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)  # fmt: skip
    except Exception as exc:  # compile errors are results here, not crashes
        return CompileResult(
            fn.__name__, capability, sig, flags, options.num_warps, 0, 0, 0, 0, 0, 0,
            time.perf_counter() - t0, error=f"{type(exc).__name__}: {str(exc).strip()[:2000]}",
        )  # fmt: skip
    finally:
        knobs.nvidia.dump_ptxas_log = previous
    text = log.getvalue()
    spill = _SPILL_RE.search(text)
    regs = _REGS_RE.search(text)
    error = None
    if spill is None or regs is None:
        error = "no ptxas statistics (binary taken from Triton's cache? set TRITON_CACHE_DIR to an empty folder)"
    ptx = compiled.asm.get("ptx", "")
    return CompileResult(
        kernel=fn.__name__,
        capability=capability,
        signature=sig,
        constexprs=flags,
        num_warps=int(compiled.metadata.num_warps),
        registers=int(regs.group(1)) if regs else 0,
        spill_stores=int(spill.group(2)) if spill else 0,
        spill_loads=int(spill.group(3)) if spill else 0,
        stack_bytes=int(spill.group(1)) if spill else 0,
        shared_bytes=int(compiled.metadata.shared),
        global_loads=len(re.findall(r"\bld\.global", ptx if isinstance(ptx, str) else "")),
        compile_s=time.perf_counter() - t0,
        error=error,
    )
