"""Every Triton kernel compiles for sm_80 and sm_90 without a GPU, and without register spills.

The CPU tests run the kernels in Triton's interpreter, which accepts programs a real compile rejects. This test runs
``patchdpo kernels-report`` in a child process (the interpreter must be off there): the launch helpers are driven on
meta tensors for fp32/bf16/fp16, NCHW and channels_last, the benchmark shapes, a 2B = 8192 batch and an odd shape,
and each distinct specialization goes through ``triton.compile`` and the wheel's ptxas (~40-60 s on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("kernels_report")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out / "triton_cache")
    proc = subprocess.run(
        [sys.executable, "-m", "patchdpo_fast.kernels_report", "--out-json", str(out / "r.json"),
         "--out-md", str(out / "r.md")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    data = json.loads((out / "r.json").read_text()) if (out / "r.json").exists() else {}
    data["_rc"], data["_stderr"], data["_md"] = proc.returncode, proc.stderr, proc.stdout
    return data


def test_every_kernel_compiles_for_sm80_and_sm90(report):
    assert report["_rc"] == 0, report["_stderr"][-3000:] + report["_md"][-3000:]
    results = report["results"]
    errors = [(r["kernel"], r["capability"], r["example"], r["error"]) for r in results if r["error"]]
    assert not errors
    assert report["kernels_not_compiled"] == []
    assert set(report["kernels_defined"]) >= {
        "_patch_loss_fwd_kernel", "_patch_loss_epilogue_kernel", "_block_sum_kernel", "_patch_loss_bwd_kernel",
        "_scale_kernel", "_patch_match_kernel",
    }  # fmt: skip
    for kernel in report["kernels_defined"]:
        assert {r["capability"] for r in results if r["kernel"] == kernel} == {80, 90}, kernel


def test_no_register_spills(report):
    spills = [
        (r["kernel"], r["capability"], r["example"], r["spill_stores"], r["spill_loads"])
        for r in results_of(report)
        if r["spill_stores"] or r["spill_loads"]
    ]
    assert not spills
    assert all(0 < r["registers"] <= 255 for r in results_of(report))


def test_report_covers_dtypes_layouts_and_paths(report):
    results = results_of(report)
    fwd = [r for r in results if r["kernel"] == "_patch_loss_fwd_kernel"]
    for dtype in ("fp32", "bf16", "fp16"):
        assert any(f"pred_ptr=*{dtype}" in r["signature"] for r in fwd), dtype
    for switch in ("LAYOUT=0", "LAYOUT=1", "WRITE_GRAD=True", "HAS_REF=True", "HAS_WEIGHT=True"):
        assert any(switch in r["constexprs"] for r in fwd), switch
    epilogue = [r["constexprs"] for r in results if r["kernel"] == "_patch_loss_epilogue_kernel"]
    # the 2B = 8192 batch takes several epilogue programs (per-program registers do not grow with N)
    assert any("SINGLE=False" in c and "IS_DPO=True" in c for c in epilogue)
    assert any("8192x" in r["example"] for r in results if r["kernel"] == "_patch_loss_epilogue_kernel")
    assert "| kernel | variant | arch |" in report["_md"]


def results_of(report: dict) -> list[dict]:
    assert report["_rc"] == 0, report["_stderr"][-3000:]
    return report["results"]
