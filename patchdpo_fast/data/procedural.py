"""A procedurally generated PatchDPO pair set, so the tiny demo and the tests need nothing outside the repository.

Each pair imitates one PatchDPO training sample:

* **reference** – a textured, coloured shape (the "subject") centred on a clean, light background;
* **generated** – the same subject (same shape, colours and texture, which follow the subject's own coordinates)
  moved, rescaled and slightly rotated into a new context (beach, forest, city, ...), with a few patches of the
  subject deliberately corrupted (recoloured, noised, erased, scrambled or inverted), as a personalized generator
  gets local details wrong;
* **prompt** – e.g. ``"a photo of a striped red star on a beach"``;
* **quality maps** on the patch grid (``resolution / patch_size`` cells a side), values in [0, 1]:
  ``q_gen`` is low exactly on the corrupted cells and high elsewhere (background cells are 1: nothing there is
  wrong); ``q_ref`` is ``1 -`` the fraction of the reference cell's subject pixels whose counterparts in the
  generated image fell into corrupted cells, i.e. low where the reference was not reproduced.

Everything is a pure function of ``(seed, index)``: items can be produced in any order, by any worker, and are
identical across runs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "COLORS",
    "CONTEXTS",
    "CORRUPTIONS",
    "SHAPES",
    "TEXTURES",
    "ProceduralPair",
    "ProceduralPairs",
    "shape_distance",
    "write_procedural_manifest",
]

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.12),
    "green": (0.15, 0.65, 0.2),
    "blue": (0.15, 0.3, 0.85),
    "yellow": (0.95, 0.85, 0.15),
    "purple": (0.55, 0.2, 0.7),
    "orange": (0.95, 0.5, 0.1),
    "cyan": (0.1, 0.75, 0.8),
    "pink": (0.95, 0.45, 0.7),
    "brown": (0.5, 0.3, 0.15),
    "black": (0.08, 0.08, 0.1),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "hexagon", "ring", "cross")
TEXTURES: tuple[str, ...] = ("plain", "striped", "checkered", "dotted", "spiral")
CORRUPTIONS: tuple[str, ...] = ("recolor", "noise", "erase", "scramble", "invert")
CONTEXTS: dict[str, str] = {
    "beach": "on a beach",
    "forest": "in a forest",
    "city": "on a city street",
    "snow": "in the snow",
    "night": "under a starry night sky",
    "grass": "on the grass",
    "desert": "in the desert",
    "table": "on a wooden table",
}


@dataclass(frozen=True)
class ProceduralPair:
    """One generated pair. Images are float32 ``(3, H, W)`` in [0, 1]; maps are float32 ``(h, w)`` in [0, 1]."""

    ref_pixels: torch.Tensor
    gen_pixels: torch.Tensor
    prompt: str
    q_ref: torch.Tensor
    q_gen: torch.Tensor
    corrupted: torch.Tensor
    """Bool ``(h, w)``: the generated-image cells that were corrupted."""
    subject: dict[str, str]
    """Subject description: shape, color, texture, context."""
    index: int


# ----------------------------------------------------------------------------------------------------------------
# Rendering helpers (all vectorized numpy)
# ----------------------------------------------------------------------------------------------------------------


def _polygon_radius(phi: np.ndarray, sides: int, radius: float, rotation: float = 0.0) -> np.ndarray:
    """Distance from the centre to a regular polygon's edge in direction ``phi``."""
    sector = 2 * math.pi / sides
    local = np.mod(phi - rotation, sector) - sector / 2
    return radius * math.cos(math.pi / sides) / np.cos(local)


def shape_distance(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance (negative inside) of a shape in local units; every shape fits in the unit disc."""
    r = np.hypot(u, v)
    phi = np.arctan2(v, u)
    if shape == "circle":
        return r - 0.9
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.68
    if shape == "diamond":
        return (np.abs(u) + np.abs(v) - 0.95) / math.sqrt(2)
    if shape == "triangle":
        return r - _polygon_radius(phi, 3, 0.95, rotation=-math.pi / 2)
    if shape == "hexagon":
        return r - _polygon_radius(phi, 6, 0.92)
    if shape == "star":
        points, outer, inner = 5, 0.97, 0.45
        sector = 2 * math.pi / points
        t = np.abs(np.mod(phi + math.pi / 2, sector) - sector / 2) / (sector / 2)  # 0 at a tip, 1 between tips
        return r - (outer + (inner - outer) * t)
    if shape == "ring":
        return np.abs(r - 0.68) - 0.24
    if shape == "cross":
        arm_u = np.maximum(np.abs(u) - 0.9, np.abs(v) - 0.3)
        arm_v = np.maximum(np.abs(u) - 0.3, np.abs(v) - 0.9)
        return np.minimum(arm_u, arm_v)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, u: np.ndarray, v: np.ndarray, freq: float, angle: float) -> np.ndarray:
    """Mix factor in [0, 1] between the subject's two colours, a function of local coordinates only."""
    cu = math.cos(angle) * u + math.sin(angle) * v
    cv = -math.sin(angle) * u + math.cos(angle) * v
    if texture == "plain":
        return np.clip(0.5 + 0.5 * (cu + cv) / 2.0, 0.0, 1.0) * 0.35
    if texture == "striped":
        return (np.sin(freq * math.pi * cu) > 0).astype(np.float32)
    if texture == "checkered":
        return ((np.floor(freq * cu) + np.floor(freq * cv)) % 2).astype(np.float32)
    if texture == "dotted":
        fu = np.mod(freq * cu, 1.0) - 0.5
        fv = np.mod(freq * cv, 1.0) - 0.5
        return (np.hypot(fu, fv) < 0.3).astype(np.float32)
    if texture == "spiral":
        r = np.hypot(u, v)
        phi = np.arctan2(v, u)
        return (np.sin(freq * 2.5 * r - 2 * phi) > 0).astype(np.float32)
    raise ValueError(f"unknown texture {texture!r}")


def _background(context: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """An ``(H, W, 3)`` background for the generated image's context."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    noise = rng.normal(0.0, 1.0, (size, size, 1)).astype(np.float32)
    img = np.zeros((size, size, 3), np.float32)

    def fill(mask: np.ndarray, color: tuple[float, float, float]) -> None:
        img[mask] = color

    if context == "beach":
        horizon = 0.4 + 0.1 * rng.random()
        sky = y < horizon
        img[:] = (0.85, 0.75, 0.5)
        img += 0.05 * noise
        img[sky] = np.stack([0.45 + 0.3 * y, 0.65 + 0.2 * y, 0.95 + 0 * y], -1)[sky]
        sea = (y >= horizon) & (y < horizon + 0.12)
        fill(sea, (0.15, 0.45, 0.7))
    elif context == "forest":
        img[:] = np.stack([0.1 + 0.1 * y, 0.3 + 0.2 * y, 0.1 + 0 * y], -1)
        for _ in range(6):
            cx, w = rng.random(), 0.03 + 0.04 * rng.random()
            fill(np.abs(x - cx) < w, (0.3, 0.2, 0.1))
        img += 0.06 * noise
    elif context == "city":
        img[:] = (0.55, 0.58, 0.62)
        for _ in range(8):
            x0, w, h = rng.random(), 0.08 + 0.15 * rng.random(), 0.2 + 0.5 * rng.random()
            shade = float(0.25 + 0.4 * rng.random())
            fill((x >= x0) & (x < x0 + w) & (y > 1.0 - h), (shade, shade, shade + 0.05))
        fill(y > 0.85, (0.3, 0.3, 0.32))
    elif context == "snow":
        img[:] = np.stack([0.85 + 0.1 * y, 0.9 + 0.05 * y, 0.97 + 0 * y], -1)
        img += 0.03 * noise
    elif context == "night":
        img[:] = np.stack([0.02 + 0.05 * y, 0.03 + 0.05 * y, 0.12 + 0.1 * y], -1)
        stars = rng.random((size, size)) < 0.01
        fill(stars, (1.0, 1.0, 0.9))
    elif context == "grass":
        img[:] = (0.25, 0.55, 0.2)
        img += 0.08 * noise * np.array([0.5, 1.0, 0.3], np.float32)
    elif context == "desert":
        phase = rng.random() * 2 * math.pi
        dune = 0.5 + 0.5 * np.sin(6 * x + phase + 3 * y)
        img[:] = np.stack([0.85 + 0.1 * dune, 0.6 + 0.1 * dune, 0.3 + 0.05 * dune], -1)
        fill(y < 0.25, (0.6, 0.8, 0.95))
    elif context == "table":
        grain = 0.5 + 0.5 * np.sin(40 * y + 3 * np.sin(5 * x + rng.random() * 6))
        img[:] = np.stack([0.45 + 0.15 * grain, 0.28 + 0.1 * grain, 0.12 + 0.05 * grain], -1)
    else:
        raise ValueError(f"unknown context {context!r}")
    return np.clip(img, 0.0, 1.0)


def _render_subject(
    canvas: np.ndarray,
    *,
    shape: str,
    colors: tuple[np.ndarray, np.ndarray],
    texture: str,
    freq: float,
    tex_angle: float,
    center: tuple[float, float],
    scale: float,
    rotation: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Composite the subject onto ``canvas`` in place.

    Returns the subject's alpha ``(H, W)`` and the local coordinates ``u, v`` of every pixel.
    """
    size = canvas.shape[0]
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = (x - center[0]) / scale, (y - center[1]) / scale
    cos, sin = math.cos(rotation), math.sin(rotation)
    u = cos * dx + sin * dy
    v = -sin * dx + cos * dy
    dist = shape_distance(shape, u, v)
    alpha = np.clip(0.5 - dist * scale, 0.0, 1.0).astype(np.float32)  # ~1 px anti-aliased edge
    mix = _texture(texture, u, v, freq, tex_angle)[..., None]
    shading = (1.0 - 0.15 * np.clip(np.hypot(u, v), 0, 1))[..., None]
    color = ((1.0 - mix) * colors[0] + mix * colors[1]) * shading
    canvas[:] = canvas * (1.0 - alpha[..., None]) + color * alpha[..., None]
    return alpha, u, v


def _cell_mean(values: np.ndarray, cell: int) -> np.ndarray:
    size = values.shape[0]
    n = size // cell
    return values.reshape(n, cell, n, cell).mean(axis=(1, 3))


class ProceduralPairs:
    """Deterministic procedural pair generator: ``pairs[i]`` is a :class:`ProceduralPair`.

    Args:
        num_pairs: number of pairs.
        resolution: square image side in pixels (a multiple of ``patch_size``).
        seed: base seed; item ``i`` depends only on ``(seed, i)``.
        patch_size: pixels per quality-map cell; maps are ``resolution // patch_size`` cells a side.
        corrupt_fraction: range of the fraction of the subject's cells corrupted in the generated image.
    """

    def __init__(
        self,
        num_pairs: int,
        resolution: int = 64,
        seed: int = 0,
        patch_size: int = 8,
        corrupt_fraction: tuple[float, float] = (0.1, 0.35),
    ) -> None:
        if num_pairs < 1:
            raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
        if patch_size < 1 or resolution % patch_size:
            raise ValueError(f"resolution {resolution} must be a positive multiple of patch_size {patch_size}")
        if resolution // patch_size < 4:
            raise ValueError(f"need at least 4 quality cells a side, got {resolution // patch_size}")
        self.num_pairs = num_pairs
        self.resolution = resolution
        self.seed = seed
        self.patch_size = patch_size
        self.corrupt_fraction = corrupt_fraction

    def __len__(self) -> int:
        return self.num_pairs

    @property
    def map_size(self) -> int:
        """Cells per side of the quality maps."""
        return self.resolution // self.patch_size

    def fingerprint(self) -> dict[str, object]:
        """Everything that determines the generated data (used by the input cache)."""
        return {
            "kind": "procedural",
            "version": 1,
            "num_pairs": self.num_pairs,
            "resolution": self.resolution,
            "seed": self.seed,
            "patch_size": self.patch_size,
            "corrupt_fraction": list(self.corrupt_fraction),
        }

    def __getitem__(self, index: int) -> ProceduralPair:
        if not -self.num_pairs <= index < self.num_pairs:
            raise IndexError(f"pair index {index} out of range for {self.num_pairs} pairs")
        index = index % self.num_pairs
        rng = np.random.default_rng([self.seed, index])
        size, cell = self.resolution, self.patch_size
        n = self.map_size

        shape = SHAPES[rng.integers(len(SHAPES))]
        color_names = list(COLORS)
        first = int(rng.integers(len(color_names)))
        second = (first + 1 + int(rng.integers(len(color_names) - 1))) % len(color_names)
        texture = TEXTURES[rng.integers(len(TEXTURES))]
        context = list(CONTEXTS)[rng.integers(len(CONTEXTS))]
        colors = (np.array(COLORS[color_names[first]], np.float32), np.array(COLORS[color_names[second]], np.float32))
        if texture == "plain":
            colors = (colors[0], np.zeros(3, np.float32))  # plain: a darkening gradient of the main colour
        freq = float(rng.uniform(2.0, 4.0))
        tex_angle = float(rng.uniform(0, math.pi))
        subject = dict(shape=shape, color=color_names[first], texture=texture, context=context)

        # Reference: centred on a clean light background.
        ref = np.empty((size, size, 3), np.float32)
        ref[:] = float(rng.uniform(0.9, 1.0))
        ref_scale = size * float(rng.uniform(0.36, 0.44))
        ref_rot = float(rng.uniform(-0.2, 0.2))
        ref_alpha, ref_u, ref_v = _render_subject(
            ref, shape=shape, colors=colors, texture=texture, freq=freq, tex_angle=tex_angle,
            center=(size / 2, size / 2), scale=ref_scale, rotation=ref_rot,
        )  # fmt: skip

        # Generated: new context, moved / rescaled / rotated subject.
        gen = _background(context, size, rng)
        gen_scale = ref_scale * float(rng.uniform(0.65, 0.95))
        margin = gen_scale + 1.0
        center = (float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin)))
        gen_rot = ref_rot + float(rng.uniform(-0.5, 0.5))
        background = gen.copy()
        gen_alpha, _, _ = _render_subject(
            gen, shape=shape, colors=colors, texture=texture, freq=freq, tex_angle=tex_angle,
            center=center, scale=gen_scale, rotation=gen_rot,
        )  # fmt: skip

        # Corrupt a few cells that are mostly subject.
        coverage = _cell_mean(gen_alpha, cell)
        candidates = np.flatnonzero(coverage.reshape(-1) >= 0.5)
        if candidates.size == 0:
            candidates = np.argsort(coverage.reshape(-1))[-1:]
        low, high = self.corrupt_fraction
        count = max(1, round(candidates.size * float(rng.uniform(low, high))))
        chosen = rng.choice(candidates, size=min(count, candidates.size), replace=False)
        corrupted = np.zeros(n * n, bool)
        corrupted[chosen] = True
        corrupted = corrupted.reshape(n, n)
        for flat in np.sort(chosen):
            row, col = divmod(int(flat), n)
            ys, xs = slice(row * cell, (row + 1) * cell), slice(col * cell, (col + 1) * cell)
            self._corrupt(gen, background, ys, xs, rng, color_names, first)

        # Quality maps.
        q_gen = np.ones((n, n), np.float32)
        subject_cells = coverage > 0.05
        q_gen[subject_cells] = rng.uniform(0.85, 1.0, int(subject_cells.sum()))
        q_gen[corrupted] = rng.uniform(0.0, 0.15, int(corrupted.sum()))

        # Where does each reference subject pixel land in the generated image?
        cos, sin = math.cos(gen_rot), math.sin(gen_rot)
        gx = center[0] + gen_scale * (cos * ref_u - sin * ref_v)
        gy = center[1] + gen_scale * (sin * ref_u + cos * ref_v)
        gcol = np.clip((gx // cell).astype(np.int64), 0, n - 1)
        grow = np.clip((gy // cell).astype(np.int64), 0, n - 1)
        lost = corrupted[grow, gcol].astype(np.float32) * ref_alpha
        ref_mass = _cell_mean(ref_alpha, cell)
        lost_mass = _cell_mean(lost, cell)
        q_ref = np.ones((n, n), np.float32)
        has_subject = ref_mass > 1e-3
        q_ref[has_subject] = 1.0 - np.clip(lost_mass[has_subject] / ref_mass[has_subject], 0.0, 1.0)

        words = f"{'' if texture == 'plain' else texture + ' '}{color_names[first]} {shape}"
        prompt = f"a photo of {'an' if words[0] in 'aeiou' else 'a'} {words} {CONTEXTS[context]}"
        return ProceduralPair(
            ref_pixels=torch.from_numpy(np.ascontiguousarray(ref.transpose(2, 0, 1))).clamp_(0, 1),
            gen_pixels=torch.from_numpy(np.ascontiguousarray(gen.transpose(2, 0, 1))).clamp_(0, 1),
            prompt=prompt,
            q_ref=torch.from_numpy(q_ref),
            q_gen=torch.from_numpy(q_gen),
            corrupted=torch.from_numpy(corrupted),
            subject=subject,
            index=index,
        )

    @staticmethod
    def _corrupt(
        img: np.ndarray,
        background: np.ndarray,
        ys: slice,
        xs: slice,
        rng: np.random.Generator,
        color_names: list[str],
        own_color: int,
    ) -> None:
        kind = CORRUPTIONS[rng.integers(len(CORRUPTIONS))]
        patch = img[ys, xs]
        if kind == "recolor":
            other = color_names[(own_color + 1 + int(rng.integers(len(color_names) - 1))) % len(color_names)]
            luminance = patch.mean(axis=-1, keepdims=True)
            patch[:] = 0.3 * luminance + 0.7 * np.array(COLORS[other], np.float32)
        elif kind == "noise":
            patch[:] = np.clip(patch + rng.normal(0, 0.45, patch.shape), 0, 1)
        elif kind == "erase":
            patch[:] = background[ys, xs]
        elif kind == "scramble":
            flat = patch.reshape(-1, 3)
            flat[:] = flat[rng.permutation(flat.shape[0])]
            patch[:] = np.clip(patch + rng.normal(0, 0.1, patch.shape), 0, 1)
        else:  # invert
            patch[:] = 1.0 - patch


# ----------------------------------------------------------------------------------------------------------------
# As a manifest on disk
# ----------------------------------------------------------------------------------------------------------------


def write_procedural_manifest(
    out_dir: str | os.PathLike[str],
    num_pairs: int,
    resolution: int = 64,
    seed: int = 0,
    patch_size: int = 8,
    *,
    progress: bool = False,
) -> Path:
    """Write the procedural pairs as a manifest: PNG images, safetensors quality maps and ``manifest.jsonl``.

    Layout under ``out_dir``: ``references/{i:05d}.png``, ``generated/{i:05d}.png``,
    ``maps/{i:05d}.q_ref.safetensors``, ``maps/{i:05d}.q_gen.safetensors`` and ``manifest.jsonl`` (one record and
    one generated image per pair, id ``pair-{i:05d}``). Images are stored as 8-bit PNG, so pixels read back within
    half a grey level (1/510) of :class:`ProceduralPairs`; maps are stored exactly. Every file is written
    atomically, the manifest last. Rerunning with the same arguments rewrites identical files.

    Returns:
        The manifest path.
    """
    from tqdm.auto import tqdm

    from patchdpo_fast.data.files import save_image_atomic, write_quality_map
    from patchdpo_fast.data.manifest import GeneratedImage, Manifest, ManifestRecord

    pairs = ProceduralPairs(num_pairs, resolution=resolution, seed=seed, patch_size=patch_size)
    out = Path(out_dir)
    records = []
    for i in tqdm(range(num_pairs), desc="procedural pairs", disable=not progress):
        pair = pairs[i]
        name = f"{i:05d}"
        save_image_atomic(pair.ref_pixels, out / "references" / f"{name}.png")
        save_image_atomic(pair.gen_pixels, out / "generated" / f"{name}.png")
        write_quality_map(out / "maps" / f"{name}.q_ref.safetensors", pair.q_ref)
        write_quality_map(out / "maps" / f"{name}.q_gen.safetensors", pair.q_gen)
        subject = pair.subject
        records.append(
            ManifestRecord(
                id=f"pair-{name}",
                subject=f"{subject['texture']}-{subject['color']}-{subject['shape']}",
                prompt=pair.prompt,
                reference=f"references/{name}.png",
                generated=[
                    GeneratedImage(
                        image=f"generated/{name}.png",
                        q_ref=f"maps/{name}.q_ref.safetensors",
                        q_gen=f"maps/{name}.q_gen.safetensors",
                    )
                ],
                meta={"context": subject["context"], "corrupted_cells": int(pair.corrupted.sum())},
            )
        )
    header = {
        "map_size": [pairs.map_size, pairs.map_size],
        "created_by": "patchdpo_fast.data.procedural",
        "source": pairs.fingerprint(),
    }
    return Manifest(out / "manifest.jsonl", records, header).save()


def main(argv: Sequence[str] | None = None) -> int:
    """``patchdpo procedural-pairs``: write the procedural demo pairs as a manifest folder."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="patchdpo procedural-pairs",
        description="Write the built-in procedural pairs as PNG images + safetensors quality maps + manifest.jsonl.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (manifest at OUT/manifest.jsonl)")
    parser.add_argument("--num-pairs", type=int, default=64, help="number of pairs (default 64)")
    parser.add_argument("--resolution", type=int, default=64, help="square image side in pixels (default 64)")
    parser.add_argument("--patch-size", type=int, default=8, help="pixels per quality-map cell (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    args = parser.parse_args(argv)
    path = write_procedural_manifest(
        args.out, args.num_pairs, args.resolution, args.seed, args.patch_size, progress=True
    )
    print(f"wrote {args.num_pairs} pairs: {path}")
    return 0


if __name__ == "__main__":
    from patchdpo_fast.cli import run_command

    raise SystemExit(run_command("procedural-pairs", main))
