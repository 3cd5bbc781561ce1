"""Benchmarks of nearest-patch matching (patch quality): fused Triton kernel vs eager PyTorch vs torch.compile.

    pytest benchmarks/test_bench_match.py --benchmark-json=match.json [--benchmark-quiet]

On CUDA every shape runs the three implementations; without CUDA the Triton cases are skipped (the interpreter is
for correctness only) and eager vs compiled run on small CPU shapes. Each case checks its output against the eager
reference once and records in ``benchmark.extra_info``: ``kind="match"``, op, impl, shape ``(B, Nq, Nk, D)``, dtype,
median seconds, TFLOP/s (``2 B Nq Nk D`` flops, the dot products), input GB/s, the bytes of the ``(B, Nq, Nk)`` fp32
similarity matrix the fused kernel never materializes, peak extra CUDA memory and the first call's (compile) time.
Self-contained: only pytest-benchmark's ``benchmark`` fixture is used.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (pip install pytest-benchmark)")

from patchdpo_fast.quality.matching import patch_match, patch_match_reference, triton_match_status

CUDA = torch.cuda.is_available()
MIB = 1024**2

#: (B, Nq, Nk, D, dtype): DINOv2-L at 518 px (37 x 37 patches), ViT-B at 224 px (16 x 16) in a big batch, a ViT-S
#: 64 x 64 grid (the full similarity matrix would be 512 MiB), and fp32 features.
CUDA_CASES = [
    (16, 1369, 1369, 1024, torch.bfloat16),
    (256, 256, 256, 768, torch.float16),
    (8, 4096, 4096, 384, torch.bfloat16),
    (16, 1369, 1369, 1024, torch.float32),
]
CPU_CASES = [
    (4, 256, 256, 128, torch.float32),
    (2, 1024, 1024, 384, torch.float32),
]
IMPLS = ("triton", "eager", "compiled")
#: ``run_gpu.sh --dry-run`` (PATCHDPO_BENCH_DRY_RUN=1): one tiny case on the CPU, Triton in its interpreter, no compile
DRY_RUN = os.environ.get("PATCHDPO_BENCH_DRY_RUN", "0") == "1"
DRY_RUN_CASES = [(1, 32, 32, 16, torch.float32)]


def _triton_skip() -> str | None:
    if DRY_RUN:
        importable, interpret, why = triton_match_status()
        return None if importable and (interpret or CUDA) else (why or "dry run: set TRITON_INTERPRET=1")
    if not CUDA:
        return (
            "the Triton matching kernel is benchmarked on CUDA only (torch.cuda.is_available() is False; "
            "TRITON_INTERPRET is for correctness tests)"
        )
    importable, interpret, why = triton_match_status()
    if not importable:
        return why
    if interpret:
        return "TRITON_INTERPRET=1 is set: unset it to benchmark the compiled kernel"
    return None


def _params():
    skip = _triton_skip()
    for case in DRY_RUN_CASES if DRY_RUN else CUDA_CASES if CUDA else CPU_CASES:
        b, nq, nk, d, dtype = case
        for impl in IMPLS:
            marks = [pytest.mark.skip(reason=skip)] if impl == "triton" and skip else []
            if DRY_RUN and impl == "compiled":
                marks = [pytest.mark.skip(reason="dry run: torch.compile is exercised by the loss stage only")]
            name = f"{impl}-B{b}-Nq{nq}-Nk{nk}-D{d}-{str(dtype).removeprefix('torch.')}"
            yield pytest.param(case, impl, id=name, marks=marks)


@pytest.fixture(scope="module")
def compiled_reference():
    """One torch.compile of the eager reference for the module (static shapes: recompiles per case)."""
    return torch.compile(patch_match_reference, dynamic=False)


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize(("case", "impl"), list(_params()))
def test_patch_match(benchmark, compiled_reference, case, impl) -> None:
    b, nq, nk, d, dtype = case
    device = torch.device("cuda" if CUDA else "cpu")
    g = torch.Generator(device=device).manual_seed(0)
    query = torch.randn(b, nq, d, device=device, dtype=dtype, generator=g)
    key = torch.randn(b, nk, d, device=device, dtype=dtype, generator=g)
    mask = torch.rand(b, nk, device=device, generator=g) > 0.1
    big = 1 << 40  # one chunk: eager and compiled compute the whole similarity matrix, as a plain implementation would
    if impl == "triton":

        def fn():
            return patch_match(query, key, mask, backend="triton")
    elif impl == "eager":

        def fn():
            return patch_match_reference(query, key, mask, chunk_elements=big)
    else:

        def fn():
            return compiled_reference(query, key, mask, chunk_elements=big)

    _sync()
    t0 = time.perf_counter()
    out = fn()  # first call: Triton JIT / Inductor compile
    _sync()
    first_s = time.perf_counter() - t0
    expected = patch_match_reference(query, key, mask, chunk_elements=big)
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=0)
    del expected

    peak = None
    if CUDA:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        _sync()
        peak = (torch.cuda.max_memory_allocated() - base) / MIB

    def run():
        fn()
        _sync()

    benchmark.group = f"patch_match B{b} Nq{nq} Nk{nk} D{d} {str(dtype).removeprefix('torch.')}"
    rounds, iterations = (1, 1) if DRY_RUN else (20, 5) if CUDA else (5, 1)
    benchmark.pedantic(run, rounds=rounds, iterations=iterations, warmup_rounds=0 if DRY_RUN else 1)
    median = float(benchmark.stats.stats.median)
    flops = 2.0 * b * nq * nk * d
    in_bytes = (query.numel() + key.numel()) * query.element_size()
    benchmark.extra_info.update(
        kind="match",
        op="patch_match",
        impl=impl,
        shape=[b, nq, nk, d],
        dtype=str(dtype).removeprefix("torch."),
        device=torch.cuda.get_device_name(0) if CUDA else "cpu",
        median_s=median,
        tflops=flops / median / 1e12,
        input_gbps=in_bytes / median / 1e9,
        similarity_matrix_mib=b * nq * nk * 4 / MIB,
        peak_extra_mib=peak,
        first_call_s=first_s,
    )
