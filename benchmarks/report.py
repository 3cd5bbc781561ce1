"""Turn a loss-benchmark result file into a markdown report.

Usage::

    python benchmarks/report.py RESULTS.json [--out REPORT.md] [--tiles TILES.json] [--write-json OUT.json]

``RESULTS`` is the pytest-benchmark JSON (``--benchmark-json``) or the JSON-lines file the suite appends to
(``--bench-jsonl``; complete even when a run was cut short). ``--write-json`` stores the normalized records as a
JSON file (used when pytest-benchmark is not installed). The report holds one table per (suite, op, pass) with one
row per benchmark group (shape, stride): median time per implementation side by side, effective GB/s, GPU time
with launch overhead hidden, peak extra memory and speed-ups, then the verdict on the H200 targets.

Only the standard library is used, so the report can be rebuilt anywhere.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

IMPLS = ("triton", "eager", "compiled")
OPS = ("patch_weighted_mse", "diffusion_dpo", "patch_dpo")
PASSES = ("fwd", "fwd_bwd")
SUITES = ("dryrun", "quick", "realistic", "large")
SUITE_TITLES = {
    "dryrun": "Dry run (tiny shapes on the CPU, Triton interpreted: plumbing only, timings meaningless)",
    "quick": "Quick (plumbing check)",
    "realistic": "Realistic shapes",
    "large": "Large sweep",
}
MIB = 1024**2

TARGET_EAGER = 3.0
TARGET_COMPILED = 1.2
TARGET_COPY_FRACTION = 0.8
LARGE_MIN_INPUT_BYTES = 256 * MIB


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def load(path: Path) -> tuple[dict, list[dict], str | None]:
    """(machine info, benchmark records, run date) from a pytest-benchmark JSON or the suite's JSON lines."""
    text = path.read_text()
    machine: dict = {}
    records: list[dict] = []
    date = None
    if path.suffix == ".jsonl":
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off by a killed run
            if item.get("type") == "machine_info":
                machine = item["machine_info"]
            elif item.get("type") == "session_end":
                machine = item.get("session_info") or machine
            elif item.get("type") == "benchmark":
                records.append(item)
        date = machine.get("date_utc")
    else:
        data = json.loads(text)
        machine = data.get("patchdpo_bench") or data.get("machine_info", {}).get("patchdpo_bench", {})
        for b in data.get("benchmarks", []):
            records.append({"name": b.get("name"), "group": b.get("group"), "extra_info": b.get("extra_info", {}),
                            "stats": b.get("stats", {})})  # fmt: skip
        date = data.get("datetime") or machine.get("date_utc")
    return machine, records, date


# ---------------------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------------------


def fmt_time(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_num(v: float | None, digits: int = 1) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def fmt_mib(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v / MIB:.2f}" if v < 10 * MIB else f"{v / MIB:.0f}"


def fmt_moved(info: dict) -> str:
    """This implementation's own bytes per call and their ratio to the ideal minimum, e.g. ``12.0 (1.50x)``."""
    moved, ideal = info.get("bytes_moved"), info.get("ideal_bytes")
    if moved is None:
        return "—"
    return fmt_mib(moved) + (f" ({moved / ideal:.2f}x)" if ideal else "")


def fmt_ratio(num: float | None, den: float | None) -> str:
    r = ratio(num, den)
    return "—" if r is None else f"{r:.2f}x"


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0 or num <= 0:
        return None
    return num / den


def triple(values: list[str]) -> str:
    return " / ".join(values)


def geomean(values: list[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def group_records(records: list[dict]) -> tuple[dict, dict | None]:
    """{(suite, op, pass): {(shape, stride): {impl: extra_info}}} and the copy-bandwidth record."""
    table: dict = defaultdict(lambda: defaultdict(dict))
    copy = None
    for r in records:
        info = r.get("extra_info") or {}
        if info.get("kind") == "copy":
            copy = info
        elif info.get("kind") == "loss":
            key = (info["suite"], info["op"], info["pass"])
            row = (tuple(info["shape"]), info.get("stride"))
            table[key][row][info["impl"]] = info
    return table, copy


def _verdict(values: list[float], target: float) -> str:
    if not values:
        return "not evaluated (no paired results)"
    n_ok = sum(v >= target for v in values)
    if n_ok == len(values):
        return f"**MET** (all {len(values)} cases)"
    gm = geomean(values)
    if gm is not None and gm >= target:
        return f"**PARTLY MET** (geomean meets it; {n_ok}/{len(values)} cases do)"
    return f"**NOT MET** ({n_ok}/{len(values)} cases)"


def targets_section(table: dict, copy: dict | None, machine: dict) -> list[str]:
    out = ["## Targets (from the issue, for an H200)", ""]
    is_cuda = machine.get("device_type") == "cuda"
    name = str(machine.get("device_name", "?"))
    if not is_cuda:
        why = (
            "this was a dry run (tiny shapes on the CPU, the Triton kernels in their interpreter)"
            if machine.get("dry_run")
            else "this run had no CUDA device, so the fused Triton kernels were skipped "
            f"({machine.get('triton_skip_reason') or 'no CUDA'})"
        )
        out += [
            f"Not evaluated: {why}. The targets are:",
            "",
            f"- fused fwd+bwd >= {TARGET_EAGER:g}x faster than eager and >= {TARGET_COMPILED:g}x faster than "
            "torch.compile at the realistic shapes;",
            f"- >= {TARGET_COPY_FRACTION:.0%} of the device copy bandwidth on the large sweep.",
            "",
        ]
        return out
    if "h200" not in name.lower():
        out += [f"Note: the targets were set for an H200; this run's device is **{name}**.", ""]
    wall_e, wall_c, dev_e, dev_c, wall_s, dev_s = [], [], [], [], [], []
    for (suite, _op, pas), rows in table.items():
        if suite != "realistic" or pas != "fwd_bwd":
            continue
        for impls in rows.values():
            t, e, c = (impls.get(k) for k in IMPLS)
            st = impls.get("compiled_static")
            if t is None:
                continue
            for dst, other, field in ((wall_e, e, "median_s"), (wall_c, c, "median_s"),
                                      (dev_e, e, "device_time_s"), (dev_c, c, "device_time_s"),
                                      (wall_s, st, "median_s"), (dev_s, st, "device_time_s")):  # fmt: skip
                r = ratio(other.get(field) if other else None, t.get(field))
                if r is not None:
                    dst.append(r)
    out += [
        "| target | measured (wall-clock medians) | verdict | same on GPU time (launch overhead hidden) |",
        "|---|---|---|---|",
    ]

    def summary(vals: list[float]) -> str:
        if not vals:
            return "—"
        return f"geomean {geomean(vals):.2f}x, min {min(vals):.2f}x, max {max(vals):.2f}x over {len(vals)} cases"

    def dev_summary(vals: list[float], target: float) -> str:
        return f"{summary(vals)}; {_verdict(vals, target)}" if vals else "—"

    out.append(
        f"| fused fwd+bwd >= {TARGET_EAGER:g}x faster than eager (realistic shapes) | {summary(wall_e)} | "
        f"{_verdict(wall_e, TARGET_EAGER)} | {dev_summary(dev_e, TARGET_EAGER)} |"
    )
    out.append(
        f"| fused fwd+bwd >= {TARGET_COMPILED:g}x faster than torch.compile (realistic shapes) | {summary(wall_c)} | "
        f"{_verdict(wall_c, TARGET_COMPILED)} | {dev_summary(dev_c, TARGET_COMPILED)} |"
    )
    if wall_s:
        out.append(
            f"| same, against a static-shape compile (spot check) | {summary(wall_s)} | "
            f"{_verdict(wall_s, TARGET_COMPILED)} | {dev_summary(dev_s, TARGET_COMPILED)} |"
        )
    fracs, fracs_dev, labels = [], [], []
    copy_bw = copy.get("gbps") if copy else None
    copy_bw_dev = (copy.get("device_gbps") or copy_bw) if copy else None
    for (suite, op, pas), rows in sorted(table.items()):
        if suite != "large":
            continue
        for (shape, _stride), impls in sorted(rows.items()):
            t = impls.get("triton")
            if t is None or not copy_bw or t.get("input_bytes", 0) < LARGE_MIN_INPUT_BYTES:
                continue
            fracs.append((t.get("gbps") or 0.0) / copy_bw)
            if t.get("device_gbps") and copy_bw_dev:
                fracs_dev.append(t["device_gbps"] / copy_bw_dev)
            labels.append(f"{op} {pas} {'x'.join(map(str, shape))}")
    if fracs:
        measured = f"min {min(fracs):.0%}, max {max(fracs):.0%} over {len(fracs)} cases (inputs >= 256 MiB)"
        n_ok = sum(f >= TARGET_COPY_FRACTION for f in fracs)
        verdict = f"**MET** (all {len(fracs)})" if n_ok == len(fracs) else f"**NOT MET** ({n_ok}/{len(fracs)})"
        dev = f"min {min(fracs_dev):.0%}, max {max(fracs_dev):.0%}" if fracs_dev else "—"
    else:
        measured, verdict, dev = "—", "not evaluated (no large-sweep Triton results or no copy bandwidth)", "—"
    out.append(
        f"| >= {TARGET_COPY_FRACTION:.0%} of copy bandwidth on the large sweep (Triton fwd and fwd+bwd) | "
        f"{measured} | {verdict} | {dev} |"
    )
    out += [
        "",
        "The verdict uses wall-clock medians (host overhead included, as a standalone call sees it). In a training "
        "step the loss is queued behind the UNet's GPU work, so the host overhead is hidden and the GPU-time "
        "column is the better predictor there; at the realistic shapes the two can differ a lot.",
        "",
    ]
    return out


def suite_tables(table: dict, copy: dict | None, machine: dict) -> list[str]:
    out: list[str] = []
    is_cuda = machine.get("device_type") == "cuda"
    copy_bw = copy.get("gbps") if copy else None
    for suite in SUITES:
        keys = [(suite, op, pas) for op in OPS for pas in PASSES if (suite, op, pas) in table]
        if not keys:
            continue
        title = SUITE_TITLES[suite]
        out += [f"## {title}", ""]
        for key in keys:
            _, op, pas = key
            out += [f"### {op} — {pas}", ""]
            head = ["shape (N,C,H,W)", "s", "ideal MiB", "MiB moved t / e / c (x ideal)", "median time t / e / c",
                    "GB/s t / e / c"]  # fmt: skip
            if is_cuda:
                head += ["GPU time t / e / c", "peak extra MiB t / e / c"]
            head += ["triton vs eager", "triton vs compiled"]
            if is_cuda:
                head += ["GPU time: t vs e / t vs c"]
            head += ["compiled vs eager"]
            if suite == "large":
                head += ["triton % of copy BW"]
            out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            rows = table[key]
            for (shape, stride), impls in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
                any_info = next(iter(impls.values()))
                get = {k: impls.get(k) or {} for k in IMPLS}
                med = {k: get[k].get("median_s") for k in IMPLS}
                dev = {k: get[k].get("device_time_s") for k in IMPLS}
                cells = [
                    "x".join(map(str, shape)),
                    "—" if stride is None else str(stride),
                    fmt_mib(any_info.get("ideal_bytes")),
                    triple([fmt_moved(get[k]) for k in IMPLS]),
                    triple([fmt_time(med[k]) for k in IMPLS]),
                    triple([fmt_num(get[k].get("gbps")) for k in IMPLS]),
                ]
                if is_cuda:
                    cells += [
                        triple([fmt_time(dev[k]) for k in IMPLS]),
                        triple([fmt_mib(get[k].get("peak_extra_bytes")) for k in IMPLS]),
                    ]
                cells += [fmt_ratio(med["eager"], med["triton"]), fmt_ratio(med["compiled"], med["triton"])]
                if is_cuda:
                    cells += [f"{fmt_ratio(dev['eager'], dev['triton'])} / {fmt_ratio(dev['compiled'], dev['triton'])}"]
                cells += [fmt_ratio(med["eager"], med["compiled"])]
                if suite == "large":
                    g = get["triton"].get("gbps")
                    cells += ["—" if not (g and copy_bw) else f"{g / copy_bw:.0%}"]
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
    return out


def static_section(table: dict) -> list[str]:
    rows = []
    for (_suite, op, pas), groups in sorted(table.items()):
        for (shape, stride), impls in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
            st = impls.get("compiled_static")
            if st is None:
                continue
            t, c = impls.get("triton") or {}, impls.get("compiled") or {}
            rows.append(
                f"| {op} | {pas} | {'x'.join(map(str, shape))} | {'—' if stride is None else stride} | "
                f"{fmt_time(t.get('median_s'))} | {fmt_time(c.get('median_s'))} | {fmt_time(st.get('median_s'))} | "
                f"{fmt_ratio(c.get('median_s'), st.get('median_s'))} | "
                f"{fmt_ratio(st.get('median_s'), t.get('median_s'))} | "
                f"{fmt_ratio(st.get('device_time_s'), t.get('device_time_s'))} |"
            )
    if not rows:
        return []
    return [
        "## torch.compile: dynamic vs static shapes (spot check, fwd+bwd)",
        "",
        "The `compiled` column everywhere else is one `dynamic=True` compile per op reused across the sweep. A "
        "training run with fixed shapes would get a shape-specialized compile; this table times that "
        "(`dynamic=False`, compiled for this shape alone) at a few realistic shapes.",
        "",
        "| op | pass | shape | s | triton | compiled (dynamic) | compiled (static) | static speed-up over dynamic | "
        "triton vs static | GPU time: triton vs static |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def mismatch_section(records: list[dict]) -> list[str]:
    bad = [r for r in records if (r.get("extra_info") or {}).get("loss_ok") is False]
    if not bad:
        return []
    out = ["## Loss mismatches against the eager reference", ""]
    for r in bad:
        i = r["extra_info"]
        out.append(f"- {r.get('name')}: loss {i.get('loss')!r} vs eager {i.get('eager_loss')!r}")
    return [*out, ""]


def header_section(machine: dict, records: list[dict], date: str | None, copy: dict | None) -> list[str]:
    cc = machine.get("compile_counters") or {}
    first = defaultdict(float)
    for r in records:
        info = r.get("extra_info") or {}
        if info.get("kind") == "loss":
            first[info["impl"]] += info.get("first_call_s") or 0.0
    lines = [
        f"# PatchDPO loss benchmarks — {machine.get('device_name', '?')}",
        "",
        f"- date (UTC): {date or machine.get('date_utc', '?')}",
        f"- device: {machine.get('device_type', '?')} — **{machine.get('device_name', '?')}**"
        + (f", {machine.get('device_memory_gib')} GiB" if machine.get("device_memory_gib") else ""),
        f"- CPU: {machine.get('cpu_model', '?')} ({machine.get('cpu_count', '?')} cores, torch intra-op threads "
        f"{machine.get('torch_threads', '?')}); "
        f"host {machine.get('hostname')}",
        f"- torch {machine.get('torch', '?')}, triton {machine.get('triton', '?')}, CUDA runtime "
        f"{machine.get('cuda_runtime')}, python {machine.get('python', '?')}",
        f"- inputs: pred/target/ref_pred {machine.get('dtype', '?')}, weights {machine.get('weight_dtype', '?')}; "
        f"quick run: {machine.get('quick')}; pytest-benchmark plugin: {machine.get('pytest_benchmark')}",
        f"- torch.compile of the reference: {machine.get('compile_settings')}; work done in this run: "
        f"{cc.get('dynamo_graphs', '?')} Dynamo graphs, {cc.get('inductor_compiles', '?')} Inductor compiles "
        f"(forward and backward graphs apart; {cc.get('inductor_cache_misses', '?')} cache misses), "
        f"{cc.get('graph_breaks', '?')} graph breaks",
        "- first-call (compile / JIT) time summed over cases: "
        + ", ".join(f"{k} {first[k]:.1f} s" for k in IMPLS if k in first)
        + (f"; whole session {machine.get('session_s')} s" if machine.get("session_s") is not None else ""),
        f"- package: {machine.get('package_dir')}; kernels: {machine.get('kernels_dir')} "
        f"({machine.get('kernels_import')}); PATCHDPO_FAST_TILE={machine.get('tile_override')}",
    ]
    if machine.get("budget_skipped"):
        lines.append(
            f"- **{machine['budget_skipped']} cases were not run: the time budget (--bench-budget-s) ran out**"
        )
    if machine.get("triton_skip_reason"):
        lines.append(f"- triton: skipped — {machine['triton_skip_reason']}")
    if copy:
        lines.append(
            f"- device copy bandwidth (same run, {fmt_mib(copy.get('buffer_bytes'))} MiB buffer, read + write "
            f"counted): **{fmt_num(copy.get('gbps'))} GB/s** wall-clock"
            + (f", {fmt_num(copy.get('device_gbps'))} GB/s GPU time" if copy.get("device_gbps") else "")
        )
    lines.append("")
    return lines


HOW_TO_READ = """## How to read the tables

- `t / e / c` = triton (fused kernels, `backend="triton"`) / eager (the PyTorch reference functions) / compiled
  (`torch.compile` of the reference, warmed up before timing); `—` = not run (skipped or cut by the time budget).
- `fwd`: the forward with `pred.requires_grad=True` (what a training step runs: autograd state is saved), all
  logging terms included. `fwd_bwd`: the forward plus `torch.autograd.grad(loss, pred)`. For `patch_weighted_mse`
  (bf16/fp32) the triton `fwd` already writes `grad_pred` (the one-pass kernel), so its backward is nearly free.
- median time: pytest-benchmark median over rounds; each round times many back-to-back calls and, on CUDA, starts
  and ends with `torch.cuda.synchronize()`, so it includes host (Python, launch) overhead.
- GPU time (CUDA only): per-call time between CUDA events while the calls are queued behind a spin kernel, i.e.
  device execution with the launch overhead hidden (as inside a training step).
- ideal MiB: the fewest bytes any implementation can move — pred, target, (ref_pred) and the weight map read once,
  the loss and per-sample terms written once, and for fwd+bwd grad_pred written once.
- MiB moved t / e / c: what each implementation moves per call, counted from what it runs (`benchmarks/traffic.py`):
  triton from its recorded kernel launches, eager from the inputs and outputs of every aten op (a dispatch mode; an
  upper bound), compiled from the buffers its generated kernels are given; in brackets the ratio to the ideal.
  GB/s = each implementation's own bytes / its median time (older result files, without own counts, used one
  yardstick for all three).
- peak extra MiB (CUDA only): `torch.cuda.max_memory_allocated()` during one call minus the memory allocated
  before it (the inputs), after `reset_peak_memory_stats()`; includes the outputs and, for `fwd`, what autograd
  saves. Not measured on the CPU.
- speed-ups are ratios of medians measured side by side in the same run (> 1 means triton is faster);
  `compiled vs eager` > 1 means torch.compile is faster than eager.
- % of copy BW: triton GB/s divided by the same run's device-to-device copy bandwidth (read + write counted).
"""


def tiles_section(tiles: dict) -> list[str]:
    out = ["## Tile sweep (`PATCHDPO_FAST_TILE=C,H,W,WARPS`, fwd+bwd)", ""]
    if tiles.get("note"):
        out += [tiles["note"], ""]
    out += [
        "| op | shape | s | default | best | best C,H,W,WARPS | speed-up vs default |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in tiles.get("best", []):
        out.append(
            f"| {row['op']} | {row['shape']} | {row['stride']} | {fmt_time(row.get('default_s'))} | "
            f"{fmt_time(row.get('best_s'))} | {row.get('best_tile')} | "
            f"{fmt_ratio(row.get('default_s'), row.get('best_s'))} |"
        )
    if tiles.get("best_uniform"):
        u = tiles["best_uniform"]
        out += [
            "",
            f"Best single setting over all swept shapes: `{u['tile']}`, geomean {u['speedup']:.3f}x vs the default "
            "heuristic (< 1: the default is faster).",
        ]
    if tiles.get("invalid"):
        out += ["", f"Settings that gave wrong results or failed: {', '.join(tiles['invalid'])}"]
    out.append("")
    return out


def render(machine: dict, records: list[dict], date: str | None, tiles: dict | None = None) -> str:
    table, copy = group_records(records)
    lines = header_section(machine, records, date, copy)
    lines += mismatch_section(records)
    lines += targets_section(table, copy, machine)
    lines += suite_tables(table, copy, machine)
    lines += static_section(table)
    if tiles:
        lines += tiles_section(tiles)
    lines.append(HOW_TO_READ)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="pytest-benchmark JSON or the suite's .jsonl")
    ap.add_argument("--out", type=Path, default=None, help="markdown path (default: next to the results, .md)")
    ap.add_argument("--tiles", type=Path, default=None, help="tile-sweep JSON from benchmarks/tile_sweep.py")
    ap.add_argument("--write-json", type=Path, default=None, help="also write the normalized records as JSON")
    args = ap.parse_args(argv)

    machine, records, date = load(args.results)
    if not records:
        print(f"report: no benchmark records in {args.results}", file=sys.stderr)
        return 1
    tiles = json.loads(args.tiles.read_text()) if args.tiles and args.tiles.exists() else None
    out = args.out or args.results.with_suffix(".md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(machine, records, date, tiles))
    if args.write_json:
        payload = {"datetime": date, "patchdpo_bench": machine, "benchmarks": records}
        args.write_json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"report: wrote {out} ({len(records)} results)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
