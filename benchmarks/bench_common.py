"""Shared machinery of the loss benchmarks: the pytest suite, the tile sweep and the report all import it.

Importing this module makes ``patchdpo_fast`` importable from this checkout even when the package is not
installed: the checkout goes first on ``sys.path`` and, because ``setup.py`` maps ``patchdpo_fast.kernels`` to
the top-level ``kernels/`` folder, that folder is registered under the name ``patchdpo_fast.kernels`` when the
import system cannot find it there (a shim local to the benchmarks; the package itself is untouched).

What is measured (see README.md):

* ``fwd``: the loss forward with ``pred.requires_grad=True`` (a training forward: the autograd graph is built and
  whatever each implementation saves for backward is written), all logging terms included;
* ``fwd_bwd``: the forward plus ``torch.autograd.grad(loss, pred)`` (writes ``grad_pred``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"

TRITON_CPU_SKIP = "Triton kernels need a CUDA device; the interpreter is for correctness only"
CPU_MEMORY_REASON = "CPU run: peak extra memory is measured with torch.cuda.max_memory_allocated, which needs CUDA"

OPS = ("patch_weighted_mse", "diffusion_dpo", "patch_dpo")
IMPLS = ("triton", "eager", "compiled")
PASSES = ("fwd", "fwd_bwd")
HAS_REF = {"patch_weighted_mse": False, "diffusion_dpo": True, "patch_dpo": True}
HAS_WEIGHT = {"patch_weighted_mse": True, "diffusion_dpo": False, "patch_dpo": True}
BETA = 5000.0
MIB = 1024**2
GIB = 1024**3


# ---------------------------------------------------------------------------------------------------------------
# Import shim for an uninstalled checkout
# ---------------------------------------------------------------------------------------------------------------


def _ensure_package() -> dict[str, str]:
    """Import ``patchdpo_fast`` (from this checkout when possible) and make ``patchdpo_fast.kernels`` resolve."""
    if "patchdpo_fast" not in sys.modules and str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import patchdpo_fast

    kernels_dir = (REPO / "kernels").resolve()
    spec = importlib.util.find_spec("patchdpo_fast.kernels")
    found = Path(spec.origin).resolve().parent if spec is not None and spec.origin else None
    how = "import system"
    from_checkout = Path(patchdpo_fast.__file__).resolve().parent == REPO / "patchdpo_fast"
    if kernels_dir.is_dir() and (found is None or (from_checkout and found != kernels_dir)):
        shim = importlib.util.spec_from_file_location(
            "patchdpo_fast.kernels", kernels_dir / "__init__.py", submodule_search_locations=[str(kernels_dir)]
        )
        assert shim is not None and shim.loader is not None
        module = importlib.util.module_from_spec(shim)
        sys.modules["patchdpo_fast.kernels"] = module
        shim.loader.exec_module(module)
        patchdpo_fast.kernels = module  # type: ignore[attr-defined]
        found = kernels_dir
        how = "benchmarks shim (kernels/ registered as patchdpo_fast.kernels)"
    return {
        "package_dir": str(Path(patchdpo_fast.__file__).resolve().parent),
        "kernels_dir": str(found),
        "kernels_import": how,
    }


PACKAGE_INFO = _ensure_package()

import torch  # noqa: E402

from patchdpo_fast.ops import (  # noqa: E402
    diffusion_dpo_loss,
    patch_dpo_loss,
    patch_weighted_mse,
    patchdpo_weights,
)
from patchdpo_fast.ops.reference import (  # noqa: E402
    diffusion_dpo_loss_reference,
    patch_dpo_loss_reference,
    patch_weighted_mse_reference,
)

# ---------------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One input configuration of one loss."""

    suite: str  # "realistic", "large", "quick" or "dryrun"
    op: str
    n: int
    c: int
    h: int
    w: int
    stride: int | None  # patch stride s (weight grid H/s x W/s); None for the unweighted loss

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c, self.h, self.w)

    @property
    def shape_str(self) -> str:
        return "x".join(str(v) for v in self.shape)

    @property
    def grid(self) -> tuple[int, int] | None:
        return None if self.stride is None else (self.h // self.stride, self.w // self.stride)

    @property
    def ident(self) -> str:
        s = "-" if self.stride is None else str(self.stride)
        return f"{self.suite}-{self.op}-{self.shape_str}-s{s}"


def build_cases(device_type: str, quick: bool) -> list[Case]:
    """The shape set: realistic shapes (a subset on the CPU) and, on CUDA, the large sweep."""
    if quick:
        shapes, large = [(8, 64)], []
        strides = (2,)
        suite = "quick"
    elif device_type == "cuda":
        shapes = [(n, hw) for n in (8, 32) for hw in (64, 128)]
        strides = (1, 2, 8)
        large = [256, 512, 768, 1024]  # N=32, C=4, H=W: up to 512 MiB (MSE) / 768 MiB (DPO) of bf16 inputs
        suite = "realistic"
    else:  # CPU: eager vs compiled on a subset that finishes in a few minutes with 2 cores
        shapes = [(8, 64), (32, 64)]
        strides = (1, 2, 8)
        large = []
        suite = "realistic"
    cases: list[Case] = []
    for op in OPS:
        for n, hw in shapes:
            for s in strides if HAS_WEIGHT[op] else (None,):
                cases.append(Case(suite, op, n, 4, hw, hw, s))
    for op in OPS:
        for hw in large:
            cases.append(Case("large", op, 32, 4, hw, hw, 8 if HAS_WEIGHT[op] else None))
    return cases


def static_check_cases(device_type: str, quick: bool) -> list[Case]:
    """Realistic cases that are also timed with a static-shape torch.compile (fwd+bwd), at the end of the run."""
    if quick or not COMPILE_SETTINGS["dynamic"]:  # nothing to check when `compiled` is static already
        return []
    shapes = [(8, 64), (32, 128)] if device_type == "cuda" else [(8, 64)]
    return [Case("realistic", op, n, 4, hw, hw, 2 if HAS_WEIGHT[op] else None) for op in OPS for n, hw in shapes]


#: ``run_gpu.sh --dry-run``: every stage at tiny size on the CPU, Triton under its interpreter (plumbing check)
DRY_RUN: bool = os.environ.get("PATCHDPO_BENCH_DRY_RUN", "0") == "1"
DRY_RUN_COMPILED_OPS = ("patch_weighted_mse",)  # one torch.compile (its CPU compile costs seconds per graph)


def dry_run_specs() -> list[tuple[Case, str, str]]:
    """One tiny case per op, both passes: triton (interpreter) and eager for all, compiled for one op."""
    specs = []
    for op in OPS:
        case = Case("dryrun", op, 4, 4, 8, 8, 2 if HAS_WEIGHT[op] else None)
        impls = IMPLS if op in DRY_RUN_COMPILED_OPS else ("triton", "eager")
        specs += [(case, p, impl) for p in PASSES for impl in impls]
    return specs


def build_specs(device_type: str, quick: bool) -> list[tuple[Case, str, str]]:
    """(case, pass, impl) triples in run order: the six runs of one case are adjacent (inputs are shared); the
    static-compile spot check comes last, so a run cut by its time budget loses it first."""
    if DRY_RUN:
        return dry_run_specs()
    specs = [(case, p, impl) for case in build_cases(device_type, quick) for p in PASSES for impl in IMPLS]
    return specs + [(case, "fwd_bwd", "compiled_static") for case in static_check_cases(device_type, quick)]


def spec_id(spec: tuple[Case, str, str]) -> str:
    case, p, impl = spec
    return f"{case.ident}-{p}-{impl}"


def bench_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    pred: torch.Tensor
    target: torch.Tensor
    ref_pred: torch.Tensor | None
    weight: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.pred, self.target, self.ref_pred, self.weight) if t is not None]


_INPUT_CACHE: dict[str, Inputs] = {}


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Inputs:
    """Random inputs (normal noise, quality maps in [0.02, 0.98]); never zeros. Weights are fp32.

    The most recent case's inputs are cached so that its six runs share them; older ones are released.
    """
    key = f"{case.ident}|{device}|{dtype}|{seed}"
    if key in _INPUT_CACHE:
        return _INPUT_CACHE[key]
    _INPUT_CACHE.clear()
    gen = torch.Generator(device=device).manual_seed(seed)

    def noise() -> torch.Tensor:
        return torch.randn(case.shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    pred = noise().requires_grad_(True)
    target = noise()
    ref_pred = noise() if HAS_REF[case.op] else None
    weight = None
    if case.grid is not None:
        b = case.n // 2
        q_ref, q_gen = (
            0.02 + 0.96 * torch.rand((b, *case.grid), generator=gen, device=device, dtype=torch.float32)
            for _ in range(2)
        )
        weight = patchdpo_weights(q_ref, q_gen, "official" if case.op == "patch_weighted_mse" else "dpo")
    inputs = Inputs(pred, target, ref_pred, weight)
    _INPUT_CACHE[key] = inputs
    return inputs


def release_inputs() -> None:
    _INPUT_CACHE.clear()


# ---------------------------------------------------------------------------------------------------------------
# Implementations
# ---------------------------------------------------------------------------------------------------------------


def _ref_patch_weighted_mse(pred, target, weight):
    out = patch_weighted_mse_reference(pred, target, weight)
    return out.loss, out.model_err, out.model_mse


def _ref_diffusion_dpo(pred, ref_pred, target):
    out = diffusion_dpo_loss_reference(pred, ref_pred, target, BETA)
    return out.loss, out.model_err, out.model_mse, out.ref_err, out.log_ratio, out.implicit_acc


def _ref_patch_dpo(pred, ref_pred, target, weight):
    out = patch_dpo_loss_reference(pred, ref_pred, target, weight, BETA)
    return out.loss, out.model_err, out.model_mse, out.ref_err, out.log_ratio, out.implicit_acc


_REF_TUPLE = {
    "patch_weighted_mse": _ref_patch_weighted_mse,
    "diffusion_dpo": _ref_diffusion_dpo,
    "patch_dpo": _ref_patch_dpo,
}


# Distinct code objects for the static-shape spot check: Dynamo caches compiled graphs per code object, so a
# static compile of the very same function would just reuse the dynamic graphs.
def _static_patch_weighted_mse(pred, target, weight):
    return _ref_patch_weighted_mse(pred, target, weight)


def _static_diffusion_dpo(pred, ref_pred, target):
    return _ref_diffusion_dpo(pred, ref_pred, target)


def _static_patch_dpo(pred, ref_pred, target, weight):
    return _ref_patch_dpo(pred, ref_pred, target, weight)


_STATIC_TUPLE = {
    "patch_weighted_mse": _static_patch_weighted_mse,
    "diffusion_dpo": _static_diffusion_dpo,
    "patch_dpo": _static_patch_dpo,
}

COMPILE_SETTINGS = {"dynamic": True, "fullgraph": True, "mode": "default", "recompile_limit": 64}
_COMPILED: dict[tuple[str, bool], Callable] = {}


def configure_dynamo() -> None:
    """Raise the recompile limit so the shape sweep never silently falls back to eager."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), COMPILE_SETTINGS["recompile_limit"]))


def compiled_fn(op: str, static: bool = False) -> Callable:
    """One ``torch.compile`` object per op, shared by both passes (the backward graph compiles at first use).

    ``dynamic=True`` makes sizes symbolic from the first compile, so the sweep recompiles only where the
    reference code branches on sizes (patch stride 1 vs >1, some reduction-size thresholds), not per shape.
    ``static=True``: ``dynamic=False`` (one specialized compile per shape), for the spot check of what the dynamic
    shapes cost; a training run with fixed shapes would get such a specialized compile.
    """
    key = (op, static)
    if key not in _COMPILED:
        configure_dynamo()
        fn = _STATIC_TUPLE[op] if static else _REF_TUPLE[op]
        dynamic = False if static else COMPILE_SETTINGS["dynamic"]
        _COMPILED[key] = torch.compile(fn, dynamic=dynamic, fullgraph=COMPILE_SETTINGS["fullgraph"])
    return _COMPILED[key]


def compile_counters() -> dict[str, int]:
    """Cumulative torch.compile work in this process (Dynamo graphs; Inductor compiles, fwd and bwd apart)."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # pragma: no cover - very old torch
        return {}
    ind = counters["inductor"]
    return {
        "dynamo_graphs": int(counters["stats"]["unique_graphs"]),
        "inductor_compiles": int(ind["fxgraph_cache_miss"] + ind["fxgraph_cache_hit"] + ind["fxgraph_cache_bypass"]),
        "inductor_cache_misses": int(ind["fxgraph_cache_miss"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def loss_forward(op: str, impl: str, x: Inputs) -> Callable[[], torch.Tensor]:
    """A zero-argument callable computing the loss (and all logging terms) with implementation ``impl``."""
    p, t, r, w = x.pred, x.target, x.ref_pred, x.weight
    if impl == "triton":
        if op == "patch_weighted_mse":
            return lambda: patch_weighted_mse(p, t, w, backend="triton").loss
        if op == "diffusion_dpo":
            return lambda: diffusion_dpo_loss(p, r, t, BETA, backend="triton").loss
        return lambda: patch_dpo_loss(p, r, t, w, BETA, backend="triton").loss
    if impl == "eager":
        fn = _REF_TUPLE[op]
    elif impl == "compiled":
        fn = compiled_fn(op)
    elif impl == "compiled_static":
        fn = compiled_fn(op, static=True)
    else:
        raise ValueError(f"unknown impl {impl!r}")
    args = {"patch_weighted_mse": (p, t, w), "diffusion_dpo": (p, r, t), "patch_dpo": (p, r, t, w)}[op]
    return lambda: fn(*args)[0]


def make_step(op: str, impl: str, pas: str, x: Inputs) -> Callable[[], torch.Tensor]:
    """The timed callable: forward, or forward + ``torch.autograd.grad`` (returns the loss or ``grad_pred``)."""
    fwd = loss_forward(op, impl, x)
    if pas == "fwd":
        return fwd
    pred = x.pred

    def fwd_bwd() -> torch.Tensor:
        return torch.autograd.grad(fwd(), pred)[0]

    return fwd_bwd


# ---------------------------------------------------------------------------------------------------------------
# Bytes
# ---------------------------------------------------------------------------------------------------------------


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def input_bytes(x: Inputs) -> int:
    """pred + target (+ ref_pred): the size measure of the sweep (weights excluded)."""
    return _nbytes(x.pred) + _nbytes(x.target) + _nbytes(x.ref_pred)


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def cuda_sync_timer() -> float:
    """``time.perf_counter`` after ``torch.cuda.synchronize()``: a round is timed from idle GPU to idle GPU."""
    torch.cuda.synchronize()
    return time.perf_counter()


def make_sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


@dataclass(frozen=True)
class TimingPlan:
    rounds: int
    round_s: float  # target duration of one round (iterations are calibrated to it)
    max_iterations: int
    warmup_calls: int


def timing_plan(device: torch.device, quick: bool) -> TimingPlan:
    if DRY_RUN:
        return TimingPlan(rounds=1, round_s=1e-6, max_iterations=1, warmup_calls=1)
    if device.type == "cuda":
        return TimingPlan(rounds=8 if quick else 20, round_s=2e-3, max_iterations=1000, warmup_calls=3)
    return TimingPlan(rounds=3 if quick else 10, round_s=0.05, max_iterations=200, warmup_calls=2)


def calibrate(fn: Callable[[], object], sync: Callable[[], None], plan: TimingPlan) -> tuple[float, int]:
    """Seconds per call (median of three) and the iterations per round that fill ``plan.round_s``."""
    samples = []
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    per_call = sorted(samples)[1]
    iterations = max(1, min(plan.max_iterations, math.ceil(plan.round_s / max(per_call, 1e-7))))
    return per_call, iterations


def device_time(fn: Callable[[], object], per_call_s: float, reps: int = 5) -> tuple[float | None, bool]:
    """GPU execution time per call with the host's launch overhead hidden (CUDA only).

    A spin kernel (``torch.cuda._sleep``) keeps the GPU busy while the calls are enqueued behind it, so the
    CUDA events around the calls see back-to-back GPU work. Returns ``(seconds per call, hidden)``; ``hidden``
    is False when the spin ended before all calls were enqueued (the time then includes launch gaps).
    """
    if not hasattr(torch.cuda, "_sleep"):
        return None, False
    iters = max(3, min(200, math.ceil(2e-3 / max(per_call_s, 1e-7))))
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_hz = float(getattr(props, "clock_rate", 0) or 2_000_000) * 1e3  # clock_rate is in kHz
    sleep_s = 2.0 * iters * per_call_s + 1e-3
    times, hidden, attempts = [], True, 3
    for _ in range(reps):
        for _attempt in range(attempts):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            torch.cuda._sleep(int(sleep_s * clock_hz))
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            ok = not start.query()  # the GPU had not reached `start` when the last call was enqueued
            torch.cuda.synchronize()
            if ok:
                break
            sleep_s = min(4 * sleep_s, max(sleep_s, 0.1))
        if not ok:  # something in fn waits for the GPU, or the host is slow: stop retrying, report it
            hidden, attempts = False, 1
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return sorted(times)[len(times) // 2], hidden


def peak_extra_memory(fn: Callable[[], object], device: torch.device) -> tuple[int | None, str | None]:
    """Peak memory allocated by one call beyond what is held before it (the inputs); CUDA only."""
    if device.type != "cuda":
        return None, CPU_MEMORY_REASON
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak), None


def loss_agrees(value: float, reference: float) -> bool:
    """A sanity check, not a test: beta = 5000 amplifies fp32 summation-order differences of the per-sample errors
    (about 1e-3 relative on the loss at 4M elements per sample), so only gross mismatches count."""
    return math.isfinite(value) and abs(value - reference) <= 1e-3 + 1e-2 * abs(reference)


# ---------------------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def select_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("--bench-device cuda was requested but torch.cuda.is_available() is False")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def environment_info(device: torch.device) -> dict[str, object]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # pragma: no cover - triton missing
        triton_version = f"not importable ({type(exc).__name__})"
    info: dict[str, object] = {
        "device_type": device.type,
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_runtime": torch.version.cuda,
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "dtype": str(bench_dtype(device)).replace("torch.", ""),
        "weight_dtype": "float32",
        "compile_settings": dict(COMPILE_SETTINGS),
        "tile_override": os.environ.get("PATCHDPO_FAST_TILE"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        **PACKAGE_INFO,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_memory_gib"] = round(props.total_memory / GIB, 1)
        info["device_sm_count"] = props.multi_processor_count
    return info


def write_json(path: Path, payload: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def as_dict(case: Case) -> dict[str, object]:
    return asdict(case)
