"""The mini world's graders: small CNNs trained on clean renders only, sharing nothing with the quality estimator.

DreamBench grades with networks the generator never trained against (DINO for identity, CLIP for image and text
similarity). The mini world's analogues are two convolutional networks written here and trained here on the
renderer's clean images of *all* subjects (held-out ones included: a grader must know every subject; the generator
never sees the held-out ones before evaluation):

* :class:`IdentityJudge` — an embedding (DINO analogue: cosine similarity between a generated image and the
  subject's reference), a subject classifier (identity accuracy among the held-out subjects) and one head per
  subject attribute (shape, body colour, pattern, pattern colour, emblem: global and local detail accuracy);
* :class:`SceneJudge` — background, position and scale classifiers (CLIP-T analogue: does the image show what the
  prompt asked for).

Training images are clean renders (every subject in every scene with several background draws, plus the
references) under mild photometric and one-pixel geometric jitter, so the judges tolerate what any generator's
output has but never see a generated image. Both are saved as safetensors + JSON.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from patchdpo_fast.minibench.world import ATTRIBUTES, BACKGROUNDS, POSITIONS, SCALES, MiniWorld, attribute_classes

__all__ = ["IdentityJudge", "JudgeSet", "SceneJudge", "load_judges", "sanity_check", "save_judges", "train_judges"]


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.GroupNorm(8, c_out),
        nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.GroupNorm(8, c_out),
        nn.SiLU(),
    )


class _Trunk(nn.Module):
    """Three conv stages (full, 1/2, 1/4 resolution) -> a ``dim``-wide feature."""

    def __init__(self, resolution: int, width: int = 16, dim: int = 128) -> None:
        super().__init__()
        self.stages = nn.ModuleList([_block(3, width), _block(width, 2 * width), _block(2 * width, 4 * width)])
        cells = (resolution // 4) ** 2
        self.proj = nn.Linear(4 * width * cells, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 2 - 1
        for i, stage in enumerate(self.stages):
            x = stage(x if i == 0 else F.avg_pool2d(x, 2))
        return self.proj(x.flatten(1))


class IdentityJudge(nn.Module):
    """Subject embedding, subject logits and attribute logits of ``(B, 3, H, W)`` images in [0, 1]."""

    def __init__(self, resolution: int, num_subjects: int, dim: int = 128) -> None:
        super().__init__()
        self.trunk = _Trunk(resolution, dim=dim)
        self.subject = nn.Linear(dim, num_subjects)
        self.attributes = nn.ModuleDict({a: nn.Linear(dim, len(c)) for a, c in attribute_classes().items()})

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalized embedding ``(B, dim)``."""
        return F.normalize(self.trunk(x), dim=-1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        out = {"embedding": F.normalize(h, dim=-1), "subject": self.subject(F.silu(h))}
        out.update({a: head(F.silu(h)) for a, head in self.attributes.items()})
        return out


class SceneJudge(nn.Module):
    """Background, position and scale logits of ``(B, 3, H, W)`` images in [0, 1]."""

    HEADS: ClassVar[dict[str, tuple[str, ...]]] = {
        "background": BACKGROUNDS,
        "position": tuple(POSITIONS),
        "scale": tuple(SCALES),
    }

    def __init__(self, resolution: int, dim: int = 96) -> None:
        super().__init__()
        self.trunk = _Trunk(resolution, width=16, dim=dim)
        self.heads = nn.ModuleDict({k: nn.Linear(dim, len(v)) for k, v in self.HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.silu(self.trunk(x))
        return {k: head(h) for k, head in self.heads.items()}


@dataclass
class JudgeSet:
    """The two trained judges and what their training measured."""

    identity: IdentityJudge
    scene: SceneJudge
    info: dict[str, Any]


# --- data
def _clean_renders(world: MiniWorld, draws: int, seed: int) -> dict[str, torch.Tensor]:
    """Every subject in every scene ``draws`` times (new backgrounds each), plus every reference."""
    images, subj, scene_idx = [], [], []
    for si, subject in enumerate(world.subjects):
        images.append(world.render_reference(subject).image)
        subj.append(si)
        scene_idx.append(-1)
        for ci, scene in enumerate(world.scenes):
            for d in range(draws):
                images.append(world.render(subject, scene, seed=seed + (si * 1000 + ci) * 16 + d).image)
                subj.append(si)
                scene_idx.append(ci)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return {"images": x, "subject": torch.tensor(subj), "scene": torch.tensor(scene_idx)}


def _jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One-pixel shifts, slight blur, brightness/contrast and pixel noise (what any generated image has)."""
    b = x.shape[0]
    shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
    x = torch.roll(F.pad(x, (1, 1, 1, 1), mode="replicate"), shifts=shift, dims=(2, 3))[..., 1:-1, 1:-1]
    if float(torch.rand((), generator=gen)) < 0.3:
        blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        x = 0.5 * x + 0.5 * blurred
    scale = 1 + 0.08 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    offset = 0.06 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    noise = torch.randn(x.shape, generator=gen) * 0.04 * torch.rand(b, 1, 1, 1, generator=gen)
    return (x * scale + offset + noise).clamp(0, 1)


# --- train
def _fit(
    model: nn.Module,
    loss_fn: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor],
    data: dict[str, torch.Tensor],
    keep: torch.Tensor,
    steps: int,
    batch: int,
    seed: int,
    label: str,
    progress: bool,
) -> float:
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, i / steps)))
    )
    idx = torch.nonzero(keep).flatten()
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=f"judge {label}", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        pick = idx[torch.randint(len(idx), (batch,), generator=gen)]
        loss = loss_fn(model(_jitter(data["images"][pick], gen)), pick)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return time.perf_counter() - t0


@torch.no_grad()
def _accuracy(model: nn.Module, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    out: dict[str, list[torch.Tensor]] = {k: [] for k in labels}
    for i in range(0, len(images), 256):
        pred = model(images[i : i + 256])
        for k in labels:
            out[k].append(pred[k].argmax(-1))
    return {k: float((torch.cat(v) == labels[k]).float().mean()) for k, v in out.items()}


def train_judges(
    world: MiniWorld, *, steps: int = 1500, batch: int = 128, draws: int = 2, seed: int = 0, progress: bool = True
) -> JudgeSet:
    """Train both judges on clean renders of every subject and check them on fresh renders (``info``).

    The check (``info["sanity"]``) renders every held-out subject in every scene with backgrounds never used in
    training and reports identity accuracy among the held-out subjects, the cosine similarity of a render to its own
    reference against other subjects' references, attribute accuracies and scene accuracies.
    """
    data = _clean_renders(world, draws, seed=seed * 7919 + 1)
    attrs = torch.tensor(
        [
            [attribute_classes()[a].index(v) for a, v in zip(ATTRIBUTES, s.attribute_values(), strict=True)]
            for s in world.subjects
        ]
    )
    scene_labels = torch.tensor(
        [
            [BACKGROUNDS.index(c.background), list(POSITIONS).index(c.position), list(SCALES).index(c.scale)]
            for c in world.scenes
        ]
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        identity = IdentityJudge(world.resolution, len(world.subjects))
        scene = SceneJudge(world.resolution)

    def identity_loss(out: dict[str, torch.Tensor], pick: torch.Tensor) -> torch.Tensor:
        s = data["subject"][pick]
        loss = F.cross_entropy(out["subject"], s)
        for j, a in enumerate(ATTRIBUTES):
            loss = loss + 0.5 * F.cross_entropy(out[a], attrs[s, j])
        return loss

    def scene_loss(out: dict[str, torch.Tensor], pick: torch.Tensor) -> torch.Tensor:
        lab = scene_labels[data["scene"][pick]]
        return sum(F.cross_entropy(out[k], lab[:, j]) for j, k in enumerate(SceneJudge.HEADS))

    t_id = _fit(
        identity,
        identity_loss,
        data,
        torch.ones(len(data["subject"]), dtype=torch.bool),
        steps,
        batch,
        seed + 1,
        "identity",
        progress,
    )
    t_sc = _fit(scene, scene_loss, data, data["scene"] >= 0, steps, batch, seed + 2, "scene", progress)
    judges = JudgeSet(
        identity,
        scene,
        {"steps": steps, "batch": batch, "draws": draws, "seed": seed, "seconds": {"identity": t_id, "scene": t_sc}},
    )
    judges.info["sanity"] = sanity_check(judges, world, seed=seed + 99_000)
    return judges


@torch.no_grad()
def sanity_check(judges: JudgeSet, world: MiniWorld, seed: int) -> dict[str, Any]:
    """Grade fresh clean renders of the held-out subjects (backgrounds never seen in training)."""
    from patchdpo_fast.minibench.metrics import score_images

    subjects, scenes, images = [], [], []
    for si, subject in enumerate(world.heldout_subjects):
        for ci, sc in enumerate(world.scenes):
            subjects.append(subject.name)
            scenes.append(sc)
            images.append(world.render(subject, sc, seed=seed + si * 100 + ci).image)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    per_image = score_images(judges, world, x, subjects, scenes)
    summary = {k: float(np.mean([r[k] for r in per_image])) for k in per_image[0] if k not in ("subject", "prompt")}
    # own reference vs the other held-out subjects' references
    refs = torch.from_numpy(np.stack([world.render_reference(s).image for s in world.heldout_subjects]))
    emb_ref = judges.identity.embed(refs.permute(0, 3, 1, 2))
    emb = judges.identity.embed(x)
    sim = emb @ emb_ref.T
    own = torch.tensor([[s.name for s in world.heldout_subjects].index(n) for n in subjects])
    own_sim = sim[torch.arange(len(own)), own]
    mask = torch.ones_like(sim, dtype=torch.bool)
    mask[torch.arange(len(own)), own] = False
    summary["own_reference_similarity"] = float(own_sim.mean())
    summary["other_reference_similarity"] = float(sim[mask].mean())
    summary["retrieval_accuracy"] = float((sim.argmax(-1) == own).float().mean())
    summary["images"] = len(images)
    return summary


# --- io
def save_judges(judges: JudgeSet, folder: str | Path, world: MiniWorld) -> Path:
    """``identity.safetensors``, ``scene.safetensors`` and ``judges.json`` (sizes + training info)."""
    from safetensors.torch import save_file

    from patchdpo_fast.utils import atomic_write, atomic_write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, model in (("identity", judges.identity), ("scene", judges.scene)):
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        atomic_write(folder / f"{name}.safetensors", lambda tmp, s=state: save_file(s, tmp))
    atomic_write_json(
        folder / "judges.json",
        {"resolution": world.resolution, "num_subjects": len(world.subjects), "info": judges.info},
    )
    return folder


def load_judges(folder: str | Path) -> JudgeSet:
    """Read :func:`save_judges` output."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_file = folder / "judges.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"no judges in {folder} (judges.json missing)")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    identity = IdentityJudge(meta["resolution"], meta["num_subjects"])
    identity.load_state_dict(load_file(str(folder / "identity.safetensors")))
    scene = SceneJudge(meta["resolution"])
    scene.load_state_dict(load_file(str(folder / "scene.safetensors")))
    return JudgeSet(identity.eval(), scene.eval(), meta["info"])
