"""Time a few ``PATCHDPO_FAST_TILE=C,H,W,WARPS`` settings of the fused kernels on the fwd+bwd realistic shapes.

The tile heuristic in ``kernels/patch_loss.py::tile_config`` (NCHW: 1024 pixels per step, 4 warps, all channels
walked by one program) has never been tuned on a GPU. ``tile_config`` reads ``PATCHDPO_FAST_TILE`` at every launch,
so this script sets it in-process, checks each setting against the eager reference (loss and ``grad_pred``), times
it with the launch overhead hidden (GPU time, see ``bench_common.device_time``) and records the best setting per
shape and the best single setting.

Usage::

    python benchmarks/tile_sweep.py [--quick] [--budget-s 150] [--out-json PATH] [--out-md PATH]
    python benchmarks/tile_sweep.py --allow-cpu --quick   # plumbing only: Triton interpreter, timings meaningless

Each new setting costs a Triton compile per kernel and shape specialization (about 1 s each), so the sweep stops
starting new settings once ``--budget-s`` has passed and says so in its output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

CANDIDATES = [  # (BLOCK_C, BLOCK_H, BLOCK_W, num_warps) of the NCHW tile: BLOCK_C channels walked over H x W pixels
    (4, 16, 64, 4),  # the default heuristic for C = 4 latents
    (4, 8, 64, 4),
    (4, 32, 64, 8),
    (4, 16, 64, 8),
    (4, 8, 128, 4),
    (4, 16, 128, 8),
    (2, 16, 64, 4),
    (1, 16, 64, 4),
    (4, 32, 32, 4),
]
CPU_CANDIDATES = [(4, 8, 16, 4), (2, 16, 16, 4)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one shape, three settings")
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop starting new settings after this")
    ap.add_argument("--ops", default="patch_dpo,patch_weighted_mse")
    ap.add_argument("--out-json", type=Path, default=None)
    ap.add_argument("--out-md", type=Path, default=None)
    ap.add_argument("--allow-cpu", action="store_true", help="without CUDA, run the Triton interpreter (plumbing)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.allow_cpu:
            print("tile_sweep: needs a CUDA device (use --allow-cpu for a plumbing check)", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported (first triton call)
    os.environ.pop("PATCHDPO_FAST_TILE", None)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_common as bc
    import report

    device = bc.select_device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = bc.make_sync(device)
    if cuda:
        shapes = [(8, 64)] if args.quick else [(8, 64), (8, 128), (32, 64), (32, 128)]
        candidates = CANDIDATES[2:5] if args.quick else CANDIDATES
    else:
        shapes, candidates = [(4, 16)], CPU_CANDIDATES
    ops = [op for op in args.ops.split(",") if op]
    stride = 2
    start = time.perf_counter()
    rows: list[dict] = []
    invalid: list[str] = []
    truncated = False

    def measure(step) -> tuple[float, float | None]:
        step()
        sync()
        t0 = time.perf_counter()
        for _ in range(3):
            step()
        sync()
        per_call = (time.perf_counter() - t0) / 3
        if not cuda:
            return per_call, None
        dev_s, _hidden = bc.device_time(step, per_call, reps=5)
        return per_call, dev_s

    for op in ops:
        for n, hw in shapes:
            if time.perf_counter() - start > args.budget_s:
                truncated = True
                break
            case = bc.Case("tiles", op, n, 4, hw, hw, stride if bc.HAS_WEIGHT[op] else None)
            x = bc.make_inputs(case, device, dtype)
            ref_loss = bc.loss_forward(op, "eager", x)()
            (ref_grad,) = torch.autograd.grad(ref_loss, x.pred)
            ref_loss_v = float(ref_loss.detach())
            ref_grad = ref_grad.float()
            settings = [None] + [c for c in candidates if c[2] <= max(16, 1 << (hw - 1).bit_length())]
            for tile in settings:
                if time.perf_counter() - start > args.budget_s:
                    truncated = True
                    break
                label = "default" if tile is None else ",".join(map(str, tile))
                if tile is None:
                    os.environ.pop("PATCHDPO_FAST_TILE", None)
                else:
                    os.environ["PATCHDPO_FAST_TILE"] = label
                try:
                    step = bc.make_step(op, "triton", "fwd_bwd", x)
                    t0 = time.perf_counter()
                    grad = step()
                    sync()
                    compile_s = time.perf_counter() - t0
                    loss_v = float(bc.loss_forward(op, "triton", x)().detach())
                    err = float((grad.float() - ref_grad).abs().max()) / max(float(ref_grad.abs().max()), 1e-30)
                    ok = bc.loss_agrees(loss_v, ref_loss_v) and err <= 2e-2
                    wall_s, dev_s = measure(step) if ok else (None, None)
                except Exception as exc:  # a setting the kernels reject (e.g. too many registers)
                    ok, err, wall_s, dev_s, compile_s = False, math.nan, None, None, math.nan
                    print(f"tile_sweep: {op} {case.shape_str} {label}: {type(exc).__name__}: {exc}", file=sys.stderr)
                if not ok:
                    invalid.append(f"{op} {case.shape_str} {label}")
                rows.append({
                    "op": op, "shape": case.shape_str, "stride": case.stride, "tile": label, "ok": ok,
                    "grad_rel_err": err, "wall_s": wall_s, "device_time_s": dev_s, "first_call_s": compile_s,
                })  # fmt: skip
                print(
                    f"tile_sweep: {op:<19} {case.shape_str:<12} {label:<10} ok={ok} "
                    f"wall={report.fmt_time(wall_s)} gpu={report.fmt_time(dev_s)} first={compile_s:.2f}s",
                    flush=True,
                )
            os.environ.pop("PATCHDPO_FAST_TILE", None)
            bc.release_inputs()

    metric = "device_time_s" if cuda else "wall_s"
    best, by_tile = [], {}
    keys = sorted({(r["op"], r["shape"], r["stride"]) for r in rows})
    for op, shape, stride_ in keys:
        group = [r for r in rows if (r["op"], r["shape"], r["stride"]) == (op, shape, stride_) and r[metric]]
        default = next((r[metric] for r in group if r["tile"] == "default"), None)
        if not group:
            continue
        top = min(group, key=lambda r: r[metric])
        best.append({"op": op, "shape": shape, "stride": stride_, "default_s": default, "best_s": top[metric],
                     "best_tile": top["tile"]})  # fmt: skip
        for r in group:
            if default and r["tile"] != "default":
                by_tile.setdefault(r["tile"], []).append(default / r[metric])
    complete = {t: v for t, v in by_tile.items() if len(v) == len(best)}
    best_uniform = None
    if complete:
        tile, vals = max(complete.items(), key=lambda kv: sum(map(math.log, kv[1])))
        best_uniform = {"tile": tile, "speedup": math.exp(sum(map(math.log, vals)) / len(vals))}
    note = (
        f"Metric: {'GPU time with launch overhead hidden' if cuda else 'wall time'}; ops {', '.join(ops)}; "
        f"stride {stride}; {len(rows)} settings run in {time.perf_counter() - start:.0f} s"
        + ("; STOPPED EARLY at the time budget" if truncated else "")
        + ("" if cuda else "; CPU + Triton interpreter: plumbing check only, the timings mean nothing")
        + "."
    )
    payload = {
        "machine_info": bc.environment_info(device),
        "note": note,
        "truncated": truncated,
        "rows": rows,
        "best": best,
        "best_uniform": best_uniform,
        "invalid": invalid,
    }
    if args.out_json:
        bc.write_json(args.out_json, payload)
    md = "\n".join(report.tiles_section(payload))
    if args.out_md:
        args.out_md.parent.mkdir(parents=True, exist_ok=True)
        args.out_md.write_text(md + "\n")
    print(md)
    print(json.dumps({"best_uniform": best_uniform, "truncated": truncated}))
    return 1 if rows and all(not r["ok"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
