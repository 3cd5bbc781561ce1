"""Oracle quality maps: what the patch quality estimator would say if it knew the renderer's ground truth.

For a generated image of (subject, prompt) the renderer knows where the subject belongs and what every one of its
pixels must look like (:meth:`MiniWorld.render`), and what a correct background of the prompted kind looks like
(:meth:`MiniWorld.background_bank`). The per-pixel error of a generated image is the distance (largest absolute
difference over R, G and B, so a change of hue counts fully) to the closest *correct* image at that pixel: the
true subject, shifted by at most one pixel (a subject drawn one pixel off is not a wrong subject), composited with
its true coverage over one of a bank of correct backgrounds of the prompted kind. So a wrong colour on the subject,
a missing part, a stray or duplicated part in the background are errors, and the background's own texture is not.
A pixel's quality is ``1 - min(error / tolerance, 1)``; a patch's quality ``q_gen`` is the mean over its pixels.

The reference side ``q_ref`` of a reference patch is the mean quality at the places its subject pixels land in the
generated image (the known similarity transform of the prompt's placement): low where the generator failed to
reproduce that part of the subject. Reference background patches get 1 ("nothing to fix"), as the estimator's
foreground mask gives them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from patchdpo_fast.minibench.world import MiniWorld, Scene, Subject

__all__ = ["auroc", "map_agreement", "oracle_maps", "pixel_error"]

_TOLERANCE = 0.4


def _shift(array: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``array`` moved by ``(dy, dx)`` pixels (edges repeated)."""
    h, w = array.shape[:2]
    padded = np.pad(array, [(1, 1), (1, 1)] + [(0, 0)] * (array.ndim - 2), mode="edge")
    return padded[1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]


def pixel_error(world: MiniWorld, subject: Subject, scene: Scene, image: np.ndarray) -> np.ndarray:
    """Per-pixel error ``(H, W)`` in [0, 1] of a generated image ``(H, W, 3)`` in [0, 1] (module docstring).

    The error is the distance (mean over RGB) to the closest *correct* image: the true subject, shifted by at most
    one pixel, composited with its true coverage over one of the bank's correct backgrounds.
    """
    truth = world.render(subject, scene, seed=0)
    bank = world.background_bank(scene.background)
    best = np.full(image.shape[:2], np.inf, np.float32)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            alpha = _shift(truth.alpha, dy, dx)[..., None]
            subject_part = alpha * _shift(truth.subject_rgb, dy, dx)
            for bg in bank:
                err = np.abs(image - (subject_part + (1 - alpha) * bg)).max(-1)
                best = np.minimum(best, err)
    return np.clip(best, 0.0, 1.0).astype(np.float32)


def oracle_maps(
    world: MiniWorld, subject: Subject | str, prompt: Scene | str, image: np.ndarray, map_size: int
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """``(q_ref, q_gen, pixel_quality)``: maps ``(map_size, map_size)`` in [0, 1] and the per-pixel quality."""
    subject = world.subject(subject) if isinstance(subject, str) else subject
    scene = world.scene_from_prompt(prompt) if isinstance(prompt, str) else prompt
    size = world.resolution
    if size % map_size:
        raise ValueError(f"map_size {map_size} does not divide the resolution {size}")
    quality = 1.0 - np.minimum(pixel_error(world, subject, scene, image) / _TOLERANCE, 1.0)
    q = torch.from_numpy(quality)[None, None]
    q_gen = F.adaptive_avg_pool2d(q, map_size)[0, 0]

    # reference side: sample the generated image's quality where each reference subject pixel lands
    ref = world.render_reference(subject)
    s, tx, ty = world.reference_to_scene(scene)
    coords = np.arange(size, dtype=np.float32) + 0.5
    ry, rx = np.meshgrid(coords, coords, indexing="ij")
    gx, gy = s * rx + tx, s * ry + ty  # scene pixel coordinates of each reference pixel
    grid = torch.from_numpy(np.stack([gx / size * 2 - 1, gy / size * 2 - 1], -1))[None]
    landed = F.grid_sample(q, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0]
    alpha = torch.from_numpy(ref.alpha)
    cell = size // map_size
    num = F.avg_pool2d((landed * alpha)[None, None], cell)[0, 0]
    den = F.avg_pool2d(alpha[None, None], cell)[0, 0]
    q_ref = torch.where(den > 0.05, num / den.clamp_min(1e-6), torch.ones_like(den))
    return q_ref.float(), q_gen.float(), quality


def auroc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``score`` for the boolean ``positive`` labels (ties share their rank; None when
    one class is empty)."""
    score, positive = np.asarray(score, dtype=np.float64), np.asarray(positive, dtype=bool)
    pos, neg = int(positive.sum()), int((~positive).sum())
    if pos == 0 or neg == 0:
        return None
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    mid_rank = (upper - (counts - 1) / 2.0)[inverse]  # the average 1-based rank of each tie group
    return float((mid_rank[positive].sum() - pos * (pos + 1) / 2) / (pos * neg))


def map_agreement(
    world: MiniWorld,
    pairs: list[tuple[str, str, np.ndarray, np.ndarray]],
    map_size: int,
    bad_below: float = 0.5,
) -> dict[str, float | int | None]:
    """How well estimated generated-side maps agree with the oracle's, overall and by region.

    ``pairs`` holds ``(subject, prompt, q_gen_estimated, q_gen_oracle)`` with maps ``(map_size, map_size)``. A patch
    is a *subject* patch when the subject covers more than half of it where the prompt places it, *background* when
    it covers less than 5%. Returns the Pearson correlation and the AUROC of the estimate for the oracle's bad patches
    (``q < bad_below``) over all patches and over subject patches only, and the mean quality of each map on each
    region: an estimator that calls every patch absent from the reference bad (the prompted background) is told apart
    from one that cannot see defects on the subject.
    """
    est, ora, cover = [], [], []
    for subject, prompt, q_est, q_ora in pairs:
        render = world.render(world.subject(subject), world.scene_from_prompt(prompt))
        alpha = torch.from_numpy(render.alpha)[None, None]
        cover.append(F.adaptive_avg_pool2d(alpha, map_size)[0, 0].numpy().reshape(-1))
        est.append(np.asarray(q_est, dtype=np.float64).reshape(-1))
        ora.append(np.asarray(q_ora, dtype=np.float64).reshape(-1))
    e, o, c = np.concatenate(est), np.concatenate(ora), np.concatenate(cover)
    subject, background = c > 0.5, c < 0.05
    bad = o < bad_below

    def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
        return float(np.corrcoef(a, b)[0, 1]) if len(a) > 1 and a.std() > 0 and b.std() > 0 else None

    def mean(a: np.ndarray) -> float | None:
        return float(a.mean()) if len(a) else None

    return {
        "pairs": len(pairs),
        "estimator_vs_oracle_pearson": pearson(e, o),
        "oracle_bad_patch_fraction": float(bad.mean()),
        "estimator_auroc_on_oracle_bad_patches": auroc(-e, bad),
        "subject_patch_fraction": float(subject.mean()),
        "subject_estimator_vs_oracle_pearson": pearson(e[subject], o[subject]),
        "subject_estimator_auroc_on_oracle_bad_patches": auroc(-e[subject], bad[subject]),
        "subject_oracle_bad_fraction": mean(bad[subject]),
        "background_oracle_bad_fraction": mean(bad[background]),
        "subject_estimator_mean_quality": mean(e[subject]),
        "background_estimator_mean_quality": mean(e[background]),
        "subject_oracle_mean_quality": mean(o[subject]),
        "background_oracle_mean_quality": mean(o[background]),
    }
