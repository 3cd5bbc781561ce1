"""Grading generated images of the mini world: the DreamBench metrics' analogues, per image and per model.

Per generated image of (subject, prompt), with the judges of :mod:`patchdpo_fast.minibench.judges`:

* ``id_sim`` (DINO analogue): cosine similarity of the identity embeddings of the image and the subject's
  reference;
* ``id_acc``: the identity classifier, restricted to the evaluated subjects, names the right one;
* ``detail_acc`` (CLIP-I analogue, the part PatchDPO is about): fraction of the local attributes (pattern,
  pattern colour, emblem) the attribute heads read correctly; ``global_acc`` the same for shape and body colour;
* ``prompt_acc`` (CLIP-T analogue): fraction of background, position and scale the scene judge reads as prompted;
* ``subject_l1`` (ground truth): mean absolute error over the pixels the renderer fills with the subject (its
  interior), against the subject's true colours (best of the one-pixel shifts), in [0, 1], lower is better.

:func:`summarize` averages per subject, then over subjects, as DreamBench does.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from patchdpo_fast.minibench.world import ATTRIBUTES, BACKGROUNDS, LOCAL_ATTRIBUTES, POSITIONS, SCALES, MiniWorld, Scene
from patchdpo_fast.minibench.world import attribute_classes as _classes

__all__ = ["METRICS", "score_images", "subject_l1", "summarize"]

#: Metric name -> (label in tables, paper column it stands for, higher is better).
METRICS: dict[str, tuple[str, str, bool]] = {
    "id_sim": ("ID-sim", "DINO", True),
    "detail_acc": ("Detail-acc", "CLIP-I", True),
    "prompt_acc": ("Prompt-acc", "CLIP-T", True),
    "id_acc": ("ID-acc", "", True),
    "global_acc": ("Global-acc", "", True),
    "subject_l1": ("Subject-L1", "", False),
}


def subject_l1(world: MiniWorld, subject: str, scene: Scene, image: np.ndarray) -> float:
    """Mean best-shift absolute error over the ground-truth subject pixels (``image`` ``(H, W, 3)`` in [0, 1])."""
    truth = world.render(subject, scene, seed=0)
    inside = truth.alpha > 0.99  # the subject's interior: edge pixels mix in the (random) background
    padded = np.pad(truth.subject_rgb, [(1, 1), (1, 1), (0, 0)], mode="edge")
    h, w = image.shape[:2]
    best = None
    for dy in range(3):
        for dx in range(3):
            err = np.abs(image - padded[dy : dy + h, dx : dx + w]).mean(-1)
            best = err if best is None else np.minimum(best, err)
    return float(best[inside].mean())


@torch.no_grad()
def score_images(
    judges: Any,
    world: MiniWorld,
    images: torch.Tensor,
    subjects: Sequence[str],
    scenes: Sequence[Scene],
    candidates: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Per-image metrics (module docstring) of ``images`` ``(N, 3, H, W)`` in [0, 1].

    ``candidates``: the subjects identity accuracy chooses among (default: the held-out subjects).
    """
    if not len(images) == len(subjects) == len(scenes):
        raise ValueError(f"{len(images)} images, {len(subjects)} subjects and {len(scenes)} scenes")
    candidates = list(candidates or [s.name for s in world.heldout_subjects])
    names = [s.name for s in world.subjects]
    cand_idx = torch.tensor([names.index(c) for c in candidates])
    refs = torch.from_numpy(np.stack([world.render_reference(n).image for n in sorted(set(subjects))]))
    ref_emb = dict(zip(sorted(set(subjects)), judges.identity.embed(refs.permute(0, 3, 1, 2)), strict=True))
    classes = _classes()
    out: list[dict[str, Any]] = []
    for start in range(0, len(images), 256):
        x = images[start : start + 256].float().clamp(0, 1)
        ident = judges.identity(x)
        scene_pred = judges.scene(x)
        for j in range(x.shape[0]):
            i = start + j
            subject, scene = world.subject(subjects[i]), scenes[i]
            truth = dict(zip(ATTRIBUTES, subject.attribute_values(), strict=True))
            attr_ok = {a: classes[a][int(ident[a][j].argmax())] == truth[a] for a in ATTRIBUTES}
            pick = cand_idx[int(ident["subject"][j, cand_idx].argmax())]
            prompt_ok = [
                BACKGROUNDS[int(scene_pred["background"][j].argmax())] == scene.background,
                list(POSITIONS)[int(scene_pred["position"][j].argmax())] == scene.position,
                list(SCALES)[int(scene_pred["scale"][j].argmax())] == scene.scale,
            ]
            image_np = x[j].permute(1, 2, 0).numpy()
            out.append(
                {
                    "subject": subject.name,
                    "prompt": scene.prompt,
                    "id_sim": float(ident["embedding"][j] @ ref_emb[subject.name]),
                    "id_acc": float(names[int(pick)] == subject.name),
                    "detail_acc": float(np.mean([attr_ok[a] for a in LOCAL_ATTRIBUTES])),
                    "global_acc": float(np.mean([attr_ok[a] for a in ATTRIBUTES if a not in LOCAL_ATTRIBUTES])),
                    "prompt_acc": float(np.mean(prompt_ok)),
                    "subject_l1": subject_l1(world, subject.name, scene, image_np),
                    **{f"attr_{a}": float(ok) for a, ok in attr_ok.items()},
                }
            )
    return out


def summarize(per_image: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Average per subject, then over subjects (every numeric metric)."""
    by_subject: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in per_image:
        by_subject[row["subject"]].append(row)
    keys = [k for k, v in per_image[0].items() if isinstance(v, float)]
    return {k: float(np.mean([np.mean([r[k] for r in rows]) for rows in by_subject.values()])) for k in keys}
