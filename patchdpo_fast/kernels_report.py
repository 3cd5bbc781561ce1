"""Compile every Triton kernel ahead of time for sm_80 and sm_90 and report registers, spills and shared memory.

``patchdpo kernels-report`` (or ``python -m patchdpo_fast.kernels_report``). No GPU is needed: the launch helpers
run on ``meta`` tensors with their launches recorded instead of executed (``patchdpo_fast.kernels.launch``), which
yields exactly the arguments, tiles and compile-time switches they would launch with on a GPU; each distinct
specialization is then compiled for every requested architecture with ``triton.compile`` and the wheel's ``ptxas``
(``patchdpo_fast.kernels.aot``).

Covered: the loss kernels (forward with and without weights and reference, the one-pass MSE forward+gradient,
the backward, the gradient rescale, the epilogue and its second level) for fp32, bf16 and fp16 inputs in NCHW and
channels_last layouts at the benchmark shapes, a large batch (2B = 8192) and an odd shape; and the patch-matching
kernel at the matching benchmark's shapes. The exit status is non-zero if any specialization fails to compile or
spills registers.

The Triton interpreter must be off for compiling; when ``TRITON_INTERPRET=1`` is set the command re-runs itself in
a child process without it. Compiles go to a fresh ``TRITON_CACHE_DIR`` (ptxas statistics only exist on a real
compile). Takes ~20-40 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

__all__ = ["collect_launches", "main", "render_markdown", "run_report"]

CAPABILITIES = (80, 90)
DTYPES = ("float32", "bfloat16", "float16")
LAYOUTS = ("nchw", "channels_last")

#: (N, C, H, W, patch strides): the loss benchmark's realistic and large shapes, a large batch and an odd shape
LOSS_SHAPES: tuple[tuple[int, int, int, int, tuple[int, ...]], ...] = (
    (8, 4, 64, 64, (1, 2, 8)),
    (32, 4, 128, 128, (1, 2, 8)),
    (32, 4, 512, 512, (8,)),
    (32, 4, 1024, 1024, (8,)),
    (8192, 4, 64, 64, (2,)),
    (6, 3, 40, 24, (1, 4)),
)
#: (B, Nq, Nk, D): the matching benchmark's CUDA shapes
MATCH_SHAPES = ((16, 1369, 1369, 1024), (256, 256, 256, 768), (8, 4096, 4096, 384))


def _meta(shape: tuple[int, ...], dtype: Any, layout: str = "nchw") -> Any:
    import torch

    t = torch.empty(shape, dtype=dtype, device="meta")
    if layout == "channels_last" and t.dim() == 4:
        t = t.to(memory_format=torch.channels_last)
    return t


def _loss_launches(dtype_name: str, layout: str) -> Iterator[tuple[str, Any]]:
    """(label, Launch) for every loss kernel launch at every shape, on meta tensors."""
    import torch

    from patchdpo_fast.kernels.launch import record_launches
    from patchdpo_fast.kernels.patch_loss import patch_loss_backward, patch_loss_forward, scale_gradient_
    from patchdpo_fast.ops.autograd import one_pass_eligible

    dtype = getattr(torch, dtype_name)
    for n, c, h, w, strides in LOSS_SHAPES:
        shape = (n, c, h, w)
        pred, target, ref = (_meta(shape, dtype, layout) for _ in range(3))
        label = f"{dtype_name} {layout} {n}x{c}x{h}x{w}"
        variants: list[tuple[str, Any, Any, bool]] = [("diffusion_dpo", ref, None, True), ("mse", None, None, False)]
        for s in strides:
            weight = _meta((n, h // s, w // s), torch.float32)
            variants += [(f"patch_dpo s={s}", ref, weight, True), (f"patch_weighted_mse s={s}", None, weight, False)]
        for name, r, wt, is_dpo in variants:
            with record_launches(execute=False) as rec:
                out = patch_loss_forward(pred, target, r, wt, 5000.0, is_dpo)
                patch_loss_backward(pred, target, wt, out["coef"], torch.ones((), device="meta"))
                if one_pass_eligible(pred.requires_grad_(True), is_dpo):  # the MSE's one-pass forward + gradient
                    out = patch_loss_forward(pred, target, None, wt, 0.0, False, write_grad=True)
                    scale_gradient_(out["grad_pred"], torch.ones((), device="meta"))
            for x in rec.launches:
                yield f"{label} {name}", x


def _match_launches(dtype_name: str) -> Iterator[tuple[str, Any]]:
    import torch

    from patchdpo_fast.kernels.launch import record_launches
    from patchdpo_fast.kernels.patch_match import patch_match_forward

    dtype = getattr(torch, dtype_name)
    for b, nq, nk, d in MATCH_SHAPES:
        q, k = _meta((b, nq, d), dtype), _meta((b, nk, d), dtype)
        for mask in (None, _meta((b, nk), torch.bool)):
            with record_launches(execute=False) as rec:
                patch_match_forward(q, k, mask, 1e-6)
            for x in rec.launches:
                yield f"{dtype_name} {b}x{nq}x{nk}x{d} mask={mask is not None}", x


def collect_launches() -> list[tuple[str, Any]]:
    """Every launch the loss and matching helpers make over the report's shapes, dtypes and layouts."""
    out: list[tuple[str, Any]] = []
    for dt in DTYPES:
        for layout in LAYOUTS:
            out.extend(_loss_launches(dt, layout))
        out.extend(_match_launches(dt))
    return out


def _all_kernel_names() -> list[str]:
    """Names of every ``@triton.jit`` kernel (not helper) defined in the kernel modules."""
    from triton.runtime.jit import JITFunction

    from patchdpo_fast.kernels import patch_loss, patch_match

    names = []
    for mod in (patch_loss, patch_match):
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                names.append(name)
    return sorted(names)


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the compile workers and their ptxas runs)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# worker state for the fork-based pool: the unique launches, indexed
_PENDING: list[Any] = []


def _compile_one(job: tuple[int, int]) -> dict[str, Any]:
    from patchdpo_fast.kernels.aot import compile_launch

    index, cap = job
    return asdict(compile_launch(_PENDING[index], cap))


def run_report(capabilities: tuple[int, ...] = CAPABILITIES, jobs: int = 2, only: str = "") -> dict[str, Any]:
    """Compile every distinct specialization for each capability; returns the JSON-able report.

    ``only``: keep the launches whose kernel name contains this text (e.g. ``match``).
    """
    import multiprocessing

    import torch
    import triton

    from patchdpo_fast.kernels.aot import specialization

    t0 = time.perf_counter()
    cpu0 = _cpu_seconds()
    launches = [(label, x) for label, x in collect_launches() if only in x.name]
    unique: dict[str, int] = {}
    uses: dict[str, list[str]] = defaultdict(list)
    _PENDING.clear()
    jobs_list: list[tuple[int, int]] = []
    for label, x in launches:
        for cap in capabilities:
            key, _, _ = specialization(x, cap)
            uses[key].append(label)
            if key not in unique:
                unique[key] = len(_PENDING)
                _PENDING.append(x)
                jobs_list.append((unique[key], cap))
    collect_s = time.perf_counter() - t0
    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.map(_compile_one, jobs_list, chunksize=1)
    else:
        results = [_compile_one(j) for j in jobs_list]
    keys = list(unique)
    for key, res in zip(keys, results, strict=True):
        res["key"] = key
        res["uses"] = len(uses[key])
        res["example"] = uses[key][0]
    compiled = {r["kernel"] for r in results}
    return {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "capabilities": list(capabilities),
        "launches": len(launches),
        "specializations": len(results),
        "kernels_defined": _all_kernel_names(),
        "kernels_not_compiled": sorted({k for k in _all_kernel_names() if only in k} - compiled),
        "collect_s": round(collect_s, 2),
        "total_s": round(time.perf_counter() - t0, 2),
        "cpu_s": round(_cpu_seconds() - cpu0, 1),
        "results": results,
    }


def _variant(constexprs: str) -> str:
    """The compile-time switches that select code paths (booleans and LAYOUT); tile sizes left out."""
    keep = []
    for item in constexprs.split():
        name, _, value = item.partition("=")
        if value in ("True", "False") or name == "LAYOUT":
            if value == "False":
                continue
            keep.append(name if value == "True" else f"{name}={value}")
    return " ".join(keep) or "—"


def summarize(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (kernel, variant, capability): the worst registers, spills and shared memory over its
    specializations (dtypes, tiles, layouts)."""
    groups: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for r in report["results"]:
        groups[(r["kernel"], _variant(r["constexprs"]), r["capability"])].append(r)
    rows = []
    for (kernel, variant, cap), rs in sorted(groups.items()):
        worst = max(rs, key=lambda r: (r["spill_stores"] + r["spill_loads"], r["registers"]))
        rows.append(
            {
                "kernel": kernel,
                "variant": variant,
                "capability": cap,
                "specializations": len(rs),
                "registers_max": max(r["registers"] for r in rs),
                "registers_min": min(r["registers"] for r in rs),
                "spill_bytes_max": max(r["spill_stores"] + r["spill_loads"] for r in rs),
                "shared_bytes_max": max(r["shared_bytes"] for r in rs),
                "warps": sorted({r["num_warps"] for r in rs}),
                "errors": sum(r["error"] is not None for r in rs),
                "worst_example": worst["example"],
            }
        )
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    rows = summarize(report)
    errors = [r for r in report["results"] if r["error"]]
    spills = [r for r in report["results"] if r["spill_stores"] + r["spill_loads"] > 0]
    lines = [
        "# Triton kernels compiled ahead of time (no GPU)",
        "",
        f"- triton {report['triton']}, torch {report['torch']}; targets "
        + ", ".join(f"sm_{c}" for c in report["capabilities"])
        + " (ptxas from the triton wheel)",
        f"- {report['launches']} launches recorded from the launch helpers on meta tensors (fp32/bf16/fp16, NCHW "
        f"and channels_last, the benchmark shapes, 2B = 8192, an odd shape; the matching benchmark's shapes) -> "
        f"{report['specializations']} distinct compiles in {report['total_s']:.1f} s wall, "
        f"{report.get('cpu_s', float('nan')):.0f} s CPU",
        f"- compile errors: **{len(errors)}**; specializations with register spills: **{len(spills)}**",
        "- kernels defined but not compiled: " + (", ".join(report["kernels_not_compiled"]) or "none"),
        "",
        "Per kernel, code-path variant (compile-time switches that are on) and architecture: the worst case over its "
        "specializations (dtype, layout, tile). Registers are per thread; spills are ptxas's spill stores + loads; "
        "shared memory is what Triton allocates per program (reductions, layout conversions).",
        "",
        "| kernel | variant | arch | specializations | registers (min-max) | spill bytes | shared bytes | warps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kernel']} | {r['variant']} | sm_{r['capability']} | {r['specializations']} | "
            f"{r['registers_min']}-{r['registers_max']} | {r['spill_bytes_max']} | {r['shared_bytes_max']} | "
            f"{','.join(map(str, r['warps']))} |"
        )
    if errors or spills:
        lines += ["", "## Failures", ""]
        for r in errors + spills:
            lines.append(
                f"- {r['kernel']} sm_{r['capability']} ({r['example']}; {r['constexprs']}): "
                + (r["error"] or f"{r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads")
            )
    lines += ["", "Regenerate with `patchdpo kernels-report --out-md <this file> --out-json <json>`.", ""]
    return "\n".join(lines)


def _rerun_without_interpreter(argv: list[str]) -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "patchdpo_fast.kernels_report", *argv]
    return subprocess.call(cmd, env=env)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="patchdpo kernels-report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default=",".join(map(str, CAPABILITIES)),
                    help="compute capabilities as integers, e.g. 80,90 (default)")  # fmt: skip
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compiles (default 2)")
    ap.add_argument("--only", default="", help="compile only kernels whose name contains this text")
    ap.add_argument("--out-md", type=Path, default=None, help="write the markdown table here")
    ap.add_argument("--out-json", type=Path, default=None, help="write every specialization's numbers here")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("kernels-report: TRITON_INTERPRET=1 is set; compiling in a child process without it", flush=True)
        return _rerun_without_interpreter(argv)
    caps = tuple(int(c) for c in args.arch.split(",") if c)
    with tempfile.TemporaryDirectory(prefix="patchdpo_aot_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # fresh cache: every specialization really runs ptxas
        report = run_report(caps, jobs=max(1, args.jobs), only=args.only)
    text = render_markdown(report)
    print(text)
    if args.out_md:
        args.out_md.parent.mkdir(parents=True, exist_ok=True)
        args.out_md.write_text(text)
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(report, indent=1) + "\n")
    bad = [r for r in report["results"] if r["error"] or r["spill_stores"] + r["spill_loads"] > 0]
    if report["kernels_not_compiled"]:
        print(f"kernels-report: not compiled: {', '.join(report['kernels_not_compiled'])}", file=sys.stderr)
    if bad:
        print(f"kernels-report: {len(bad)} specializations failed to compile or spill registers", file=sys.stderr)
    return 1 if bad or report["kernels_not_compiled"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
