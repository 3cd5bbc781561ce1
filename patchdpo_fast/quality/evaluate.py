"""``patchdpo quality-eval``: corruption-localization benchmark of a patch quality estimator on real photos.

Protocol (fixed; see docs/quality.md):

1. Photos of the evaluated subjects (default for ``dreambench256``: the 8 held-out subjects of
   :data:`~.images.DREAMBENCH_EVAL_SUBJECTS`), loaded at 256 x 256.
2. For every photo, ``--pairs`` "generated" versions: a global change so that matching is not trivial (horizontal
   flip with p = 0.5, zoom 1-1.4x, rotation within +-5 degrees, brightness/contrast/saturation +-15 %, hue +-10
   degrees) followed by 1-3 rectangles of 1-4 x 1-4 patch-grid cells corrupted with a random kind (paste from a
   photo of another subject, blur, recolour, shuffle). The reference is the original photo. Pairs are drawn from a
   fixed seed, so every estimator sees the same pairs when its patch grid is the same.
3. The estimator's generated-side similarity (before calibration; ranking is what is measured) scores each
   generated patch; "low quality" is the score ``-similarity``. The positives are the corrupted patches; cells of
   a corruption rectangle whose pixels barely changed are left out.
4. Reported: AUROC and average precision over all patches (overall), per subject, per corruption kind (that kind
   against all clean patches), the mean of the per-subject AUROCs, and the same AUROC for the calibrated map.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchdpo_fast.errors import UserError
from patchdpo_fast.quality.estimator import PatchQualityEstimator
from patchdpo_fast.quality.images import (
    DREAMBENCH_EVAL_SUBJECTS,
    PhotoSet,
    load_photos,
    parse_subjects,
    read_split_file,
)
from patchdpo_fast.quality.metrics import auroc, average_precision
from patchdpo_fast.quality.synthetic import ALL_KINDS, TRAIN_KINDS, Corruptions, make_pairs
from patchdpo_fast.utils import resolve_device

__all__ = ["evaluate_estimator", "load_estimator", "main"]


def load_estimator(spec: str, *, device: str | torch.device = "cpu", seed: int = 0) -> PatchQualityEstimator:
    """``"tiny"`` (the untrained tiny ViT of ``seed``), ``"tiny-trained"`` (the shipped trained one) or a folder for
    :meth:`PatchQualityEstimator.from_pretrained`."""
    if spec == "tiny":
        return PatchQualityEstimator.tiny(seed=seed).to(device)
    if spec == "tiny-trained":
        return PatchQualityEstimator.tiny_trained(device=device)
    return PatchQualityEstimator.from_pretrained(spec, device=device)


def _donor_indices(subjects: list[str], g: torch.Generator) -> list[int]:
    """For every photo, a photo of another subject (any other photo if there is a single subject)."""
    n = len(subjects)
    out = []
    for i in range(n):
        cands = [j for j in range(n) if subjects[j] != subjects[i]] or [j for j in range(n) if j != i] or [i]
        out.append(cands[int(torch.randint(len(cands), (1,), generator=g))])
    return out


def _scores(scores: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    return {
        "auroc": auroc(scores, labels),
        "ap": average_precision(scores, labels),
        "patches": int(labels.size),
        "corrupted": int(labels.sum()),
    }


def evaluate_estimator(
    estimator: PatchQualityEstimator,
    photos: PhotoSet,
    *,
    pairs_per_image: int = 4,
    seed: int = 0,
    kinds: Sequence[str] = TRAIN_KINDS,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Run the benchmark (module docstring) and return the metrics as a JSON-serializable dict."""
    g = torch.Generator().manual_seed(seed)
    corruptions = Corruptions(kinds=tuple(kinds))
    n = len(photos)
    sims, quals, labels, kind_codes, subj = [], [], [], [], []
    t0 = time.perf_counter()
    for _ in range(pairs_per_image):
        donors = _donor_indices(photos.subjects, g)
        for i in range(0, n, batch_size):
            idx = list(range(i, min(n, i + batch_size)))
            pairs = make_pairs(
                photos.images[idx], estimator.grid_size, g, donors=photos.images[[donors[j] for j in idx]],
                corruptions=corruptions,
            )  # fmt: skip
            maps = estimator.estimate(pairs.reference, pairs.generated)
            sims.append(maps.generated_similarity.float().cpu().numpy())
            quals.append(maps.generated.float().cpu().numpy())
            labels.append(pairs.labels.numpy())
            kind_codes.append(pairs.kinds.numpy())
            subj += [photos.subjects[j] for j in idx]
    seconds = time.perf_counter() - t0
    sim = np.concatenate(sims)
    qual = np.concatenate(quals)
    lab = np.concatenate(labels)
    kind = np.concatenate(kind_codes)
    subjects = np.array(subj)

    keep = lab >= 0
    score = -sim  # low similarity = low quality = positive
    overall = _scores(score[keep], lab[keep] == 1)
    per_subject = {}
    for s in sorted(set(subj)):
        m = keep & (subjects == s)[:, None, None]
        per_subject[s] = _scores(score[m], lab[m] == 1)
    per_kind = {}
    clean = keep & (lab == 0)
    for name in kinds:
        code = ALL_KINDS.index(name) + 1
        m = clean | ((lab == 1) & (kind == code))
        per_kind[name] = _scores(score[m], lab[m] == 1)
    subject_aurocs = [v["auroc"] for v in per_subject.values() if np.isfinite(v["auroc"])]
    cal = estimator.calibration
    return {
        "overall": overall,
        "mean_subject_auroc": float(np.mean(subject_aurocs)) if subject_aurocs else float("nan"),
        "per_subject": per_subject,
        "per_kind": per_kind,
        "calibrated": {
            "auroc": auroc(-qual[keep], lab[keep] == 1),
            "ap": average_precision(-qual[keep], lab[keep] == 1),
            "mean_quality_clean": float(qual[clean].mean()) if clean.any() else float("nan"),
            "mean_quality_corrupted": float(qual[lab == 1].mean()) if (lab == 1).any() else float("nan"),
            "calibration": {"low": cal.low, "high": cal.high},
        },
        "similarity": {
            "clean_median": float(np.median(sim[clean])) if clean.any() else float("nan"),
            "corrupted_median": float(np.median(sim[lab == 1])) if (lab == 1).any() else float("nan"),
        },
        "pairs": int(sim.shape[0]),
        "ignored_patches": int((lab < 0).sum()),
        "grid": list(estimator.grid_size),
        "estimate_seconds": round(seconds, 2),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="patchdpo quality-eval",
        description="Corruption-localization benchmark: AUROC / AP of low patch quality against known corrupted "
        "patches on held-out photos.",
    )
    p.add_argument("--images", action="append", required=True, help="photo folder (repeatable)")
    p.add_argument(
        "--estimator",
        default="tiny",
        help="'tiny' (untrained tiny ViT), 'tiny-trained' (shipped) or an estimator/backbone folder",
    )
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--subjects", action="append", help="comma-separated subjects to evaluate (repeatable)")
    sel.add_argument("--split-file", help="JSON {'train': [...], 'eval': [...]} or a text file of eval subjects")
    p.add_argument(
        "--all-subjects",
        action="store_true",
        help="evaluate every subject found (default for dreambench256: only the held-out DREAMBENCH_EVAL_SUBJECTS)",
    )
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--pairs", type=int, default=4, help="generated versions per photo (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pairs (default 0)")
    p.add_argument("--tiny-seed", type=int, default=0, help="seed of the untrained tiny backbone (default 0)")
    p.add_argument("--kinds", default=",".join(TRAIN_KINDS), help=f"corruption kinds from {', '.join(ALL_KINDS)}")
    p.add_argument("--image-size", type=int, default=256, help="photos are centre-cropped and resized to this")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto", help="matching backend")
    p.add_argument("--no-flip-invariant", action="store_true", help="plain (not flip-symmetrized) features")
    return p


def _select_subjects(args: argparse.Namespace) -> list[str] | None:
    if args.split_file:
        return read_split_file(args.split_file, "eval")
    subjects = parse_subjects(args.subjects)
    if subjects is not None or args.all_subjects:
        return subjects
    # the dreambench256 layout: evaluate the held-out half of the fixed split
    roots = [Path(r) for r in args.images]
    if all(all((r / s).is_dir() for s in DREAMBENCH_EVAL_SUBJECTS) for r in roots):
        return list(DREAMBENCH_EVAL_SUBJECTS)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    kinds = parse_subjects(args.kinds) or list(TRAIN_KINDS)
    bad = [k for k in kinds if k not in ALL_KINDS]
    if bad:
        raise UserError(f"unknown --kinds {', '.join(bad)}; choose from {', '.join(ALL_KINDS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    subjects = _select_subjects(args)
    photos = load_photos(args.images, size=args.image_size, subjects=subjects)
    est = load_estimator(args.estimator, device=resolve_device(args.device), seed=args.tiny_seed)
    est.backend = args.backend
    if args.no_flip_invariant:
        est.flip_invariant = False
    t0 = time.perf_counter()
    result = evaluate_estimator(
        est, photos, pairs_per_image=args.pairs, seed=args.seed, kinds=kinds, batch_size=args.batch_size
    )
    result = {
        "estimator": args.estimator,
        "estimator_settings": {k: v for k, v in est.config_dict().items() if k not in ("format", "version")},
        "images": [str(r) for r in args.images],
        "subjects": sorted(set(photos.subjects)),
        "photos": len(photos),
        "protocol": {"pairs_per_image": args.pairs, "seed": args.seed, "kinds": kinds, "image_size": args.image_size},
        **result,
        "seconds": round(time.perf_counter() - t0, 2),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    o = result["overall"]
    print(
        f"quality-eval: {args.estimator}: AUROC {o['auroc']:.4f}  AP {o['ap']:.4f}  "
        f"(mean per-subject AUROC {result['mean_subject_auroc']:.4f}; {o['patches']} patches, "
        f"{o['corrupted']} corrupted, {result['pairs']} pairs of {len(result['subjects'])} subjects) -> {out}"
    )
    return 0


if __name__ == "__main__":
    from patchdpo_fast.cli import run_command

    raise SystemExit(run_command("quality-eval", main))
