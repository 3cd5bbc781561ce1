"""``patchdpo quality-train``: self-supervised training of the quality backbone (DESIGN.md section 1, step 2).

    patchdpo quality-train --images DIR [--images DIR ...] --out DIR --minutes M [--backbone PATH|tiny]
                           [--seed S] [--exclude-subjects a,b]

Every step draws a batch of photos and makes, per photo, two views with a known geometric correspondence (a
reference view and a "generated" view: independent flips, zooms, rotations and translations, photometric jitter)
and pastes synthetic local corruptions into the generated view (patches from another photo, blur, recolour,
shuffle; :mod:`.synthetic`). The dense, patch-level objective on the L2-normalized patch features ``f``:

* **correspondence InfoNCE** in both directions: a clean generated patch must pick its corresponding reference
  patch among all reference patches of the pair (softmax over ``cos / tau``; the target is spread bilinearly over
  the 4 reference cells around the corresponding point), and a reference patch whose counterpart is clean must pick
  it among the generated patches (corrupted patches are negatives there, never targets);
* **best-match classification**: the best cosine similarity of every generated patch to the reference patches
  (and of every reference patch to the generated ones) goes through a learned affine map and a class-balanced
  binary cross-entropy: clean/reproduced = 1, corrupted = 0. This is exactly the quantity the estimator reports,
  so it directly pushes corrupted patches below clean ones.

Progressive resizing (``--crop-fraction``, default 0.6 with the off-grid recipe): the first part of the budget trains
on random crops of 8 x 8 patches cut from the photos at their pixel scale (3.5x cheaper steps), the rest on whole
views at the estimator's input size.

The run is bounded by ``--minutes`` of training time (summed over resumed runs), shows a progress bar, writes an
atomic checkpoint every ``--checkpoint-every`` seconds into ``OUT/checkpoints/`` (each one a folder
``PatchQualityEstimator.from_pretrained`` loads, plus the optimizer state; safetensors and JSON only) and resumes
from the latest one when started again with the same ``--out``. At the end it fits the calibration on the training
photos and writes the estimator folder ``OUT`` (``quality_config.json`` + ``backbone/``) with the sharpness channel
(``--sharpness-weight``) and the reference views (``--reference-scales / --reference-crops / --reference-shift``,
:data:`REFERENCE_VIEWS`), both used at estimation time only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from patchdpo_fast.errors import UserError
from patchdpo_fast.quality.defects import (
    FAMILIES,
    TRAIN_CHANGE,
    TRAIN_RECIPE,
    TRAIN_REF_CHANGE,
    GlobalChange,
    make_defect_pairs,
    parse_families,
)
from patchdpo_fast.quality.estimator import PatchQualityEstimator
from patchdpo_fast.quality.images import load_photos, parse_subjects
from patchdpo_fast.quality.reference_views import ReferenceViews, add_view_arguments, views_from_arguments
from patchdpo_fast.quality.synthetic import (
    Corruptions,
    Geometry,
    Photometric,
    SyntheticPairs,
    make_pairs,
)
from patchdpo_fast.utils import resolve_device, set_default_permissions

__all__ = ["TrainSettings", "dense_patch_loss", "main", "make_training_pairs"]

#: Progressive resizing (``quality-train --crop-fraction``): the share of the time budget trained on crops of
#: :data:`CROP_PATCHES` x :data:`CROP_PATCHES` patches (docs/quality.md: 0.761 -> 0.824 val AUROC at 3 CPU minutes).
CROP_FRACTION = 0.6
CROP_PATCHES = 8
#: ``sharpness_weight`` of the estimators quality-train writes (docs/quality.md, "Why blur-like defects are hard":
#: 0.829 / 0.820 -> 0.886 / 0.882 val AUROC on two seeds at 3 CPU minutes).
SHARPNESS_WEIGHT = 0.3
#: Settings a resumed run must share with its checkpoint, besides the clock, recipe, families, labels and global
#: changes: the steps already taken were optimized with them (quality-train refuses a resume that changes one).
RESUME_SETTINGS = ("lr", "batch_size", "bce_weight", "crop_fraction", "crop_batch_size")
#: ``reference_views`` of the estimators quality-train writes (docs/quality.md, "Reference views": val AUROC of a
#: 3-minute backbone 0.889 -> 0.940, of the 60-minute one 0.930 -> 0.968). Estimation only: training never sees them.
REFERENCE_VIEWS = ReferenceViews(scales=(1.0, 1.2), crops=3, shift=0.5)

#: Views during training: stronger than the benchmark's change, so the features learn the invariances.
TRAIN_GEN_GEOMETRY = Geometry(flip_p=0.5, zoom=(1.0, 1.5), rotate_deg=8.0)
TRAIN_REF_GEOMETRY = Geometry(flip_p=0.5, zoom=(1.0, 1.2), rotate_deg=3.0)
TRAIN_GEN_PHOTOMETRIC = Photometric(brightness=0.25, contrast=0.25, saturation=0.25, hue_deg=15.0)
TRAIN_REF_PHOTOMETRIC = Photometric(brightness=0.1, contrast=0.1, saturation=0.1, hue_deg=5.0)
#: Blur and shuffle are drawn twice as often as paste and recolour: they are the hardest to see (a blurred or
#: shuffled patch still resembles smooth or textured patches elsewhere in the reference).
TRAIN_CORRUPTIONS = Corruptions(
    kinds=("paste", "blur", "blur", "recolor", "shuffle", "shuffle"), regions=(1, 4), region_cells=(1, 4)
)


@dataclass
class TrainSettings:
    """Hyper-parameters of the dense objective and the optimizer (defaults tuned for the tiny ViT on a CPU)."""

    batch_size: int = 8
    lr: float = 2e-3  # tiny backbone from scratch (1e-3 until the lr runs of docs/quality.md); pretrained: 1e-5
    weight_decay: float = 0.05
    warmup_steps: int = 50
    tau: float = 0.1
    bce_weight: float = 1.0
    grad_clip: float = 1.0
    photo_size: int = 256
    soft_labels: bool = True
    #: progressive resizing: the first ``crop_fraction`` of the time budget trains on random ``crop_size`` px crops
    #: of the photos at their full pixel scale (8 x 8 patches instead of 16 x 16: a step costs ~3.5x less CPU),
    #: the rest on whole views at ``image_size``. ``crop_size`` 0 = 8 patches of the backbone; ``crop_batch_size``
    #: 0 = ``batch_size``.
    crop_fraction: float = 0.0
    crop_size: int = 0
    crop_batch_size: int = 0
    #: ``sharpness_weight`` of the written estimator (the relative local sharpness joined to the backbone feature,
    #: :mod:`.sharpness`); with ``sharpness_in_loss`` the training objective sees the joined feature too.
    sharpness_weight: float = SHARPNESS_WEIGHT
    sharpness_in_loss: bool = False


def make_training_pairs(
    sources: torch.Tensor,
    grid: tuple[int, int],
    g: torch.Generator,
    size: tuple[int, int] | None = None,
    *,
    recipe: str = "offgrid",
    families: Sequence[str] = FAMILIES,
    donors: torch.Tensor | None = None,
    global_changes: bool = True,
    side_scale: float = 1.0,
    global_blur: bool = True,
) -> SyntheticPairs:
    """Pairs for one training step (both views augmented, defects in the generated view), made at ``size``
    (the estimator's input size: the views are warped at the photos' resolution, then resized and corrupted).

    ``recipe="offgrid"``: :data:`~.defects.TRAIN_RECIPE` restricted to ``families`` with the training global changes
    (labels and ``coverage`` from the covered fraction; ``global_changes=False``, an ablation, leaves both views
    without any global change: no flip, zoom, rotation, colour jitter, blur or JPEG); ``"grid"``: the first version's
    grid-aligned corruptions.

    ``global_blur=False`` (offgrid only) drops the blur of the whole image from both views' global changes (the
    other global changes stay): a view blurred all over is then never shown as "clean".

    ``side_scale`` multiplies the recipe's region sides (fractions of the image side; capped at 0.5 / 0.6 of the
    side): on a crop of half the side, 2 keeps the regions' size in pixels (offgrid only)."""
    if recipe == "offgrid":
        gen_change, ref_change = (TRAIN_CHANGE, TRAIN_REF_CHANGE) if global_changes else (GlobalChange.none(),) * 2
        if not global_blur:
            gen_change, ref_change = replace(gen_change, blur_p=0.0), replace(ref_change, blur_p=0.0)
        recipe_ = TRAIN_RECIPE.only(tuple(families))
        if side_scale != 1.0:
            lo, hi = recipe_.side
            recipe_ = replace(recipe_, side=(min(0.5, lo * side_scale), min(0.6, hi * side_scale)))
        return make_defect_pairs(
            sources, grid, g, size=size, donors=donors, recipe=recipe_,
            gen_change=gen_change, ref_change=ref_change,
        )  # fmt: skip
    if recipe != "grid":
        raise ValueError(f"make_training_pairs: `recipe` must be 'offgrid' or 'grid', got {recipe!r}")
    if not global_changes or not global_blur:
        raise ValueError("make_training_pairs: `global_changes=False` or `global_blur=False` needs recipe='offgrid'")
    return make_pairs(
        sources, grid, g, size=size,
        gen_geometry=TRAIN_GEN_GEOMETRY, ref_geometry=TRAIN_REF_GEOMETRY,
        gen_photometric=TRAIN_GEN_PHOTOMETRIC, ref_photometric=TRAIN_REF_PHOTOMETRIC,
        corruptions=TRAIN_CORRUPTIONS,
    )  # fmt: skip


def random_crops(images: torch.Tensor, side: int, g: torch.Generator) -> torch.Tensor:
    """One random ``side`` x ``side`` crop of every image ``(N, 3, H, W)`` (the pixel scale is kept)."""
    n, _, h, w = images.shape
    ys = torch.randint(0, h - side + 1, (n,), generator=g).tolist()
    xs = torch.randint(0, w - side + 1, (n,), generator=g).tolist()
    return torch.stack([im[:, y : y + side, x : x + side] for im, y, x in zip(images, ys, xs, strict=True)])


def _bilinear_targets(coords: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft targets ``(N, P, P)`` spreading each mapped point over the 4 surrounding cells, and row validity."""
    n, gh, gw, _ = coords.shape
    p = gh * gw
    c = coords.reshape(n, p, 2)
    valid = torch.isfinite(c).all(dim=-1)
    c = torch.nan_to_num(c, nan=0.0)
    r0, c0 = torch.floor(c[..., 0]), torch.floor(c[..., 1])
    fr, fc = c[..., 0] - r0, c[..., 1] - c0
    target = torch.zeros(n, p, p)
    for dr, wr in ((0, 1 - fr), (1, fr)):
        for dc, wc in ((0, 1 - fc), (1, fc)):
            rr = (r0 + dr).clamp(0, gh - 1).long()
            cc = (c0 + dc).clamp(0, gw - 1).long()
            target.scatter_add_(2, (rr * gw + cc)[..., None], (wr * wc)[..., None])
    target[~valid] = 0.0
    return target, valid


def _balanced_bce(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean BCE of the positives plus mean BCE of the negatives (either may be empty)."""
    loss = logits.new_zeros(())
    for mask, y in ((positive, 1.0), (~positive, 0.0)):
        if mask.any():
            loss = loss + F.binary_cross_entropy_with_logits(logits[mask], torch.full_like(logits[mask], y))
    return loss


def _balanced_soft_bce(logits: torch.Tensor, target: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """BCE against soft quality targets: mean over the clean cells plus mean over the others (either may be empty)."""
    loss = logits.new_zeros(())
    for mask in (clean, ~clean):
        if mask.any():
            loss = loss + F.binary_cross_entropy_with_logits(logits[mask], target[mask])
    return loss


def dense_patch_loss(
    ref_feat: torch.Tensor,
    gen_feat: torch.Tensor,
    pairs: SyntheticPairs,
    head: nn.Module,
    tau: float = 0.1,
    bce_weight: float = 1.0,
    soft_labels: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The dense objective (module docstring) for features ``(N, h, w, D)`` of the two views of ``pairs``.

    With ``soft_labels`` and pairs that carry a soft ``quality`` target (off-grid defects), the best-match
    classification is trained against ``1 - covered fraction`` on every cell (partly covered cells included);
    otherwise against the hard labels (partly covered cells left out)."""
    n, gh, gw, _ = gen_feat.shape
    grid = (gh, gw)
    fr = F.normalize(ref_feat.float().flatten(1, 2), dim=-1)
    fg = F.normalize(gen_feat.float().flatten(1, 2), dim=-1)
    sim = fg @ fr.transpose(1, 2)  # (N, Pg, Pr)
    labels = pairs.labels.reshape(n, -1).to(sim.device)

    # generated -> reference InfoNCE over clean generated patches with a counterpart
    tg, vg = _bilinear_targets(pairs.gen_to_ref, grid)
    tg, vg = tg.to(sim.device), vg.to(sim.device) & (labels == 0)
    nce_g = -(tg * F.log_softmax(sim / tau, dim=-1)).sum(-1)
    nce_g = nce_g[vg].mean() if vg.any() else sim.new_zeros(())

    # reference -> generated InfoNCE; targets only on clean generated cells
    tr, vr = _bilinear_targets(pairs.ref_to_gen, grid)
    tr = tr.to(sim.device) * (labels == 0)[:, None, :].float()
    mass = tr.sum(-1)
    vr = vr.to(sim.device) & (mass > 0.5)
    tr = tr / mass.clamp(min=1e-6)[..., None]
    nce_r = -(tr * F.log_softmax(sim.transpose(1, 2) / tau, dim=-1)).sum(-1)
    nce_r = nce_r[vr].mean() if vr.any() else sim.new_zeros(())

    # best-match classification, generated side: clean (1) vs corrupted (0), or the soft quality target
    best_g = sim.amax(dim=-1)
    soft = getattr(pairs, "quality", None) if soft_labels else None
    if soft is not None:
        quality = soft.reshape(n, -1).to(sim.device)
        clean_g = labels == 0
        bce_g = _balanced_soft_bce(head(best_g), quality, clean_g)
    else:
        keep_g = labels >= 0
        bce_g = _balanced_bce(head(best_g[keep_g]), labels[keep_g] == 0)

    # reference side: a reference patch is "reproduced" when the generated cell nearest its counterpart is clean
    rc = pairs.ref_to_gen.reshape(n, -1, 2).to(sim.device)
    has = torch.isfinite(rc).all(dim=-1)
    rr = torch.nan_to_num(rc[..., 0]).round().clamp(0, gh - 1).long()
    cc = torch.nan_to_num(rc[..., 1]).round().clamp(0, gw - 1).long()
    ref_label = torch.gather(labels, 1, rr * gw + cc)
    best_r = sim.amax(dim=1)
    if soft is not None:
        ref_quality = torch.gather(quality, 1, rr * gw + cc)
        bce_r = _balanced_soft_bce(head(best_r[has]), ref_quality[has], (ref_label == 0)[has])
    else:
        keep_r = has & (ref_label >= 0)
        bce_r = _balanced_bce(head(best_r[keep_r]), ref_label[keep_r] == 0)

    loss = nce_g + nce_r + bce_weight * (bce_g + bce_r)
    with torch.no_grad():
        clean = best_g[labels == 0]
        bad = best_g[labels == 1]
        gap = float(clean.mean() - bad.mean()) if clean.numel() and bad.numel() else float("nan")
    stats = {
        "loss": float(loss.detach()),
        "nce_g": float(nce_g.detach()),
        "nce_r": float(nce_r.detach()),
        "bce_g": float(bce_g.detach()),
        "bce_r": float(bce_r.detach()),
        "gap": gap,
    }
    return loss, stats


class _AffineHead(nn.Module):
    """``logit = exp(log_scale) * (s - bias)``: turns a best-match similarity into a clean-vs-corrupted logit."""

    def __init__(self) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.tensor(0.5))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp() * (s - self.bias)


# ---------------------------------------------------------------------------------------------------- checkpoints
def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for idx, entry in state["state"].items():
        meta["state"][str(idx)] = {}
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{idx}.{k}"] = v.detach().cpu().contiguous()
                meta["state"][str(idx)][k] = "tensor"
            else:
                meta["state"][str(idx)][k] = v
    return tensors, meta


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for idx, entry in meta["state"].items():
        state[int(idx)] = {k: (tensors[f"opt.{idx}.{k}"] if v == "tensor" else v) for k, v in entry.items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _write_checkpoint(
    root: Path,
    est: PatchQualityEstimator,
    head: nn.Module,
    opt: torch.optim.Optimizer,
    g: torch.Generator,
    progress: dict[str, Any],
) -> Path:
    """Write ``root/checkpoints/step-XXXXXXX`` through a temporary folder and a rename, then point ``latest`` at it."""
    ckpts = root / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    name = f"step-{progress['step']:07d}"
    tmp = ckpts / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    est.save_pretrained(tmp, extra={"training": progress})
    tensors, meta = _optimizer_tensors(opt)
    for k, v in head.state_dict().items():
        tensors[f"head.{k}"] = v.detach().cpu().contiguous()
    tensors["rng"] = g.get_state()
    save_file(tensors, str(tmp / "train_state.safetensors"))
    set_default_permissions(tmp / "train_state.safetensors")  # safetensors writes 0600
    (tmp / "train_state.json").write_text(json.dumps({"progress": progress, "optimizer": meta}, indent=1) + "\n")
    final = ckpts / name
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    latest_tmp = ckpts / f".latest-{os.getpid()}"
    latest_tmp.write_text(name + "\n")
    latest_tmp.replace(ckpts / "latest")
    for old in ckpts.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _latest_checkpoint(root: Path) -> Path | None:
    pointer = root / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = root / "checkpoints" / pointer.read_text().strip()
    return path if (path / "train_state.json").is_file() else None


# ---------------------------------------------------------------------------------------------------- training
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="patchdpo quality-train",
        description="Self-supervised dense training of the patch quality backbone (time-bounded, resumable).",
    )
    p.add_argument("--images", action="append", required=True, help="photo folder (repeatable)")
    p.add_argument("--out", required=True, help="output folder (estimator + checkpoints/)")
    p.add_argument(
        "--minutes",
        type=float,
        required=True,
        help="training budget in minutes of --clock time (default: process CPU time), summed over resumed runs",
    )
    p.add_argument("--backbone", default="tiny", help="'tiny' or a local ViT/DINOv2 / estimator folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the tiny backbone and of the data (default 0)")
    p.add_argument("--exclude-subjects", action="append", help="comma-separated subjects to leave out (repeatable)")
    p.add_argument(
        "--exclude-families",
        action="append",
        help=f"defect families never shown in training (leave-one-family-out), from {', '.join(FAMILIES)}",
    )
    p.add_argument(
        "--recipe",
        choices=("offgrid", "grid"),
        default="offgrid",
        help="synthetic defects: off-grid families with coverage labels (default) or the first version's grid",
    )
    p.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="what --minutes counts: this process's CPU time (default; fair on a shared machine) or wall time",
    )
    p.add_argument("--batch-size", type=int, default=None, help="photos per step (default 8)")
    p.add_argument(
        "--hard-labels",
        action="store_true",
        help="ablation: train the best-match classifier on clean vs >half covered only (default: soft 1 - coverage)",
    )
    p.add_argument(
        "--no-global-changes",
        action="store_true",
        help="ablation (offgrid recipe): no global change that is not a defect on either view (no flip, zoom, "
        "rotation, colour jitter, blur or JPEG)",
    )
    p.add_argument(
        "--no-global-blur",
        action="store_true",
        help="offgrid recipe: no blur of the whole image among the global changes of either view (the other global "
        "changes stay; docs/quality.md: a globally blurred view shown as clean teaches the features to ignore blur)",
    )
    p.add_argument(
        "--crop-fraction",
        type=float,
        default=None,
        help=f"progressive resizing: the first fraction of the budget trains on --crop-size crops at the photos' pixel "
        f"scale (default {CROP_FRACTION} with --recipe offgrid, 0 with --recipe grid; 0 = always whole views)",
    )
    p.add_argument("--crop-size", type=int, default=None, help="crop side in pixels (default: 8 backbone patches)")
    p.add_argument("--crop-batch-size", type=int, default=None, help="photos per crop step (default: --batch-size)")
    p.add_argument(
        "--bce-weight",
        type=float,
        default=None,
        help=f"weight of the best-match classification against the InfoNCE terms (default {TrainSettings.bce_weight})",
    )
    p.add_argument(
        "--sharpness-weight",
        type=float,
        default=None,
        help=f"sharpness_weight of the written estimator: the weight of the patch's relative local sharpness "
        f"joined to the backbone feature (default {SHARPNESS_WEIGHT}; 0 = the backbone feature alone)",
    )
    p.add_argument(
        "--sharpness-in-loss",
        action="store_true",
        help="train on the joined feature too (default: the backbone feature alone is trained, the sharpness is "
        "joined for estimation)",
    )
    add_view_arguments(p, f"the written estimator (default scales {','.join(map(str, REFERENCE_VIEWS.scales))}, "
                       f"crops {REFERENCE_VIEWS.crops}, shift {REFERENCE_VIEWS.shift})")  # fmt: skip
    p.add_argument("--lr", type=float, default=None, help="AdamW lr (default 2e-3 for tiny, 1e-5 for pretrained)")
    p.add_argument("--checkpoint-every", type=float, default=60.0, help="seconds between checkpoints (default 60)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', ...")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads of the training steps (default: 1 for the tiny backbone on CPU, ~45 %% more steps per "
        "CPU second than 2 on 2 cores and as many per wall second; else min(2, torch's choice)); the calibration fit "
        "uses min(2, torch's choice) unless this is given",
    )
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (a line per checkpoint instead)")
    return p


def _loss_sharpness(settings: dict[str, Any]) -> float:
    """The sharpness weight the training objective saw (0 unless ``sharpness_in_loss``) from a settings record."""
    return float(settings.get("sharpness_weight", 0.0)) if settings.get("sharpness_in_loss", False) else 0.0


def _lr_at(settings: TrainSettings, step: int, frac: float) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 5 % over the time budget (``frac`` in [0, 1])."""
    warm = min(1.0, (step + 1) / max(1, settings.warmup_steps))
    cos = 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
    return settings.lr * warm * cos


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.minutes < 0:
        raise UserError(f"--minutes must be >= 0, got {args.minutes}")
    try:
        excluded = parse_families(args.exclude_families, default=()) if args.exclude_families else ()
    except ValueError as exc:
        raise UserError(f"--exclude-families: {exc}") from None
    families = tuple(f for f in FAMILIES if f not in excluded)
    if not families:
        raise UserError("--exclude-families leaves no defect family to train on")
    if excluded and args.recipe != "offgrid":
        raise UserError("--exclude-families needs --recipe offgrid")
    if args.no_global_changes and args.recipe != "offgrid":
        raise UserError("--no-global-changes needs --recipe offgrid")
    if args.no_global_blur and args.recipe != "offgrid":
        raise UserError("--no-global-blur needs --recipe offgrid")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    device = resolve_device(args.device)
    entry_threads = torch.get_num_threads()
    try:
        return _train(args, excluded, families, device, entry_threads)
    finally:
        torch.set_num_threads(entry_threads)  # in-process callers (tests, minibench) get their setting back


def train_threads(requested: int | None, backbone: str, device: torch.device, available: int) -> int:
    """Torch threads of the budgeted training steps: ``requested`` when given, else 1 for the tiny backbone on CPU,
    else ``min(2, available)``. Measured on a 2-core machine (docs/quality.md, "Threads"): the tiny backbone made
    859-953 steps in 3 CPU minutes with one thread against 566-703 with two, and as many or more per wall second."""
    if requested is not None:
        return requested
    return 1 if backbone == "tiny" and device.type == "cpu" else min(2, available)


def _train(
    args: argparse.Namespace, excluded: tuple[str, ...], families: tuple[str, ...], device: torch.device,
    entry_threads: int,
) -> int:  # fmt: skip
    # the calibration fit is not budgeted: it gets both cores (its batched passes share them well) unless told
    calibration_threads = args.threads or min(2, entry_threads)
    torch.set_num_threads(train_threads(args.threads, args.backbone, device, entry_threads))
    out = Path(args.out)
    exclude = parse_subjects(args.exclude_subjects) or []

    settings = TrainSettings()
    if args.batch_size:
        settings.batch_size = args.batch_size
    settings.soft_labels = not args.hard_labels
    if args.bce_weight is not None:
        if args.bce_weight < 0:
            raise UserError(f"--bce-weight must be >= 0, got {args.bce_weight}")
        settings.bce_weight = args.bce_weight
    settings.crop_fraction = (
        args.crop_fraction if args.crop_fraction is not None else (CROP_FRACTION if args.recipe == "offgrid" else 0.0)
    )
    if not 0.0 <= settings.crop_fraction <= 1.0:
        raise UserError(f"--crop-fraction must be in [0, 1], got {settings.crop_fraction}")
    settings.crop_batch_size = args.crop_batch_size or settings.batch_size
    if args.sharpness_weight is not None:
        if not 0.0 <= args.sharpness_weight < 1.0:
            raise UserError(f"--sharpness-weight must be in [0, 1), got {args.sharpness_weight}")
        settings.sharpness_weight = args.sharpness_weight
    settings.sharpness_in_loss = bool(args.sharpness_in_loss)
    if settings.sharpness_in_loss and not settings.sharpness_weight:
        raise UserError("--sharpness-in-loss needs a --sharpness-weight above 0")
    try:
        views = views_from_arguments(REFERENCE_VIEWS, args)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    pretrained = args.backbone != "tiny"
    settings.lr = args.lr if args.lr is not None else (1e-5 if pretrained else settings.lr)

    photos = load_photos(args.images, size=settings.photo_size, exclude=exclude)
    if len(photos) < 2:
        raise UserError(f"--images {args.images}: need at least 2 photos, found {len(photos)}")
    est = (
        PatchQualityEstimator.from_pretrained(args.backbone)
        if pretrained
        else PatchQualityEstimator.tiny(seed=args.seed)
    )
    est = est.to(device)
    est.reference_views = views  # used by the calibration and by whoever loads the estimator, not by training
    head = _AffineHead().to(device)
    params = list(est.backbone.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    g = torch.Generator().manual_seed(args.seed + 1)
    progress: dict[str, Any] = {
        "step": 0,
        "train_seconds": 0.0,
        "budget_seconds": args.minutes * 60.0,
        "backbone": args.backbone,
        "seed": args.seed,
        "photos": len(photos),
        "subjects": sorted(set(photos.subjects)),
        "excluded_subjects": exclude,
        "recipe": {"name": args.recipe, **({"kinds": list(TRAIN_CORRUPTIONS.kinds)} if args.recipe == "grid" else {})},
        "families": list(families) if args.recipe == "offgrid" else None,
        "global_changes": not args.no_global_changes,
        "global_blur": not args.no_global_changes and not args.no_global_blur,
        "excluded_families": list(excluded),
        "clock": args.clock,
        "train_cpu_seconds": 0.0,
        "train_wall_seconds": 0.0,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),  # spinning threads inflate a CPU-time budget
        "settings": settings.__dict__,
        "reference_views": views.to_dict(),
        "device": str(device),
    }

    ckpt = None if args.no_resume else _latest_checkpoint(out)
    if ckpt is not None:
        state = json.loads((ckpt / "train_state.json").read_text())
        tensors = load_file(str(ckpt / "train_state.safetensors"))
        resumed = PatchQualityEstimator.from_pretrained(ckpt)
        est.backbone.load_state_dict(resumed.backbone.state_dict())
        head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
        _load_optimizer(opt, tensors, state["optimizer"])
        g.set_state(tensors["rng"])
        old = state["progress"]
        # what the budget counts and what the steps trained on must not change halfway
        recorded = {
            "clock": old.get("clock", "wall"),
            "recipe": old.get("recipe", progress["recipe"])["name"],
            "families": old.get("families", progress["families"]),
            "global_changes": old.get("global_changes", True),
            "global_blur": old.get("global_blur", old.get("global_changes", True)),
            "soft_labels": old.get("settings", {}).get("soft_labels", True),
            "sharpness_in_loss": _loss_sharpness(old.get("settings", {})),
            # the optimization settings too: a resume under another default (lr 1e-3 before 2e-3) must not switch
            **{k: old.get("settings", {}).get(k, settings.__dict__[k]) for k in RESUME_SETTINGS},
        }
        current = {
            "clock": args.clock,
            "recipe": args.recipe,
            "families": progress["families"],
            "global_changes": progress["global_changes"],
            "global_blur": progress["global_blur"],
            "soft_labels": settings.soft_labels,
            "sharpness_in_loss": _loss_sharpness(settings.__dict__),
            **{k: settings.__dict__[k] for k in RESUME_SETTINGS},
        }
        differ = [f"{k} {recorded[k]} (now {current[k]})" for k in recorded if recorded[k] != current[k]]
        if differ:
            raise UserError(
                f"{ckpt} was trained with {', '.join(differ)}; resume with the same settings or pass --no-resume"
            )
        progress.update(
            step=old["step"],
            train_seconds=old["train_seconds"],
            train_cpu_seconds=old.get("train_cpu_seconds", 0.0),
            train_wall_seconds=old.get("train_wall_seconds", old["train_seconds"]),
        )
        print(f"quality-train: resuming from {ckpt} (step {progress['step']}, {progress['train_seconds']:.0f} s done)")

    budget = args.minutes * 60.0
    flip_setting = est.flip_invariant
    est.flip_invariant = False  # train the plain features; the symmetrization is applied at estimation time
    train_sharpness = _loss_sharpness(settings.__dict__)
    est.sharpness_weight = train_sharpness
    est.backbone.train()
    grid = est.grid_size
    patch = (est.image_size[0] // grid[0], est.image_size[1] // grid[1])
    settings.crop_size = args.crop_size or CROP_PATCHES * max(patch)
    if not args.crop_size and settings.crop_size >= min(est.image_size):
        settings.crop_fraction = 0.0  # a backbone grid of at most 8 x 8 patches: nothing smaller to start with
    crop_grid = (settings.crop_size // patch[0], settings.crop_size // patch[1])
    if settings.crop_fraction > 0 and (
        settings.crop_size % patch[0] or settings.crop_size % patch[1] or settings.crop_size > min(est.image_size)
    ):
        raise UserError(
            f"--crop-size {settings.crop_size} must be a multiple of the patch size {patch} and at most the input "
            f"size {est.image_size}"
        )
    # the crops keep the photos' pixel scale: a crop of crop_size px at the input size is this many photo pixels
    ph_, pw_ = photos.images.shape[-2:]
    crop_src = min(ph_, pw_, round(settings.crop_size * pw_ / est.image_size[1]))
    amp = device.type == "cuda"
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=round(budget), initial=min(round(progress["train_seconds"]), round(budget)), unit="s")
    last_ckpt = time.perf_counter()
    stats: dict[str, float] = {}
    while progress["train_seconds"] < budget:
        t0 = time.perf_counter()
        c0 = time.process_time()
        frac = progress["train_seconds"] / max(budget, 1e-9)
        cropped = frac < settings.crop_fraction
        if cropped:
            c = settings.crop_size
            idx = torch.randint(len(photos), (settings.crop_batch_size,), generator=g)
            pairs = make_training_pairs(
                random_crops(photos.images[idx], crop_src, g), crop_grid, g, (c, c), recipe=args.recipe,
                families=families, global_changes=not args.no_global_changes, side_scale=min(est.image_size) / c,
                global_blur=not args.no_global_blur,
            )  # fmt: skip
        else:
            idx = torch.randint(len(photos), (settings.batch_size,), generator=g)
            pairs = make_training_pairs(
                photos.images[idx], grid, g, est.image_size, recipe=args.recipe, families=families,
                global_changes=not args.no_global_changes, global_blur=not args.no_global_blur,
            )  # fmt: skip
        for group in opt.param_groups:
            group["lr"] = _lr_at(settings, progress["step"], frac)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            both = torch.cat([pairs.reference, pairs.generated]).to(device)
            pix = ((both - est._mean) / est._std).to(est.dtype) if cropped else est.preprocess(both)
            feats = est.features_from_pixels(pix)
            n = pairs.reference.shape[0]
            loss, stats = dense_patch_loss(
                feats[:n], feats[n:], pairs, head, settings.tau, settings.bce_weight, settings.soft_labels
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        opt.step()
        dt = time.perf_counter() - t0
        dc = time.process_time() - c0
        progress["step"] += 1
        progress["train_wall_seconds"] += dt
        progress["train_cpu_seconds"] += dc
        progress["train_seconds"] += dc if args.clock == "cpu" else dt
        progress["last"] = stats
        if bar is not None:
            bar.update(min(round(progress["train_seconds"]), round(budget)) - bar.n)
            bar.set_postfix(step=progress["step"], loss=f"{stats['loss']:.3f}", gap=f"{stats['gap']:.3f}")
        if time.perf_counter() - last_ckpt >= args.checkpoint_every and progress["train_seconds"] < budget:
            est.flip_invariant, est.sharpness_weight = flip_setting, settings.sharpness_weight
            _write_checkpoint(out, est, head, opt, g, progress)
            est.flip_invariant, est.sharpness_weight = False, train_sharpness
            last_ckpt = time.perf_counter()
            if bar is None:
                print(
                    f"quality-train: step {progress['step']} {progress['train_seconds']:.0f} s loss {stats['loss']:.4f}"
                )
    if bar is not None:
        bar.close()

    est.flip_invariant, est.sharpness_weight = flip_setting, settings.sharpness_weight
    est.backbone.eval()
    _write_checkpoint(out, est, head, opt, g, progress)
    torch.set_num_threads(calibration_threads)
    progress["calibration_threads"] = calibration_threads
    t_cal = time.perf_counter()
    try:
        est.fit_calibration(photos.images, seed=args.seed, recipe="grid" if args.recipe == "grid" else "offgrid")
    except ValueError as exc:
        print(f"quality-train: calibration not fitted, keeping {est.calibration}: {exc}", file=sys.stderr)
    progress["calibration_seconds"] = round(time.perf_counter() - t_cal, 2)
    est.save_pretrained(out, extra={"training": progress})
    c = est.calibration
    print(
        f"quality-train: {progress['step']} steps in {progress['train_cpu_seconds']:.0f} s CPU / "
        f"{progress['train_wall_seconds']:.0f} s wall ({args.clock} budget) on {device}; calibration "
        f"low {c.low:.4f} high {c.high:.4f}; wrote {out}"
    )
    return 0


if __name__ == "__main__":
    from patchdpo_fast.cli import run_command

    raise SystemExit(run_command("quality-train", main))
