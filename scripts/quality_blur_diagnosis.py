"""Why the quality estimator misses blur-like defects: the diagnostics of docs/quality.md ("Why blur-like defects are
hard"), on the validation split's benchmark pairs (the same pairs quality-eval grades).

    python scripts/quality_blur_diagnosis.py match ESTIMATOR [ESTIMATOR ...]   # best match vs the source patch
    python scripts/quality_blur_diagnosis.py blur ESTIMATOR [ESTIMATOR ...]    # feature change under blur
    python scripts/quality_blur_diagnosis.py sharpness                        # the sharpness statistic alone
    python scripts/quality_blur_diagnosis.py sweep ESTIMATOR --weights 0,0.1,0.3  # sharpness_weight on val

ESTIMATOR: a quality-train folder, ``tiny-trained``, ``tiny`` or ``raw-pixel``. ``--images`` (default
../shared/data/dreambench256), ``--split`` (val). Two torch threads; each command takes well under a minute.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from patchdpo_fast.quality.defects import FAMILIES
from patchdpo_fast.quality.evaluate import _make_benchmark_pairs, grade, load_estimator
from patchdpo_fast.quality.images import DREAMBENCH_SPLITS, load_photos
from patchdpo_fast.quality.metrics import auroc
from patchdpo_fast.quality.sharpness import local_sharpness, sharpness_embedding
from patchdpo_fast.quality.synthetic import gaussian_blur

GRID = (16, 16)


def _pairs(args):
    photos = load_photos([args.images], size=256, subjects=list(DREAMBENCH_SPLITS[args.split]))
    batches = _make_benchmark_pairs(photos, GRID, pairs_per_image=8, seed=0, families=FAMILIES, batch_size=16)
    return photos, batches


def _cat(batches, name):
    return np.concatenate([getattr(p, name).numpy() for _, p in batches])


def _unit_features(est, images):
    return F.normalize(est.features(images).float().flatten(1, 2), dim=-1)


def _source_cells(pairs):
    """Flat index of the reference cell each generated cell came from (rounded), and where it exists."""
    c = pairs.gen_to_ref
    ok = torch.isfinite(c).all(-1)
    rr = torch.nan_to_num(c[..., 0]).round().clamp(0, GRID[0] - 1).long()
    cc = torch.nan_to_num(c[..., 1]).round().clamp(0, GRID[1] - 1).long()
    return rr, cc, ok


def cmd_match(args) -> None:
    """AUROC per family of the best-match similarity (what the estimator reports) and of the similarity to the
    patch's own source cell; how often the best match is the source (within one cell)."""
    _, batches = _pairs(args)
    lab, kind = _cat(batches, "labels"), _cat(batches, "kinds")
    clean = lab == 0
    for spec in args.estimators:
        est = load_estimator(spec)
        if hasattr(est, "sharpness_weight"):
            est.sharpness_weight = 0.0
        best, source, is_source = [], [], []
        for _, p in batches:
            sim = _unit_features(est, p.generated) @ _unit_features(est, p.reference).transpose(1, 2)
            rr, cc, ok = _source_cells(p)
            j = (rr * GRID[1] + cc).view(sim.shape[0], -1)
            s = torch.gather(sim, 2, j[..., None])[..., 0].view(-1, *GRID)
            s[~ok] = float("nan")
            arg = sim.argmax(-1).view(-1, *GRID)
            near = ((arg // GRID[1] - rr).abs() <= 1) & ((arg % GRID[1] - cc).abs() <= 1)
            best.append(sim.amax(-1).view(-1, *GRID).numpy())
            source.append(s.numpy())
            is_source.append(near.numpy())
        mx, src, top = np.concatenate(best), np.concatenate(source), np.concatenate(is_source)
        print(
            f"{spec}: clean patches: best-match median {np.median(mx[clean]):.3f}, source median "
            f"{np.nanmedian(src[clean]):.3f}, best match is the source {top[clean].mean():.2f}"
        )
        print("  family     n    AUROC(best match)  AUROC(source cell)  best match is the source")
        for f in FAMILIES:
            pos = (lab == 1) & (kind == FAMILIES.index(f) + 1)
            m = clean | pos
            ms = m & np.isfinite(src)
            print(
                f"  {f:9s} {int(pos.sum()):4d}   {auroc(-mx[m], pos[m]):.3f}              "
                f"{auroc(-src[ms], pos[ms]):.3f}               {top[pos].mean():.2f}"
            )


def cmd_blur(args) -> None:
    """1 - cos(feature of the blurred image, feature of the photo) at the same cell, on textured cells (finest-band
    energy above the median): the whole image blurred, and only a 96 px square in the middle (cells inside it)."""
    photos = load_photos([args.images], size=256, subjects=list(DREAMBENCH_SPLITS[args.split]))
    x = photos.images.float()
    fine = x - torch.stack([gaussian_blur(im, 1.0, max_radius=255) for im in x])
    energy = F.avg_pool2d(fine.abs().mean(1, keepdim=True), 16)[:, 0]
    textured = energy > energy.median()
    inside = torch.zeros(GRID, dtype=torch.bool)
    inside[5:11, 5:11] = True
    square = torch.zeros(256, 256)
    square[80:176, 80:176] = 1.0
    for spec in args.estimators:
        est = load_estimator(spec)
        if hasattr(est, "sharpness_weight"):
            est.sharpness_weight = 0.0
        f0 = F.normalize(est.features(x).float(), dim=-1)
        row = []
        for sigma in (0.6, 1.0, 1.5, 2.5, 4.0):
            xb = torch.stack([gaussian_blur(im, sigma, max_radius=255) for im in x])
            whole = (F.normalize(est.features(xb).float(), dim=-1) * f0).sum(-1)
            local = (F.normalize(est.features(x * (1 - square) + xb * square).float(), dim=-1) * f0).sum(-1)
            m = inside[None] & textured
            row.append(f"sigma {sigma}: whole {1 - whole[m].mean():.3f} local {1 - local[m].mean():.3f}")
        print(f"{spec}: " + "; ".join(row))


def cmd_sharpness(args) -> None:
    """AUROC per family of the relative local sharpness alone, against the patch's own source cell (known
    correspondence): the drop (-d, blur-like) and its size (|d|), mean over the two bands."""
    _, batches = _pairs(args)
    lab, kind = _cat(batches, "labels"), _cat(batches, "kinds")
    clean = lab == 0
    diffs = []
    for _, p in batches:
        sg, sr = local_sharpness(p.generated, GRID), local_sharpness(p.reference, GRID)
        rr, cc, ok = _source_cells(p)
        j = (rr * GRID[1] + cc).view(len(sg), -1)
        at = torch.gather(sr.flatten(1, 2), 1, j[..., None].expand(-1, -1, sr.shape[-1])).view_as(sg)
        d = (sg - at).mean(-1)
        d[~ok] = float("nan")
        diffs.append(d.numpy())
    d = np.concatenate(diffs)
    fin = np.isfinite(d)
    for name, score in (("drop", -d), ("|difference|", np.abs(d))):
        row = []
        for f in (*FAMILIES, "all"):
            pos = (lab == 1) & ((kind == FAMILIES.index(f) + 1) if f != "all" else True)
            m = (clean | pos) & fin
            row.append(f"{f} {auroc(score[m], pos[m]):.3f}")
        print(f"{name}: " + " ".join(row))


def cmd_sweep(args) -> None:
    """quality-eval's val AUROC / AP / per family for several sharpness weights (features computed once)."""
    photos, batches = _pairs(args)
    subjects = np.array([photos.subjects[j] for idx, _ in batches for j in idx])
    lab, kind, cov = _cat(batches, "labels"), _cat(batches, "kinds"), _cat(batches, "coverage")
    weights = [float(v) for v in args.weights.split(",")]
    for spec in args.estimators:
        est = load_estimator(spec)
        est.sharpness_weight = 0.0
        sims = []
        for _, p in batches:
            feat = _unit_features(est, p.generated) @ _unit_features(est, p.reference).transpose(1, 2)
            sg = sharpness_embedding(local_sharpness(p.generated, GRID)).flatten(1, 2)
            sr = sharpness_embedding(local_sharpness(p.reference, GRID)).flatten(1, 2)
            sims.append((feat, sg @ sr.transpose(1, 2)))
        for lam in weights:
            s = np.concatenate([((1 - lam) * a + lam * b).amax(-1).view(-1, *GRID).numpy() for a, b in sims])
            r = grade(s, s, lab, kind, cov, subjects, FAMILIES)
            fams = " ".join(f"{f} {r['per_family'][f]['auroc']:.3f}" for f in FAMILIES)
            print(
                f"{spec} weight {lam:.2f}: AUROC {r['overall']['auroc']:.3f} AP {r['overall']['ap']:.3f} "
                f"partial {r['partial']['auroc']:.3f} {fams}"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("match", "blur", "sharpness", "sweep"))
    p.add_argument("estimators", nargs="*")
    p.add_argument("--images", default="../shared/data/dreambench256")
    p.add_argument("--split", default="val", choices=("val", "test"))
    p.add_argument("--weights", default="0,0.1,0.2,0.3,0.4,0.5")
    args = p.parse_args()
    torch.set_num_threads(2)
    {"match": cmd_match, "blur": cmd_blur, "sharpness": cmd_sharpness, "sweep": cmd_sweep}[args.command](args)


if __name__ == "__main__":
    main()
