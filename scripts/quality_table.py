"""Markdown rows of docs/quality.md from quality-eval JSON files (scripts/quality_runs.sh writes them).

    .venv/bin/python scripts/quality_table.py runs/quality/minutes-3.val.json runs/quality/grid-3.val.json ...

One row per file: the estimator's training steps and CPU seconds (from its training record), AUROC and AP with
the raw-pixel baseline beside, AUROC on partly covered patches, and the per-family AUROCs; a leave-one-family-out
file gives one row per family and the mean.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FAMILIES = ("smear", "recolor", "missing", "duplicate", "foreign", "resample")


def _training(estimator: str, folder: Path) -> tuple[str, str]:
    """Steps and CPU seconds from the estimator folder, else from training_records.json beside the JSON files."""
    cfg = Path(estimator) / "quality_config.json"
    records = folder / "training_records.json"
    if cfg.is_file():
        rec = json.loads(cfg.read_text()).get("extra", {}).get("training", {})
    elif records.is_file() and Path(estimator).is_relative_to("runs/quality"):
        rec = json.loads(records.read_text()).get(Path(estimator).relative_to("runs/quality").as_posix(), {})
    else:
        return "-", "-"
    if not rec:
        return "-", "-"
    return str(rec.get("step", "-")), f"{rec.get('train_cpu_seconds', float('nan')):.0f}"


def _row(name: str, split: str, res: dict, estimator: str, folder: Path) -> str:
    o, b = res["overall"], res.get("baseline", {}).get("overall", {})
    steps, cpu = _training(estimator, folder)
    partial = res.get("partial", {}).get("auroc", float("nan"))
    fams = [res.get("per_family", {}).get(f, {}).get("auroc", float("nan")) for f in FAMILIES]
    cells = [name, split, steps, cpu, f"{o['auroc']:.3f}", f"{o['ap']:.3f}"]
    cells += [f"{b.get('auroc', float('nan')):.3f}", f"{b.get('ap', float('nan')):.3f}", f"{partial:.3f}"]
    cells += [f"{v:.3f}" for v in fams]
    return "| " + " | ".join(cells) + " |"


def main(paths: list[str]) -> None:
    print(
        "| run | split | steps | CPU s | AUROC | AP | raw-pixel AUROC | raw-pixel AP | partial | "
        + " | ".join(FAMILIES)
        + " |"
    )
    print("|" + "---|" * (9 + len(FAMILIES)))
    for p in paths:
        res = json.loads(Path(p).read_text())
        name = Path(p).name.rsplit(".", 2)[0]
        split = res.get("split") or "-"
        if res.get("mode") == "leave-one-family-out":
            for fam, r in res["per_family"].items():
                print(_row(f"{name}/{fam} (never saw it)", split, r, str(Path(res["estimator"]) / fam), Path(p).parent))
            print(
                f"| {name} mean | {split} | | | {res['mean_auroc']:.3f} | {res['mean_ap']:.3f} | "
                f"{res.get('baseline_mean_auroc', float('nan')):.3f} | "
                f"{res.get('baseline_mean_ap', float('nan')):.3f} |" + " |" * (1 + len(FAMILIES))
            )
        else:
            print(_row(name, split, res, res["estimator"], Path(p).parent))


if __name__ == "__main__":
    main(sys.argv[1:])
