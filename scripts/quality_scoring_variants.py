"""Can the scoring of a trained backbone do better than the plain nearest-patch maximum? Variants of how the
generated-side similarity is computed, graded on the validation split's benchmark pairs (the pairs quality-eval
grades), each on the same trained backbone (docs/quality.md, "What the scoring cannot add"):

    python scripts/quality_scoring_variants.py ESTIMATOR [ESTIMATOR ...] [--images DIR] [--split val]

* ``base``: the estimator as it is (nearest-patch maximum of the joined feature, sharpness weight 0.3);
* ``neighbours mu=M r=R``: spatial verification. A generated patch ``i`` with best reference match ``j`` also asks
  whether its 8 neighbours ``i + o`` find a good match at ``j + o`` (the best similarity within ``R`` cells of it);
  the score is ``(1 - M) * s_i + M * mean_o s(i + o, j + o)``. A duplicated or misplaced part matches well on its
  own but its neighbourhood does not follow;
* ``image-norm a=A stat``: each generated image's similarities minus ``A`` times their median (or 90 % quantile),
  so a pair whose whole image changed more (a stronger global change) does not push all its clean patches down;
* ``layer L w=W``: the normalized tokens of hidden layer ``L`` joined to the final ones (weights ``W : 1``) before
  the sharpness channel;
* ``sharpness ...``: the sharpness channel with other settings (quantile of the image's reference level, clamp,
  bands);
* ``views ...``: the estimator itself with other reference views (:mod:`patchdpo_fast.quality.reference_views`:
  half-patch shifts, scaled-up windows, a scaled-down view); ``--only views`` grades just these
  (docs/quality.md, "Reference views").

Every variant scores the same pairs; two torch threads; about ten seconds per variant and backbone (a minute or two
for a ``views`` variant: the backbone sees every view of every reference).
"""

from __future__ import annotations

import argparse
import functools
import math
import types

import numpy as np
import torch
import torch.nn.functional as F

import patchdpo_fast.quality.estimator as estimator_module
import patchdpo_fast.quality.sharpness as sharpness_module
from patchdpo_fast.quality.backbone import patch_tokens
from patchdpo_fast.quality.defects import FAMILIES
from patchdpo_fast.quality.evaluate import _make_benchmark_pairs, grade, load_estimator
from patchdpo_fast.quality.images import DREAMBENCH_SPLITS, load_photos
from patchdpo_fast.quality.reference_views import ReferenceViews
from patchdpo_fast.quality.sharpness import local_sharpness, sharpness_embedding

GRID = (16, 16)
OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def neighbour_scores(sim: torch.Tensor, grid: tuple[int, int], mu: float, radius: int) -> torch.Tensor:
    """``(B, N)`` scores from the full ``(B, N_gen, N_ref)`` similarity matrix (module docstring, ``neighbours``)."""
    b, n, _ = sim.shape
    h, w = grid
    best, j = sim.max(-1)
    jy, jx = (j // w).view(b, h, w), (j % w).view(b, h, w)
    s = sim.reshape(b * n, 1, h, w)
    if radius:
        s = F.max_pool2d(F.pad(s, (radius,) * 4, value=-2.0), 2 * radius + 1, stride=1)
    s = F.pad(s, (1, 1, 1, 1), value=float("nan")).view(b, h, w, h + 2, w + 2)
    ys = torch.arange(h).view(1, h, 1).expand(b, h, w)
    xs = torch.arange(w).view(1, 1, w).expand(b, h, w)
    bi = torch.arange(b).view(b, 1, 1).expand(b, h, w)
    votes = []
    for dy, dx in OFFSETS:
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        v = s[bi, ny.clamp(0, h - 1), nx.clamp(0, w - 1), jy + dy + 1, jx + dx + 1]
        votes.append(torch.where(inside, v, torch.full_like(v, float("nan"))))
    agree = torch.nan_to_num(torch.nanmean(torch.stack(votes, -1), -1), nan=0.0).view(b, n)
    return (1.0 - mu) * best + mu * agree


class Scorer:
    """A quality-eval estimator stand-in: ``estimate`` returns the variant's generated-side scores."""

    def __init__(self, est, mode: str = "base", **kw) -> None:
        self.est, self.mode, self.kw = est, mode, kw
        self.grid_size = est.grid_size

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        est = self.est
        if self.mode != "layer":
            return F.normalize(est.features(images).float().flatten(1, 2), dim=-1)
        px = est.preprocess(images)
        layer, weight = self.kw["layer"], self.kw["weight"]
        parts = []
        for index, share in ((-1, weight), (layer, 1.0)):
            f = patch_tokens(est.backbone, px, index).float()
            m = patch_tokens(est.backbone, px.flip(-1), index).flip(2).float()
            parts.append(math.sqrt(share) * F.normalize(F.normalize(f, dim=-1) + F.normalize(m, dim=-1), dim=-1))
        feats = torch.cat(parts, -1) / math.sqrt(weight + 1.0)
        lam = est.sharpness_weight
        images = (px.float() * est._std + est._mean).clamp(0.0, 1.0)  # as the estimator sees them
        sharp = sharpness_embedding(local_sharpness(images, self.grid_size))
        joined = torch.cat([math.sqrt(1.0 - lam) * feats, math.sqrt(lam) * sharp], -1)
        return F.normalize(joined.flatten(1, 2), dim=-1)

    @torch.no_grad()
    def estimate(self, reference: torch.Tensor, generated: torch.Tensor):
        if self.mode == "views":
            saved, self.est.reference_views = self.est.reference_views, self.kw["views"]
            try:
                score = self.est.estimate(reference, generated).generated_similarity
            finally:
                self.est.reference_views = saved
            return types.SimpleNamespace(generated_similarity=score, generated=score)
        g, r = self._features(generated), self._features(reference)
        sim = g @ r.transpose(1, 2)
        if self.mode == "neighbours":
            score = neighbour_scores(sim, self.grid_size, self.kw["mu"], self.kw["radius"])
        else:
            score = sim.max(-1).values
        if self.mode == "image-norm":
            level = score.median(-1).values if self.kw["stat"] == "median" else torch.quantile(score, 0.9, dim=-1)
            score = score - self.kw["a"] * level[:, None]
        score = score.view(-1, *self.grid_size)
        return types.SimpleNamespace(generated_similarity=score, generated=score)


def variants() -> list[tuple[str, dict]]:
    out = [("base", {"mode": "base"})]
    out += [
        (f"neighbours mu={m} r={r}", {"mode": "neighbours", "mu": m, "radius": r}) for r in (0, 1) for m in (0.3, 0.5)
    ]
    out += [(f"image-norm a={a} {s}", {"mode": "image-norm", "a": a, "stat": s}) for a, s in ((0.5, "median"),
            (1.0, "median"), (1.0, "q90"))]  # fmt: skip
    out += [
        (f"layer {li} w={w}", {"mode": "layer", "layer": li, "weight": w}) for li, w in ((3, 1.0), (2, 1.0), (2, 2.0))
    ]
    out += [(f"sharpness {name}", {"mode": "base", "sharp": s}) for name, s in (
        ("quantile 0.5", {"quantile": 0.5}), ("quantile 0.9", {"quantile": 0.9}), ("clamp 3", {"clamp": 3.0}),
        ("bands 1,2,4", {"bands": (1.0, 2.0, 4.0)}), ("bands 0.5,1,2", {"bands": (0.5, 1.0, 2.0)}),
    )]  # fmt: skip
    out += [(f"views {name}", {"mode": "views", "views": v}) for name, v in (
        ("shift 0.5 (4 views)", ReferenceViews(shift=0.5)),
        ("1, 1.2 corners (5)", ReferenceViews((1.0, 1.2), crops=2)),
        ("1, 1.2 3x3 (10)", ReferenceViews((1.0, 1.2), crops=3)),
        ("1, 1.25 3x3 (10)", ReferenceViews((1.0, 1.25), crops=3)),
        ("1, 1.2 3x3, shift 0.5 (13; quality-train's default)", ReferenceViews((1.0, 1.2), crops=3, shift=0.5)),
        ("1, 0.85, 1.2 3x3, shift 0.5 (14)", ReferenceViews((1.0, 0.85, 1.2), crops=3, shift=0.5)),
        ("1, 1.1, 1.2, 1.35 3x3, shift 0.5 (31)", ReferenceViews((1.0, 1.1, 1.2, 1.35), crops=3, shift=0.5)),
    )]  # fmt: skip
    return out


def _with_sharpness(settings: dict):
    """Patch the sharpness channel's settings into the estimator module; returns the undo function."""
    saved = (sharpness_module.BAND_SIGMAS, estimator_module.local_sharpness, estimator_module.sharpness_embedding)
    clamp = settings.get("clamp", 2.0)
    sharpness_module.BAND_SIGMAS = settings.get("bands", saved[0])
    estimator_module.local_sharpness = functools.partial(
        local_sharpness, quantile=settings.get("quantile", 0.75), clamp=clamp
    )
    estimator_module.sharpness_embedding = functools.partial(sharpness_embedding, clamp=clamp)

    def undo() -> None:
        sharpness_module.BAND_SIGMAS, estimator_module.local_sharpness, estimator_module.sharpness_embedding = saved

    return undo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("estimators", nargs="+")
    p.add_argument("--images", default="../shared/data/dreambench256")
    p.add_argument("--split", default="val", choices=("val", "test"))
    p.add_argument("--sharpness-weight", type=float, default=0.3)
    p.add_argument("--only", default="", help="grade only the variants whose name starts with this (e.g. views)")
    args = p.parse_args()
    torch.set_num_threads(2)
    photos = load_photos([args.images], size=256, subjects=list(DREAMBENCH_SPLITS[args.split]))
    batches = _make_benchmark_pairs(photos, GRID, pairs_per_image=8, seed=0, families=FAMILIES, batch_size=16)
    cat = {k: np.concatenate([getattr(p, k).numpy() for _, p in batches]) for k in ("labels", "kinds", "coverage")}
    subjects = np.array([photos.subjects[j] for idx, _ in batches for j in idx])
    print("| estimator | variant | AUROC | AP | " + " | ".join(FAMILIES) + " |")
    print("|---|---|---|---|" + "---|" * len(FAMILIES))
    for spec in args.estimators:
        est = load_estimator(spec)
        est.sharpness_weight = args.sharpness_weight
        est.reference_views = ReferenceViews()  # every variant but `views ...` reads the plain reference
        for name, v in variants():
            if not name.startswith(args.only) and name != "base":
                continue
            undo = _with_sharpness(v.get("sharp", {}))
            try:
                scorer = Scorer(est, **{k: x for k, x in v.items() if k != "sharp"})
                sims = np.concatenate(
                    [
                        scorer.estimate(pairs.reference, pairs.generated).generated_similarity.numpy()
                        for _, pairs in batches
                    ]
                )
            finally:
                undo()
            res = grade(sims, sims, cat["labels"], cat["kinds"], cat["coverage"], subjects, FAMILIES)
            fams = " | ".join(f"{res['per_family'][f]['auroc']:.3f}" for f in FAMILIES)
            print(
                f"| {spec} | {name} | {res['overall']['auroc']:.3f} | {res['overall']['ap']:.3f} | {fams} |", flush=True
            )


if __name__ == "__main__":
    main()
