"""Launching the trainer (or a test worker) on 1 or 2 CPU ranks with DeepSpeed over gloo, for the ZeRO tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEEPSPEED_CONFIGS = REPO / "configs" / "deepspeed"


def free_port() -> int:
    """A TCP port nobody listens on now (the rendezvous port of one launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, args: list[str], ranks: int, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``script`` with ``args`` on ``ranks`` processes: one plain process, or DeepSpeed's launcher for more.

    The Triton interpreter is left off (the reference loss backend keeps the subprocesses fast) and each process
    runs one thread (two ranks share the two CI cores). Fails the calling test with the output's tail when the
    launch fails.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    if ranks == 1:
        env["MASTER_PORT"] = str(free_port())
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(free_port()), str(script), *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_trainer(config: Path, overrides: list[str], ranks: int, cwd: Path) -> None:
    """``patchdpo_fast/train.py --config config --set ...`` on ``ranks`` processes."""
    args = ["--config", str(config)] + [a for o in overrides for a in ("--set", o)]
    launch(REPO / "patchdpo_fast" / "train.py", args, ranks, cwd)


def zero3_config(path: Path, **zero: Any) -> Path:
    """configs/deepspeed/zero3.json with ``zero_optimization`` keys replaced, written to ``path``.

    ``stage3_param_persistence_threshold=0`` makes ZeRO-3 release every parameter after use, as it does with the
    large weights of a real UNet (the shipped threshold keeps all of a tiny model's parameters gathered).
    """
    conf = json.loads((DEEPSPEED_CONFIGS / "zero3.json").read_text(encoding="utf-8"))
    conf["zero_optimization"].update(zero)
    path.write_text(json.dumps(conf, indent=2), encoding="utf-8")
    return path
