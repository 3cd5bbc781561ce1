"""``benchmarks/run_gpu.sh --dry-run`` runs every stage at tiny size on the CPU and writes what the reports read.

The GPU script is only ever run on a lent GPU machine, where a broken stage costs a session's device time. The dry
run takes the same code paths — training-step benchmark, loss benchmarks (Triton under its interpreter, eager,
one torch.compile), matching benchmark, tile sweep and the report generators — at tiny sizes, writing into the
results folder (here a temporary ``RESULTS_DIR``) that the report generators then read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_run_gpu_dry_run(tmp_path):
    results = tmp_path / "results"
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env.update(RESULTS_DIR=str(results), OUT=str(out), PYTHON=sys.executable, TMPDIR=str(tmp_path),
               CUDA_VISIBLE_DEVICES="", TRITON_CACHE_DIR=str(tmp_path / "triton"))  # fmt: skip
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "run_gpu.sh"), "--dry-run"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "dry run" in log

    (loss_json,) = results.glob("cpu_*_dryrun.json")
    (loss_md,) = results.glob("cpu_*_dryrun.md")
    (train_json,) = results.glob("train_cpu_*_dryrun.json")
    (train_md,) = results.glob("train_cpu_*_dryrun.md")
    (match_json,) = results.glob("match_*_dryrun.json")
    (tiles_json,) = results.glob("tiles_*_dryrun.json")
    copied = {p.name for p in out.iterdir()}
    assert {loss_json.name, loss_md.name, train_json.name, match_json.name, "run_bench.log"} <= copied

    records = [b["extra_info"] for b in json.loads(loss_json.read_text())["benchmarks"]]
    losses = [r for r in records if r.get("kind") == "loss"]
    seen = {(r["op"], r["impl"], r["pass"]) for r in losses}
    for op in ("patch_weighted_mse", "diffusion_dpo", "patch_dpo"):
        for impl in ("triton", "eager"):
            assert {(op, impl, "fwd"), (op, impl, "fwd_bwd")} <= seen, (op, impl)
    assert ("patch_weighted_mse", "compiled", "fwd_bwd") in seen
    for r in losses:  # every implementation's own bytes, next to the ideal
        assert r["loss_ok"] and r["ideal_bytes"] > 0
        assert r["bytes_moved"] and r["bytes_moved"] >= r["ideal_bytes"] * 0.99, r
        assert r["gbps"] == pytest.approx(r["bytes_moved"] / r["median_s"] / 1e9)
    mse_triton = next(r for r in losses if (r["op"], r["impl"], r["pass"]) == ("patch_weighted_mse", "triton",
                                                                                 "fwd_bwd"))  # fmt: skip
    assert mse_triton["bytes_ratio"] < 1.1  # the one-pass kernel: ideal bytes plus partial sums

    md = loss_md.read_text()
    assert "Dry run" in md and "MiB moved t / e / c" in md and "dry run" in md
    train = json.loads(train_json.read_text())
    assert train["recipes"] and all(r.get("status") not in ("error", "oom") for r in train["recipes"]), train
    assert "official" in train_md.read_text()
    match = [b["extra_info"] for b in json.loads(match_json.read_text())["benchmarks"]]
    assert {m["impl"] for m in match} == {"triton", "eager"}
    tiles = json.loads(tiles_json.read_text())
    assert tiles.get("rows") and not tiles.get("invalid"), tiles
