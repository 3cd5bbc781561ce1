"""``patchdpo quality-eval``: the defect-localization benchmark of a patch quality estimator on real photos.

Default protocol ``offgrid`` (fixed; see docs/quality.md):

1. Photos of one **split** of subjects (``dreambench256``: :data:`~.images.DREAMBENCH_SPLITS`; ``--split val`` is the
   default and where every design choice is made, ``--split test`` is reported once per result), 256 x 256.
2. For every photo, ``--pairs`` "generated" versions from :mod:`.defects` with the *benchmark* recipe (not the
   training one): a global change that is not a defect (flip, crop-rescale, small rotation, brightness / contrast /
   saturation / hue, slight blur, JPEG) and 1-3 regions **not aligned to the patch grid** (rotated rectangles,
   ellipses, irregular blobs of any size, soft edges), each with a defect family (smear, recolor, missing,
   duplicate, foreign, resample). The reference is the original photo. Pairs come from a fixed seed.
3. Every generated patch is scored by ``-similarity`` (low quality = positive). Its label comes from its covered
   fraction: clean (coverage <= 1 %) against **more than half covered** (and visibly changed); the partly covered
   patches in between are left out of AUROC and AP and graded separately (``partial``: clean against patches
   covered 10-50 %).
4. Reported for the estimator **and, beside it, the raw-pixel nearest-patch baseline** (:mod:`.baseline`) on the
   same pairs: AUROC and AP overall, per family (that family's patches against all clean patches), per subject, the
   calibrated map's AUROC and the partial-coverage AUROC.

**Leave-one-family-out** (``--lofo DIR``): ``DIR/<family>/`` holds an estimator trained with
``quality-train --exclude-families <family>``; each is graded on pairs whose defects are all of the family it never
saw (its training record is checked). The per-family AUROCs and their mean are reported, the baseline beside.

Protocol ``grid`` is the first version's benchmark (rectangles of whole patch-grid cells drawn by the training
generator of :mod:`.synthetic`), kept for comparison.
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
from patchdpo_fast.quality.baseline import RawPixelMatcher
from patchdpo_fast.quality.defects import (
    BENCHMARK_CHANGE,
    BENCHMARK_RECIPE,
    FAMILIES,
    make_defect_pairs,
    parse_families,
)
from patchdpo_fast.quality.estimator import CONFIG_NAME, TINY_TRAINED_DIR, PatchQualityEstimator
from patchdpo_fast.quality.images import (
    DREAMBENCH_SPLITS,
    PhotoSet,
    load_photos,
    parse_subjects,
    read_split_file,
)
from patchdpo_fast.quality.metrics import auroc, average_precision
from patchdpo_fast.quality.reference_views import add_view_arguments, views_from_arguments
from patchdpo_fast.quality.synthetic import ALL_KINDS, TRAIN_KINDS, Corruptions, make_pairs
from patchdpo_fast.utils import resolve_device

__all__ = [
    "benchmark",
    "evaluate_estimator",
    "grade",
    "load_estimator",
    "lofo_benchmark",
    "main",
    "training_record",
]

Estimator = Any  # PatchQualityEstimator or RawPixelMatcher: anything with grid_size, calibration and estimate()


def load_estimator(spec: str, *, device: str | torch.device = "cpu", seed: int = 0) -> Estimator:
    """``"tiny"`` (the untrained tiny ViT of ``seed``), ``"tiny-trained"`` (the shipped trained one),
    ``"raw-pixel"`` (the baseline, :class:`~.baseline.RawPixelMatcher`) or a folder for
    :meth:`PatchQualityEstimator.from_pretrained`."""
    if spec == "tiny":
        return PatchQualityEstimator.tiny(seed=seed).to(device)
    if spec == "tiny-trained":
        return PatchQualityEstimator.tiny_trained(device=device)
    if spec == "raw-pixel":
        return RawPixelMatcher()
    return PatchQualityEstimator.from_pretrained(spec, device=device)


def training_record(spec: str) -> dict[str, Any] | None:
    """The ``quality-train`` record stored with an estimator folder (``extra.training``), None if there is none."""
    folder = TINY_TRAINED_DIR if spec == "tiny-trained" else Path(spec)
    cfg = folder / CONFIG_NAME
    if spec in ("tiny", "raw-pixel") or not cfg.is_file():
        return None
    return (json.loads(cfg.read_text()).get("extra") or {}).get("training")


def trained_families(record: dict[str, Any] | None) -> list[str] | None:
    """Defect families an estimator was trained on (from its training record; the first version's grid kinds are
    mapped to the families they belong to). None when unknown."""
    if not record:
        return None
    if record.get("families") is not None:  # off-grid recipe (a grid-recipe record has families None)
        return list(record["families"])
    kinds = (record.get("recipe") or {}).get("kinds")
    if kinds is None and record.get("backbone") is not None:  # first version: fixed grid kinds
        kinds = ["paste", "blur", "recolor", "shuffle"]
    return list(parse_families(kinds)) if kinds else None


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


# ------------------------------------------------------------------------------------------------------ off-grid
def _make_benchmark_pairs(
    photos: PhotoSet, grid: tuple[int, int], *, pairs_per_image: int, seed: int, families: Sequence[str],
    batch_size: int,
) -> list[tuple[list[int], Any]]:  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    recipe = BENCHMARK_RECIPE.only(tuple(families))
    n = len(photos)
    batches = []
    for _ in range(pairs_per_image):
        donors = _donor_indices(photos.subjects, g)
        for i in range(0, n, batch_size):
            idx = list(range(i, min(n, i + batch_size)))
            pairs = make_defect_pairs(
                photos.images[idx], grid, g, donors=photos.images[[donors[j] for j in idx]], recipe=recipe,
                gen_change=BENCHMARK_CHANGE,
            )  # fmt: skip
            batches.append((idx, pairs))
    return batches


def grade(
    similarity: np.ndarray,
    quality: np.ndarray,
    labels: np.ndarray,
    kinds: np.ndarray,
    coverage: np.ndarray,
    subjects: np.ndarray,
    families: Sequence[str] = FAMILIES,
) -> dict[str, Any]:
    """Metrics of one estimator's generated-side ``similarity`` / calibrated ``quality`` ``(N, gh, gw)`` against
    coverage labels (0 clean, 1 more than half covered, -1 left out), family codes and the subject of each pair."""
    keep = labels >= 0
    score = -similarity  # low similarity = low quality = positive
    clean = labels == 0
    out: dict[str, Any] = {"overall": _scores(score[keep], labels[keep] == 1)}
    per_subject = {}
    for s in sorted(set(subjects.tolist())):
        m = keep & (subjects == s)[:, None, None]
        per_subject[s] = _scores(score[m], labels[m] == 1)
    out["per_subject"] = per_subject
    aurocs = [v["auroc"] for v in per_subject.values() if np.isfinite(v["auroc"])]
    out["mean_subject_auroc"] = float(np.mean(aurocs)) if aurocs else float("nan")
    per_family = {}
    for name in families:
        m = clean | ((labels == 1) & (kinds == FAMILIES.index(name) + 1))
        per_family[name] = _scores(score[m], labels[m] == 1)
    out["per_family"] = per_family
    partial = (coverage > 0.1) & (coverage <= 0.5)
    m = clean | partial
    out["partial"] = {**_scores(score[m], partial[m]), "coverage": [0.1, 0.5]}
    out["calibrated"] = {
        "auroc": auroc(-quality[keep], labels[keep] == 1),
        "ap": average_precision(-quality[keep], labels[keep] == 1),
        "mean_quality_clean": float(quality[clean].mean()) if clean.any() else float("nan"),
        "mean_quality_corrupted": float(quality[labels == 1].mean()) if (labels == 1).any() else float("nan"),
    }
    out["similarity"] = {
        "clean_median": float(np.median(similarity[clean])) if clean.any() else float("nan"),
        "corrupted_median": float(np.median(similarity[labels == 1])) if (labels == 1).any() else float("nan"),
    }
    return out


def _run(estimator: Estimator, batches: list, photos: PhotoSet, families: Sequence[str]) -> dict[str, Any]:
    sims, quals, labels, kinds, cover, subj = [], [], [], [], [], []
    t0 = time.process_time()
    for idx, pairs in batches:
        maps = estimator.estimate(pairs.reference, pairs.generated)
        sims.append(maps.generated_similarity.float().cpu().numpy())
        quals.append(maps.generated.float().cpu().numpy())
        labels.append(pairs.labels.numpy())
        kinds.append(pairs.kinds.numpy())
        cover.append(pairs.coverage.numpy())
        subj += [photos.subjects[j] for j in idx]
    cpu = time.process_time() - t0
    result = grade(
        np.concatenate(sims), np.concatenate(quals), np.concatenate(labels), np.concatenate(kinds),
        np.concatenate(cover), np.array(subj), families,
    )  # fmt: skip
    result["estimate_cpu_seconds"] = round(cpu, 2)
    return result


def benchmark(
    estimator: Estimator,
    photos: PhotoSet,
    *,
    pairs_per_image: int = 8,
    seed: int = 0,
    families: Sequence[str] = FAMILIES,
    batch_size: int = 16,
    baseline: bool = True,
) -> dict[str, Any]:
    """The off-grid benchmark (module docstring) of ``estimator``, with the raw-pixel baseline on the same pairs
    under ``"baseline"`` (``baseline=False`` to skip it). Returns a JSON-serializable dict."""
    grid = tuple(estimator.grid_size)
    batches = _make_benchmark_pairs(
        photos, grid, pairs_per_image=pairs_per_image, seed=seed, families=families, batch_size=batch_size
    )
    lab = np.concatenate([p.labels.numpy() for _, p in batches])
    result = _run(estimator, batches, photos, families)
    result.update(
        pairs=int(lab.shape[0]),
        grid=list(grid),
        clean_patches=int((lab == 0).sum()),
        corrupted_patches=int((lab == 1).sum()),
        left_out_patches=int((lab < 0).sum()),
    )
    if baseline:
        raw = RawPixelMatcher(grid, reference_views=getattr(estimator, "reference_views", None))
        result["baseline"] = _run(raw, batches, photos, families)
        result["baseline"]["settings"] = raw.config_dict()
        result["auroc_above_baseline"] = result["overall"]["auroc"] - result["baseline"]["overall"]["auroc"]
    return result


def lofo_benchmark(
    estimators: dict[str, Estimator],
    photos: PhotoSet,
    *,
    pairs_per_image: int = 8,
    seed: int = 0,
    batch_size: int = 16,
    baseline: bool = True,
) -> dict[str, Any]:
    """Leave-one-family-out: ``estimators[family]`` (trained without ``family``) graded on pairs whose defects are
    all of ``family``; the baseline on the same pairs. Pairs of a family depend only on ``seed`` and the family."""
    per_family: dict[str, Any] = {}
    for family, est in estimators.items():
        fam_seed = seed * 1000 + FAMILIES.index(family) + 1
        res = benchmark(
            est, photos, pairs_per_image=pairs_per_image, seed=fam_seed, families=(family,), batch_size=batch_size,
            baseline=baseline,
        )  # fmt: skip
        per_family[family] = res
    aurocs = [r["overall"]["auroc"] for r in per_family.values()]
    out: dict[str, Any] = {
        "per_family": per_family,
        "mean_auroc": float(np.mean(aurocs)),
        "min_auroc": float(np.min(aurocs)),
        "mean_ap": float(np.mean([r["overall"]["ap"] for r in per_family.values()])),
    }
    if baseline:
        out["baseline_mean_auroc"] = float(np.mean([r["baseline"]["overall"]["auroc"] for r in per_family.values()]))
        out["baseline_mean_ap"] = float(np.mean([r["baseline"]["overall"]["ap"] for r in per_family.values()]))
    return out


# ------------------------------------------------------------------------------------------------------ grid (v1)
def evaluate_estimator(
    estimator: Estimator,
    photos: PhotoSet,
    *,
    pairs_per_image: int = 4,
    seed: int = 0,
    kinds: Sequence[str] = TRAIN_KINDS,
    batch_size: int = 16,
    baseline: bool = True,
) -> dict[str, Any]:
    """The first version's grid-aligned benchmark (``--protocol grid``): rectangles of whole cells from
    :mod:`.synthetic`, positives the corrupted cells; the raw-pixel baseline under ``"baseline"``."""
    g = torch.Generator().manual_seed(seed)
    corruptions = Corruptions(kinds=tuple(kinds))
    n = len(photos)
    grid = tuple(estimator.grid_size)
    raw = RawPixelMatcher(grid, reference_views=getattr(estimator, "reference_views", None)) if baseline else None
    sims, quals, raw_sims, labels, kind_codes, subj = [], [], [], [], [], []
    t0 = time.perf_counter()
    for _ in range(pairs_per_image):
        donors = _donor_indices(photos.subjects, g)
        for i in range(0, n, batch_size):
            idx = list(range(i, min(n, i + batch_size)))
            pairs = make_pairs(
                photos.images[idx], grid, g, donors=photos.images[[donors[j] for j in idx]],
                corruptions=corruptions,
            )  # fmt: skip
            maps = estimator.estimate(pairs.reference, pairs.generated)
            sims.append(maps.generated_similarity.float().cpu().numpy())
            quals.append(maps.generated.float().cpu().numpy())
            if raw is not None:
                raw_sims.append(raw.estimate(pairs.reference, pairs.generated).generated_similarity.numpy())
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
    score = -sim
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
    result: dict[str, Any] = {
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
        "grid": list(grid),
        "estimate_seconds": round(seconds, 2),
    }
    if raw is not None:
        rs = -np.concatenate(raw_sims)
        result["baseline"] = {"overall": _scores(rs[keep], lab[keep] == 1)}
        result["auroc_above_baseline"] = overall["auroc"] - result["baseline"]["overall"]["auroc"]
    return result


# ------------------------------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="patchdpo quality-eval",
        description="Defect-localization benchmark: AUROC / AP of low patch quality against known defects on "
        "held-out photos, with the raw-pixel nearest-patch baseline beside every result.",
    )
    p.add_argument("--images", action="append", required=True, help="photo folder (repeatable)")
    p.add_argument(
        "--estimator",
        default="tiny",
        help="'tiny' (untrained tiny ViT), 'tiny-trained' (shipped), 'raw-pixel' or an estimator/backbone folder",
    )
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--subjects", action="append", help="comma-separated subjects to evaluate (repeatable)")
    sel.add_argument(
        "--split-file",
        help="JSON {'train': [...], 'val': [...], 'test': [...]} (the --split list; 'eval' = val + test when "
        "--split is not given) or a text file of subjects",
    )
    sel.add_argument("--all-subjects", action="store_true", help="evaluate every subject found")
    p.add_argument(
        "--split",
        choices=("val", "test", "eval"),
        default=None,
        help="subject split (dreambench256 layout or --split-file; default val: make choices on val, report test once)",
    )
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--protocol", choices=("offgrid", "grid"), default="offgrid", help="benchmark (default offgrid)")
    p.add_argument("--lofo", metavar="DIR", help="leave-one-family-out: DIR/<family>/ estimators (offgrid only)")
    p.add_argument("--pairs", type=int, default=None, help="generated versions per photo (default 8; grid: 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pairs (default 0)")
    p.add_argument("--tiny-seed", type=int, default=0, help="seed of the untrained tiny backbone (default 0)")
    p.add_argument(
        "--kinds",
        "--families",
        dest="kinds",
        default=None,
        help=f"offgrid: defect families from {', '.join(FAMILIES)} (default all); grid: kinds from "
        f"{', '.join(ALL_KINDS)} (default {','.join(TRAIN_KINDS)})",
    )
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the raw-pixel baseline (it matches against the estimator's reference views)",
    )
    p.add_argument("--image-size", type=int, default=256, help="photos are centre-cropped and resized to this")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: min(2, torch's choice))")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto", help="matching backend")
    p.add_argument("--no-flip-invariant", action="store_true", help="plain (not flip-symmetrized) features")
    p.add_argument(
        "--sharpness-weight",
        type=float,
        default=None,
        help="override the estimator's sharpness_weight (0 = backbone features alone; the raw similarities are "
        "graded, so the calibration fitted for another weight does not matter for AUROC / AP)",
    )
    add_view_arguments(p, "the estimator (override; default: its own)")
    return p


def _select_subjects(args: argparse.Namespace) -> tuple[list[str] | None, str | None]:
    """(subjects, split name) from the arguments."""
    if args.split_file:
        key = args.split or "eval"
        return read_split_file(args.split_file, key), key
    subjects = parse_subjects(args.subjects)
    if subjects is not None or args.all_subjects:
        return subjects, None
    # the dreambench256 layout: one split of the fixed subject split
    split = args.split or "val"
    roots = [Path(r) for r in args.images]
    if all(all((r / s).is_dir() for s in DREAMBENCH_SPLITS["eval"]) for r in roots):
        return list(DREAMBENCH_SPLITS[split]), split
    if args.split:
        raise UserError(
            f"--split {args.split}: the folders are not in the dreambench256 layout; pass --split-file or --subjects"
        )
    return None, None


def _setup(est: Estimator, args: argparse.Namespace) -> Estimator:
    if isinstance(est, PatchQualityEstimator):
        est.backend = args.backend
        if args.no_flip_invariant:
            est.flip_invariant = False
        if args.sharpness_weight is not None:
            if not 0.0 <= args.sharpness_weight < 1.0:
                raise UserError(f"--sharpness-weight must be in [0, 1), got {args.sharpness_weight}")
            est.sharpness_weight = float(args.sharpness_weight)
    try:
        est.reference_views = views_from_arguments(est.reference_views, args)  # both estimator kinds have views
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return est


def _settings(est: Estimator) -> dict[str, Any]:
    return {k: v for k, v in est.config_dict().items() if k not in ("format", "version")}


def _fmt(res: dict[str, Any]) -> str:
    o = res["overall"]
    return f"AUROC {o['auroc']:.4f}  AP {o['ap']:.4f}"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.protocol == "grid":
        kinds = parse_subjects(args.kinds) or list(TRAIN_KINDS)
        bad = [k for k in kinds if k not in ALL_KINDS]
        if bad:
            raise UserError(f"unknown --kinds {', '.join(bad)}; choose from {', '.join(ALL_KINDS)}")
    else:
        try:
            kinds = list(parse_families(args.kinds))
        except ValueError as exc:
            raise UserError(f"--kinds: {exc}") from None
    if args.lofo and args.protocol != "offgrid":
        raise UserError("--lofo needs --protocol offgrid")
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads or min(2, torch.get_num_threads()))
    subjects, split = _select_subjects(args)
    photos = load_photos(args.images, size=args.image_size, subjects=subjects)
    pairs = args.pairs or (4 if args.protocol == "grid" else 8)
    t0 = time.perf_counter()
    c0 = time.process_time()
    header: dict[str, Any] = {
        "images": [str(r) for r in args.images],
        "split": split,
        "subjects": sorted(set(photos.subjects)),
        "photos": len(photos),
        "protocol": {
            "name": args.protocol,
            "pairs_per_image": pairs,
            "seed": args.seed,
            "kinds": kinds,
            "image_size": args.image_size,
        },
    }
    if args.lofo:
        root = Path(args.lofo)
        estimators, records = {}, {}
        for family in kinds:
            folder = root / family
            if not folder.is_dir():
                raise UserError(f"--lofo: no estimator for {family!r} ({folder} is missing)")
            seen = trained_families(training_record(str(folder)))
            if seen is None or family in seen:
                why = "has no training record" if seen is None else f"was trained on it (families {seen})"
                raise UserError(f"--lofo: {folder} {why}; it must be trained without {family!r}")
            estimators[family] = _setup(load_estimator(str(folder), device=device), args)
            records[family] = seen
        result = lofo_benchmark(
            estimators, photos, pairs_per_image=pairs, seed=args.seed, batch_size=args.batch_size,
            baseline=not args.no_baseline,
        )  # fmt: skip
        result = {"estimator": str(root), "mode": "leave-one-family-out", **header, **result}
        result["trained_families"] = records
    else:
        est = _setup(load_estimator(args.estimator, device=device, seed=args.tiny_seed), args)
        if args.protocol == "grid":
            res = evaluate_estimator(
                est, photos, pairs_per_image=pairs, seed=args.seed, kinds=kinds, batch_size=args.batch_size,
                baseline=not args.no_baseline,
            )  # fmt: skip
        else:
            res = benchmark(
                est, photos, pairs_per_image=pairs, seed=args.seed, families=kinds, batch_size=args.batch_size,
                baseline=not args.no_baseline,
            )  # fmt: skip
            res["per_kind"] = res["per_family"]
            seen = trained_families(training_record(args.estimator))
            res["trained_families"] = seen
            for name, entry in res["per_family"].items():
                entry["seen_in_training"] = None if seen is None else name in seen
        result = {"estimator": args.estimator, "estimator_settings": _settings(est), **header, **res}
    result.update(
        seconds=round(time.perf_counter() - t0, 2),
        cpu_seconds=round(time.process_time() - c0, 2),
        torch=torch.__version__,
        python=platform.python_version(),
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    where = f"{split} split, " if split else ""
    if args.lofo:
        lines = [f"quality-eval: leave-one-family-out {args.lofo} ({where}{len(photos)} photos)"]
        for family, r in result["per_family"].items():
            base = f"   raw-pixel {_fmt(r['baseline'])}" if "baseline" in r else ""
            lines.append(f"  {family:<10} {_fmt(r)}{base}")
        base = f"   raw-pixel {result['baseline_mean_auroc']:.4f}" if "baseline_mean_auroc" in result else ""
        lines.append(f"  {'mean':<10} AUROC {result['mean_auroc']:.4f}  AP {result['mean_ap']:.4f}{base}")
        print("\n".join(lines) + f"\n-> {out}")
        return 0
    o = result["overall"]
    base = ""
    if "baseline" in result:
        base = f"; raw-pixel baseline {_fmt(result['baseline'])} (+{result['auroc_above_baseline']:.4f} AUROC)"
    print(
        f"quality-eval [{args.protocol}]: {args.estimator}: {_fmt(result)}{base} "
        f"(mean per-subject AUROC {result['mean_subject_auroc']:.4f}; {o['patches']} patches, {o['corrupted']} "
        f"corrupted, {result['pairs']} pairs, {where}{len(result['subjects'])} subjects) -> {out}"
    )
    if args.protocol == "offgrid":
        fams = result["per_family"]
        bfams = result.get("baseline", {}).get("per_family", {})
        cells = [
            f"{k} {v['auroc']:.3f}" + (f"/{bfams[k]['auroc']:.3f}" if k in bfams else "")
            + ("*" if v.get("seen_in_training") is False else "")
            for k, v in fams.items()
        ]  # fmt: skip
        print("  per family (estimator/raw-pixel; * = never seen in training): " + ", ".join(cells))
    return 0


if __name__ == "__main__":
    from patchdpo_fast.cli import run_command

    raise SystemExit(run_command("quality-eval", main))
