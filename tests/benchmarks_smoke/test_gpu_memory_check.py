"""benchmarks/gpu_memory_check.py cannot rot between GPU sessions: its dry run (the tiny model on the CPU) builds
each mode's models as the plan does, runs one real optimizer step and compares the tensors with the plan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_memory_check_dry_run(tmp_path):
    out = tmp_path / "memory.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_memory_check.py"), "--dry-run", "--cases", "0,1,2",
         "--out-json", str(out), "--out-md", str(tmp_path / "memory.md")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [c["case"].split(" · ")[0] for c in result["cases"]] == ["ip_adapter", "unet_lora", "unet"]
    for case in result["cases"]:
        plan, real = case["plan"]["bytes"], case["measured"]
        for key in ("weights", "gradients", "optimizer", "reference"):
            assert abs(plan[key] - real[key]) <= 0.10 * max(real[key], 1), (case["case"], key, plan[key], real[key])
    assert "| unet · diffusion_dpo · adamw · ckpt |" in (tmp_path / "memory.md").read_text()
