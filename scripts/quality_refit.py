"""Change the estimation settings of a trained estimator folder and refit its calibration, keeping its backbone and
its training record (docs/quality.md, "Reference views": how the shipped estimator got its views):

    python scripts/quality_refit.py ESTIMATOR --images DIR [--exclude-subjects a,b] [--reference-scales 1,1.2]
                                    [--reference-crops 3] [--reference-shift 0.5] [--sharpness-weight W] [--seed S]

The calibration anchors are medians of similarities, so a setting that changes the similarities (reference views,
the sharpness weight) needs a new fit on the photos the estimator was trained on; ``quality-train`` does the same
fit at the end of a run. The photos default to the training record's (its ``subjects`` of ``--images``), the seed
to the record's. Only ``quality_config.json`` is rewritten (atomically; the backbone files are not touched), with the
change appended to its ``extra.refits``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from patchdpo_fast.errors import UserError
from patchdpo_fast.quality.estimator import CONFIG_NAME, PatchQualityEstimator
from patchdpo_fast.quality.images import load_photos, parse_subjects
from patchdpo_fast.quality.reference_views import add_view_arguments, views_from_arguments
from patchdpo_fast.utils import atomic_write_json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("estimator", help="estimator folder (quality_config.json + backbone/), rewritten in place")
    p.add_argument("--images", action="append", required=True, help="photo folder (repeatable)")
    p.add_argument("--exclude-subjects", action="append", help="subjects to leave out (default: the record's)")
    p.add_argument("--sharpness-weight", type=float, default=None, help="new sharpness_weight (default: kept)")
    add_view_arguments(p, "the estimator (default: kept)")
    p.add_argument("--seed", type=int, default=None, help="seed of the calibration pairs (default: the record's)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = Path(args.estimator)
    cfg_file = folder / CONFIG_NAME
    if not cfg_file.is_file():
        raise UserError(f"{folder} is not an estimator folder ({CONFIG_NAME} is missing)")
    extra = json.loads(cfg_file.read_text()).get("extra", {})
    record = extra.get("training", {})
    est = PatchQualityEstimator.from_pretrained(folder)
    before = est.config_dict()
    try:
        est.reference_views = views_from_arguments(est.reference_views, args)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.sharpness_weight is not None:
        if not 0.0 <= args.sharpness_weight < 1.0:
            raise UserError(f"--sharpness-weight must be in [0, 1), got {args.sharpness_weight}")
        est.sharpness_weight = args.sharpness_weight
    exclude = parse_subjects(args.exclude_subjects) or record.get("excluded_subjects") or []
    photos = load_photos(args.images, size=int(record.get("settings", {}).get("photo_size", 256)), exclude=exclude)
    if len(photos) < 2:
        raise UserError(f"--images {args.images}: need at least 2 photos, found {len(photos)}")
    seed = args.seed if args.seed is not None else int(record.get("seed", 0))
    t0 = time.perf_counter()
    est.fit_calibration(photos.images, seed=seed, recipe="offgrid")
    after = est.config_dict()
    changed = {k: {"before": before.get(k), "after": after.get(k)} for k in after if before.get(k) != after.get(k)}
    refit = {
        "changed": changed,
        "photos": len(photos),
        "subjects": sorted(set(photos.subjects)),
        "seed": seed,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    extra.setdefault("refits", []).append(refit)
    # only the settings change: quality_config.json is replaced atomically, the backbone files stay as they are
    atomic_write_json(cfg_file, {**est.config_dict(), "extra": extra})
    c = est.calibration
    print(
        f"quality_refit: {folder}: {', '.join(k for k in changed if k != 'calibration') or 'no setting'} changed; "
        f"calibration low {c.low:.4f} high {c.high:.4f} on {len(photos)} photos"
    )
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except UserError as exc:
        print(f"quality_refit: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
