"""Training metrics: JSONL file (always), TensorBoard (when installed), and a progress bar on the main rank."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger"]


class MetricsLogger:
    """Append one JSON object per logged step to ``<output_dir>/metrics.jsonl``.

    On resume the file is cut back to the resumed step, so the log of a resumed run equals an uninterrupted one.
    TensorBoard event files go to ``<output_dir>/tensorboard`` when ``torch.utils.tensorboard`` imports.
    """

    def __init__(self, output_dir: Path, enabled: bool, resume_step: int = 0, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if rec.get("step", 0) <= resume_step:
                    kept.append(line)
            self.path.write_text("".join(f"{line}\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=resume_step + 1)
            except Exception:  # tensorboard not installed
                self._tb = None

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
