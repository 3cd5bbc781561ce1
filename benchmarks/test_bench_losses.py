"""Benchmarks of the PatchDPO loss family: fused Triton kernels vs the eager reference vs torch.compile.

Run through ``benchmarks/run_gpu.sh`` / ``benchmarks/run_cpu.sh`` (see README.md), or directly::

    pytest benchmarks/test_bench_losses.py --benchmark-json=out.json [--bench-quick]

Every case records in ``benchmark.extra_info``: op, impl, pass, shape, dtype, stride, the bytes this implementation
moves per call (counted from what it runs, ``traffic.py``) next to the ideal minimum, effective GB/s from its own
bytes (from the median), device time with the launch overhead hidden (CUDA), peak extra memory (CUDA) and the
warm-up (compile) time of its first call.
"""

from __future__ import annotations

import gc
import time

import bench_common as bc
import torch
import traffic


def _gbps(nbytes: int, seconds: float | None) -> float | None:
    return None if not seconds else nbytes / seconds / 1e9


def _time_it(bench, fn, env, per_call_s: float, iterations: int) -> float | None:
    """pytest-benchmark pedantic run with a synchronizing timer on CUDA; returns the median seconds per call."""
    bench._timer = env.timer  # the plugin binds its timer when a round starts; CUDA rounds end synchronized
    bench.pedantic(fn, rounds=env.plan.rounds, iterations=iterations, warmup_rounds=1)
    stats = getattr(bench, "stats", None)
    return None if stats is None else float(stats.stats.median)


def test_copy_bandwidth(bench, bench_env) -> None:
    """Device copy bandwidth (read + write bytes) of a large device-to-device copy: the roofline of the sweep."""
    device, sync = bench_env.device, bench_env.sync
    size = 2 * bc.GIB if device.type == "cuda" else (64 if bench_env.quick else 256) * bc.MIB
    src = torch.empty(size, dtype=torch.uint8, device=device).random_(1, 255)
    bufs = [torch.empty_like(src), src]  # dst, src; released at the end (the 2 GiB pair must not linger)
    del src

    def copy() -> None:
        bufs[0].copy_(bufs[1])

    copy()
    per_call, iterations = bc.calibrate(copy, sync, bench_env.plan)
    bench.group = "copy bandwidth"
    median = _time_it(bench, copy, bench_env, per_call, iterations)
    dev_s, hidden = (None, False)
    if device.type == "cuda":
        dev_s, hidden = bc.device_time(copy, per_call)
    moved = 2 * size
    bench.extra_info.update(
        kind="copy",
        impl="torch.Tensor.copy_",
        buffer_bytes=size,
        bytes_moved=moved,
        median_s=median,
        gbps=_gbps(moved, median),
        device_time_s=dev_s,
        device_gbps=_gbps(moved, dev_s),
        launch_hidden=hidden,
        device_name=bc.device_name(device),
    )
    bufs.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def test_loss(bench, bench_env, spec) -> None:
    case, pas, impl = spec
    device, sync = bench_env.device, bench_env.sync
    # Triton cases are skipped at collection where they cannot run (conftest.pytest_generate_tests).
    x = bc.make_inputs(case, device, bench_env.dtype)
    step = bc.make_step(case.op, impl, pas, x)

    # Warm-up outside the timed region: the first call compiles (Triton JIT / torch.compile); keep its cost.
    before = bc.compile_counters() if impl.startswith("compiled") else {}
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    first_call_s = time.perf_counter() - t0
    for _ in range(bench_env.plan.warmup_calls - 1):
        step()
    sync()
    after = bc.compile_counters() if impl.startswith("compiled") else {}

    # Same numbers as the eager reference? (computed once, outside the timed region)
    loss = float(bc.loss_forward(case.op, impl, x)().detach().float())
    ref_loss = float(bc.loss_forward(case.op, "eager", x)().detach().float())
    loss_ok = bc.loss_agrees(loss, ref_loss)

    per_call, iterations = bc.calibrate(step, sync, bench_env.plan)
    bench.group = f"{case.suite} | {case.op} | {pas} | {case.shape_str} | s={case.stride or '-'}"
    median = _time_it(bench, step, bench_env, per_call, iterations)

    dev_s, hidden = (None, False)
    if device.type == "cuda":
        dev_s, hidden = bc.device_time(step, per_call)
    gc.collect()
    peak, peak_reason = bc.peak_extra_memory(step, device)

    # Bytes this implementation moves per call, counted from one more call of what it runs (outside the timing).
    counts = {"ideal": traffic.ideal_bytes(case.op, pas, x)}
    if impl == "triton":
        counts[impl] = traffic.count_triton(step)
    elif impl == "eager":
        counts[impl] = traffic.count_eager(step)
    else:
        counts[impl], counts[f"{impl}_reason"] = traffic.count_compiled(step)
    bench.extra_info.update(
        {
            "kind": "loss",
            "suite": case.suite,
            "op": case.op,
            "impl": impl,
            "pass": pas,
            "shape": list(case.shape),
            "dtype": str(bench_env.dtype).replace("torch.", ""),
            "weight_dtype": None if x.weight is None else str(x.weight.dtype).replace("torch.", ""),
            "stride": case.stride,
            "weight_shape": None if x.weight is None else list(x.weight.shape),
            "input_bytes": bc.input_bytes(x),
            "median_s": median,
            "device_time_s": dev_s,
            "launch_hidden": hidden,
            "peak_extra_bytes": peak,
            "peak_extra_reason": peak_reason,
            "first_call_s": round(first_call_s, 4),
            "new_compiles": {k: after[k] - before.get(k, 0) for k in after} if after else None,
            "loss": loss,
            "eager_loss": ref_loss,
            "loss_ok": loss_ok,
        }
    )
    traffic.apply_counts(bench.extra_info, counts, impl)  # bytes_moved, ideal_bytes, bytes_ratio, gbps, device_gbps
    # Checked after recording, so a mismatch is both in the results and a test failure (non-zero exit).
    assert loss_ok, f"{impl} loss {loss!r} disagrees with the eager reference loss {ref_loss!r}"
