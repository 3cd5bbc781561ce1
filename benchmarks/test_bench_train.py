"""Training-step benchmark: this library's PatchDPO recipe vs the official recipe, side by side in one run.

As a script (what ``benchmarks/run_gpu.sh`` runs)::

    python benchmarks/test_bench_train.py [--device auto|cuda|cpu] [--scale auto|sdxl|tiny] [--quick]
        [--recipes official,ours,...] [--warmup N] [--steps N] [--pairs N] [--budget-s S]
        [--out-json PATH] [--out-md PATH]

CUDA: SDXL-shaped random-init models at 512 px, 4 pairs per step; CPU: the tiny model. Writes
``benchmarks/results/train_<gpu|cpu>_<device-slug>_<date>[_quick].{json,md}`` by default, prints the markdown and
exits 1 if a recipe failed (a missing bitsandbytes or the time budget only skips recipes). See
``benchmarks/train_recipes.py`` for what each recipe does and ``benchmarks/README.md`` for how to read the report.

With pytest (``pytest benchmarks/test_bench_train.py [--bench-device cpu] [--bench-quick]``), one test runs the
whole comparison and writes its files to ``$PATCHDPO_TRAIN_BENCH_DIR`` or a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import bench_common as bc
import torch
import train_recipes as tr
import train_report


def _select_device(choice: str) -> torch.device:
    return bc.select_device(choice)


def run_and_write(
    device: torch.device,
    out_json: Path,
    out_md: Path,
    **kwargs,
) -> dict:
    """Run the benchmark, keep the JSON up to date while it runs, write the markdown at the end."""
    try:
        result = tr.run_benchmark(device, out_json=out_json, **kwargs)
    except Exception as exc:  # build failure: still leave a JSON and a report saying what happened
        import traceback

        result = {"kind": "train_bench", "error": f"{type(exc).__name__}: {exc}", "recipes": [],
                  "traceback": traceback.format_exc(limit=10), "machine": bc.environment_info(device),
                  "plan": {"scale": kwargs.get("scale")}}  # fmt: skip
        if out_json.exists():  # keep what was measured before the failure
            import json

            partial = json.loads(out_json.read_text())
            partial.update(error=result["error"], traceback=result["traceback"])
            result = partial
        bc.write_json(out_json, result)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(train_report.render(result))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--scale", default="auto", choices=("auto", "sdxl", "tiny"))
    ap.add_argument("--quick", action="store_true", help="fewer steps per recipe (plumbing check)")
    ap.add_argument("--recipes", default=None, help=f"comma-separated subset of {','.join(tr.RECIPE_NAMES)}")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per recipe")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per recipe")
    ap.add_argument("--pairs", type=int, default=None, help="pairs per step (default 4 = 8 images)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new recipe after S seconds")
    ap.add_argument("--loss-backend", default="auto", choices=("auto", "triton", "torch"))
    ap.add_argument("--out-json", type=Path, default=None)
    ap.add_argument("--out-md", type=Path, default=None)
    args = ap.parse_args(argv)

    device = _select_device(args.device)
    stem = tr.default_stem(device, args.quick)
    out_json = args.out_json or bc.RESULTS_DIR / f"{stem}.json"
    out_md = args.out_md or out_json.with_suffix(".md")
    result = run_and_write(
        device,
        out_json,
        out_md,
        scale=args.scale,
        quick=args.quick,
        recipes=args.recipes.split(",") if args.recipes else None,
        warmup=args.warmup,
        steps=args.steps,
        pairs=args.pairs,
        budget_s=args.budget_s,
        loss_backend=args.loss_backend,
    )
    print()
    print(out_md.read_text())
    print(f"train bench: wrote {out_json} and {out_md}")
    bad = tr.failed(result)
    if result.get("error"):
        print(f"train bench: FAILED: {result['error']}", file=sys.stderr)
        return 1
    if bad:
        print(f"train bench: recipes failed: {', '.join(bad)}", file=sys.stderr)
        return 1
    if not any(r.get("status") == "ok" for r in result["recipes"]):
        print("train bench: no recipe was measured (see the skip reasons)", file=sys.stderr)
        return 1
    return 0


def test_train_step_benchmark(request, tmp_path) -> None:
    """The whole side-by-side comparison as one pytest case (device and quick mode from the conftest options)."""
    device = _select_device(request.config.getoption("--bench-device"))
    quick = bool(request.config.getoption("--bench-quick"))
    folder = Path(os.environ.get("PATCHDPO_TRAIN_BENCH_DIR") or tmp_path)
    stem = tr.default_stem(device, quick)
    result = run_and_write(device, folder / f"{stem}.json", folder / f"{stem}.md", quick=quick)
    assert not result.get("error"), result.get("error")
    assert not tr.failed(result), [r.get("error") for r in result["recipes"] if r.get("status") in ("error", "oom")]


if __name__ == "__main__":
    sys.exit(main())
