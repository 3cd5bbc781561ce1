"""CPU time of one quality-train step by phase (docs/quality.md, "Where a step's CPU time goes").

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/quality_profile.py [--steps 20] [--crop 128] [--threads 2]

Times, with ``time.process_time`` (this process's CPU time, all threads), the phases of quality-train's step on the
12 DreamBench training subjects: pair generation (``make_training_pairs``: views, global changes, defects, labels),
backbone forward, the dense loss, backward, and gradient clipping + AdamW. ``--crop 128`` profiles a step of the
progressive-resizing phase (128 px crops, 8 x 8 patches); the default a whole-view step (256 px, 16 x 16).
"""

from __future__ import annotations

import argparse
import time

import torch

from patchdpo_fast.quality.estimator import PatchQualityEstimator
from patchdpo_fast.quality.images import DREAMBENCH_SPLITS, load_photos
from patchdpo_fast.quality.train_backbone import (
    TrainSettings,
    _AffineHead,
    dense_patch_loss,
    make_training_pairs,
    random_crops,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", default="../shared/data/dreambench256")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--crop", type=int, default=0, help="crop side (0: whole 256 px views)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    held_out = [s for k in ("val", "test") for s in DREAMBENCH_SPLITS[k]]
    photos = load_photos([args.images], size=256, exclude=held_out)
    est = PatchQualityEstimator.tiny(seed=0)
    est.flip_invariant = False
    est.backbone.train()
    settings = TrainSettings()
    head = _AffineHead()
    params = list(est.backbone.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    g = torch.Generator().manual_seed(1)
    totals: dict[str, float] = {}
    for step in range(args.steps + 2):  # two warm-up steps are not counted
        if step == 2:
            totals = {}
        marks = [time.process_time()]
        idx = torch.randint(len(photos), (settings.batch_size,), generator=g)
        if args.crop:
            c = args.crop
            pairs = make_training_pairs(
                random_crops(photos.images[idx], c, g), (c // 16, c // 16), g, (c, c), side_scale=256 / c
            )
            pix = (torch.cat([pairs.reference, pairs.generated]) - est._mean) / est._std
        else:
            pairs = make_training_pairs(photos.images[idx], est.grid_size, g, est.image_size)
            pix = est.preprocess(torch.cat([pairs.reference, pairs.generated]))
        marks.append(time.process_time())
        feats = est.features_from_pixels(pix)
        marks.append(time.process_time())
        n = settings.batch_size
        loss, _ = dense_patch_loss(feats[:n], feats[n:], pairs, head, settings.tau, settings.bce_weight)
        marks.append(time.process_time())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(time.process_time())
        torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        opt.step()
        marks.append(time.process_time())
        for name, a, b in zip(("pairs", "forward", "loss", "backward", "optimizer"), marks, marks[1:], strict=False):
            totals[name] = totals.get(name, 0.0) + b - a
    total = sum(totals.values())
    print(f"{'crop ' + str(args.crop) if args.crop else 'whole 256 px views'}, {args.threads} threads:")
    for name, v in totals.items():
        print(f"  {name:10s} {1000 * v / args.steps:7.1f} ms/step  {100 * v / total:4.0f} %")
    print(f"  {'total':10s} {total / args.steps:7.3f} CPU s/step")


if __name__ == "__main__":
    main()
