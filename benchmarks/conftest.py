"""pytest setup of the loss benchmarks.

* Options: ``--bench-quick`` (or ``PATCHDPO_BENCH_QUICK=1``): one small shape, to check the plumbing;
  ``--bench-device auto|cuda|cpu``; ``--bench-budget-s S``: skip the remaining cases once S seconds have passed
  (so a time-limited run still ends normally and writes its JSON); ``--bench-jsonl PATH``: also append every
  result to a JSON-lines file as soon as it is measured (survives a killed run).
* The ``bench`` fixture is pytest-benchmark's ``benchmark`` when that plugin is active, or a small stand-in
  with the same ``pedantic`` / ``extra_info`` / ``group`` / ``stats`` surface when it is not, so the suite also
  runs on a machine without pytest-benchmark (results then come only from the JSON-lines file).
* Importing ``bench_common`` makes ``patchdpo_fast`` importable from this checkout without installing it.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import bench_common as bc
import pytest
import torch

_STATE: dict[str, object] = {"start": time.perf_counter()}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("patchdpo-bench", "patchdpo_fast loss benchmarks")
    group.addoption(
        "--bench-quick",
        action="store_true",
        default=os.environ.get("PATCHDPO_BENCH_QUICK", "0") == "1",
        help="one small shape per op (plumbing check); also PATCHDPO_BENCH_QUICK=1",
    )
    group.addoption("--bench-device", default="auto", choices=("auto", "cuda", "cpu"))
    group.addoption("--bench-budget-s", type=float, default=None, help="skip cases that start after S seconds")
    group.addoption("--bench-jsonl", default=None, help="append each result to this JSON-lines file")
    group.addoption(
        "--bench-compile",
        default=os.environ.get("PATCHDPO_BENCH_COMPILE", "dynamic"),
        choices=("dynamic", "static"),
        help="torch.compile of the reference: one dynamic-shape compile per op (default, few compiles) or one "
        "static compile per shape (stronger baseline, ~2 compiles per case); also PATCHDPO_BENCH_COMPILE",
    )


def pytest_configure(config: pytest.Config) -> None:
    device = bc.select_device(config.getoption("--bench-device"))
    _STATE["device"] = device
    _STATE["quick"] = bool(config.getoption("--bench-quick"))
    _STATE["plugin"] = config.pluginmanager.has_plugin("benchmark")
    bc.COMPILE_SETTINGS["dynamic"] = config.getoption("--bench-compile") == "dynamic"
    if device.type == "cpu":
        # One intra-op thread by default: on a small shared VM, Inductor's OpenMP kernels with 2+ threads were seen
        # to stall ~30 ms per call (spin-waiting OpenMP workers contending for the cores; GOMP_SPINCOUNT=0 also
        # avoids it), which would measure the VM, not the code. Override with PATCHDPO_BENCH_CPU_THREADS.
        torch.set_num_threads(max(1, int(os.environ.get("PATCHDPO_BENCH_CPU_THREADS", "1"))))
    _STATE["env"] = bc.environment_info(device)
    jsonl = config.getoption("--bench-jsonl")
    if jsonl:
        path = Path(jsonl)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")  # a fresh file per run
        _STATE["jsonl"] = path
        _append({"type": "machine_info", "machine_info": session_info()})


def session_info() -> dict[str, object]:
    info = dict(_STATE["env"])  # type: ignore[arg-type]
    info.update(
        quick=_STATE["quick"],
        pytest_benchmark=_STATE["plugin"],
        triton_skip_reason=None if _STATE["device"].type == "cuda" or bc.DRY_RUN else bc.TRITON_CPU_SKIP,  # type: ignore[union-attr]
        dry_run=bc.DRY_RUN,
        compile_counters=bc.compile_counters(),
        budget_skipped=_STATE.get("budget_skipped", 0),
        session_s=round(time.perf_counter() - _STATE["start"], 1),  # type: ignore[operator]
    )
    return info


def _append(record: dict[str, object]) -> None:
    path = _STATE.get("jsonl")
    if path is not None:
        with open(path, "a") as fh:  # type: ignore[arg-type]
            fh.write(json.dumps(record, default=str) + "\n")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "spec" not in metafunc.fixturenames:
        return
    device: torch.device = _STATE["device"]  # type: ignore[assignment]
    triton_skip = None
    if bc.DRY_RUN:  # plumbing check: the fused path runs in Triton's CPU interpreter
        from patchdpo_fast.ops.dispatch import triton_status

        importable, interpret, why = triton_status()
        triton_skip = None if importable and (interpret or device.type == "cuda") else (why or bc.TRITON_CPU_SKIP)
    elif device.type != "cuda":
        triton_skip = bc.TRITON_CPU_SKIP
    else:
        from patchdpo_fast.ops.dispatch import triton_status

        importable, _, why = triton_status()
        triton_skip = None if importable else why
    params = []
    for spec in bc.build_specs(device.type, bool(_STATE["quick"])):
        marks = [pytest.mark.skip(reason=triton_skip)] if spec[2] == "triton" and triton_skip else []
        params.append(pytest.param(spec, id=bc.spec_id(spec), marks=marks))
    metafunc.parametrize("spec", params)


@pytest.fixture(scope="session")
def bench_env() -> SimpleNamespace:
    device: torch.device = _STATE["device"]  # type: ignore[assignment]
    return SimpleNamespace(
        device=device,
        dtype=bc.bench_dtype(device),
        quick=_STATE["quick"],
        plan=bc.timing_plan(device, bool(_STATE["quick"])),
        sync=bc.make_sync(device),
        timer=bc.cuda_sync_timer if device.type == "cuda" else time.perf_counter,
    )


class MiniBenchmark:
    """Stand-in for pytest-benchmark's fixture: ``pedantic`` with rounds/iterations/warm-up and a timer."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.group: str | None = None
        self.extra_info: dict[str, object] = {}
        self.stats: SimpleNamespace | None = None
        self._timer = time.perf_counter

    def pedantic(self, target, args=(), kwargs=None, rounds=1, warmup_rounds=0, iterations=1):
        kwargs = kwargs or {}
        for _ in range(warmup_rounds * iterations):
            target(*args, **kwargs)
        durations = []
        for _ in range(rounds):
            t0 = self._timer()
            for _ in range(iterations):
                target(*args, **kwargs)
            durations.append((self._timer() - t0) / iterations)
        s = sorted(durations)
        stats = {
            "min": s[0],
            "max": s[-1],
            "mean": statistics.fmean(s),
            "stddev": statistics.stdev(s) if len(s) > 1 else 0.0,
            "median": statistics.median(s),
            "rounds": rounds,
            "iterations": iterations,
        }
        self.stats = SimpleNamespace(stats=SimpleNamespace(**stats), iterations=iterations)
        return target(*args, **kwargs)


@pytest.fixture
def bench(request: pytest.FixtureRequest):
    budget = request.config.getoption("--bench-budget-s")
    elapsed = time.perf_counter() - _STATE["start"]  # type: ignore[operator]
    if budget is not None and elapsed > budget:
        _STATE["budget_skipped"] = int(_STATE.get("budget_skipped", 0)) + 1  # type: ignore[call-overload]
        pytest.skip(f"benchmark time budget exhausted ({elapsed:.0f} s > --bench-budget-s {budget:.0f})")
    b = request.getfixturevalue("benchmark") if _STATE["plugin"] else MiniBenchmark(request.node.name)
    yield b
    stats = getattr(b, "stats", None)
    if stats is None or not b.extra_info:
        return
    s = stats.stats
    _append(
        {
            "type": "benchmark",
            "name": request.node.name,
            "fullname": request.node.nodeid,
            "group": b.group,
            "extra_info": b.extra_info,
            "stats": {
                k: getattr(s, k, None) for k in ("min", "max", "mean", "stddev", "median", "rounds", "iterations")
            }
            | {"iterations": getattr(stats, "iterations", None)},
        }
    )


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["patchdpo_bench"] = session_info()


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config: pytest.Config, benchmarks: list, output_json: dict) -> None:
    output_json["patchdpo_bench"] = session_info()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _append({"type": "session_end", "exitstatus": int(exitstatus), "session_info": session_info()})
