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

__all__ = ["oracle_maps", "pixel_error"]

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
