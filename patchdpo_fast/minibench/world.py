"""The miniature world of ``patchdpo minibench``: subjects whose identity lives in local detail, scenes from prompts.

A **subject** is a shape (circle, square, ...) with a body colour, a two-colour pattern (stripes, checks, dots,
rings, ...) and a small square emblem of a third colour at its centre. Shape and body colour are visible at a
glance; pattern and emblem are a few pixels wide at 32 px, exactly the kind of local detail a personalized
generator gets wrong and PatchDPO is meant to fix.

A **scene** is what a prompt asks for: a background kind (``on the beach``, ``in the snow``, ...; smooth layouts
drawn at random by :func:`render_background`), a position (left / center / right) and a scale (small /
large), e.g. ``"a small object in the snow, on the left"``. Position and scale are fully determined by the prompt,
so for every (subject, prompt) the renderer knows which pixels belong to the subject and what they must look like
(:meth:`MiniWorld.render`); only the background texture is random. The **reference** of a subject is its clean
render: large, centred, on a white background (like DreamBench's product photos).

Subjects are drawn from a seed; the last ``num_heldout`` of them are never used before evaluation (the generator
does not see them while pretraining, and ``build-pairs`` runs on the training subjects only). They are new
combinations of attribute values that the training subjects also use. Everything is a pure function of the world
seed and an item seed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from patchdpo_fast.data.procedural import CONTEXTS, shape_distance

__all__ = [
    "ATTRIBUTES",
    "BACKGROUNDS",
    "PALETTE",
    "PATTERNS",
    "POSITIONS",
    "SCALES",
    "SHAPES",
    "MiniWorld",
    "Render",
    "Scene",
    "Subject",
    "render_background",
]

#: Colours of bodies, patterns and emblems.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.1, 0.1),
    "green": (0.1, 0.62, 0.18),
    "blue": (0.12, 0.28, 0.9),
    "yellow": (0.97, 0.86, 0.1),
    "purple": (0.56, 0.16, 0.72),
    "orange": (0.98, 0.5, 0.06),
    "cyan": (0.08, 0.8, 0.85),
    "pink": (0.98, 0.5, 0.75),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "hexagon", "star")
PATTERNS: tuple[str, ...] = ("hstripes", "vstripes", "checks", "dots", "rings", "diagonal", "quarters")
BACKGROUNDS: tuple[str, ...] = ("beach", "forest", "city", "snow", "night", "grass", "desert", "table")
POSITIONS: dict[str, float] = {"left": 0.3, "center": 0.5, "right": 0.7}
SCALES: dict[str, float] = {"small": 0.17, "large": 0.27}
#: The subject attributes, in the order the identity judge predicts them.
ATTRIBUTES: tuple[str, ...] = ("shape", "body", "pattern", "pattern_color", "emblem")
#: Local attributes (small at 32 px), for the detail metrics; the others are global.
LOCAL_ATTRIBUTES: tuple[str, ...] = ("pattern", "pattern_color", "emblem")

_REFERENCE_RADIUS = 0.36
_REFERENCE_BACKGROUND = (1.0, 1.0, 1.0)
_SUBJECT_Y = 0.56
_EMBLEM_HALF = 0.2
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Subject:
    """One subject's identity: all attribute values are names (see :data:`ATTRIBUTES`)."""

    name: str
    shape: str
    body: str
    pattern: str
    pattern_color: str
    emblem: str

    def attribute_values(self) -> tuple[str, ...]:
        return tuple(getattr(self, a) for a in ATTRIBUTES)

    def describe(self) -> str:
        """E.g. ``red star, blue hstripes, yellow emblem``."""
        return f"{self.body} {self.shape}, {self.pattern_color} {self.pattern}, {self.emblem} emblem"


@dataclass(frozen=True)
class Scene:
    """What a prompt asks for."""

    background: str
    position: str
    scale: str

    @property
    def prompt(self) -> str:
        where = CONTEXTS[self.background]
        side = "in the center" if self.position == "center" else f"on the {self.position}"
        return f"a {self.scale} object {where}, {side}"

    def placement(self, size: int) -> tuple[float, float, float]:
        """``(cx, cy, radius)`` in pixels."""
        return POSITIONS[self.position] * size, _SUBJECT_Y * size, SCALES[self.scale] * size


@dataclass
class Render:
    """One rendered image and its ground truth.

    ``image`` ``(H, W, 3)`` float32 in [0, 1]; ``alpha`` ``(H, W)`` the subject's coverage; ``subject_rgb``
    ``(H, W, 3)`` the subject's colour wherever ``alpha > 0``; ``background`` the background alone.
    """

    image: np.ndarray
    alpha: np.ndarray
    subject_rgb: np.ndarray
    background: np.ndarray


def render_background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth ``(size, size, 3)`` background of a kind: large structures drawn at random, no pixel noise.

    Each kind has its own colours and layout (a horizon, trunks, buildings, dunes, ...), so a background is
    recognisable from a glance and cheap to learn: the model's capacity goes to the subject.
    """
    y, x = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    img = np.empty((size, size, 3), np.float32)

    def paint(mask: np.ndarray, color: tuple[float, float, float]) -> None:
        img[mask] = color

    def gradient(top: tuple[float, ...], bottom: tuple[float, ...]) -> np.ndarray:
        t = y[..., None]
        return (1 - t) * np.asarray(top, np.float32) + t * np.asarray(bottom, np.float32)

    u = rng.random(8).astype(np.float32)
    if kind == "beach":
        horizon = 0.3 + 0.15 * u[0]
        img[:] = gradient((0.55, 0.78, 0.98), (0.75, 0.9, 1.0))
        paint(y >= horizon, (0.1, 0.42, 0.75))
        shore = horizon + 0.12 + 0.04 * np.sin(7 * x + 6 * u[1])
        paint(y >= shore, (0.93, 0.84, 0.62))
    elif kind == "forest":
        img[:] = gradient((0.12, 0.38, 0.16), (0.06, 0.22, 0.08))
        for k in range(4):
            cx, w = (k + 0.3 + 0.4 * u[k]) / 4, 0.035 + 0.02 * u[4 + k]
            paint(np.abs(x - cx) < w, (0.36, 0.22, 0.1))
    elif kind == "city":
        img[:] = gradient((0.7, 0.72, 0.78), (0.6, 0.62, 0.68))
        for k in range(5):
            x0, top = k / 5 + 0.03 * u[k], 0.25 + 0.3 * u[(k + 3) % 8]
            shade = 0.3 + 0.12 * ((k + int(4 * u[7])) % 3)
            paint((x >= x0) & (x < x0 + 0.17) & (y > top), (shade, shade, shade + 0.04))
        paint(y > 0.88, (0.25, 0.25, 0.27))
    elif kind == "snow":
        img[:] = gradient((0.8, 0.86, 0.95), (0.97, 0.98, 1.0))
        hill = 0.45 + 0.08 * np.sin(5 * x + 6 * u[0])
        paint(y < hill, (0.66, 0.76, 0.9))
        img[y >= hill] = gradient((0.93, 0.95, 0.99), (1.0, 1.0, 1.0))[y >= hill]
    elif kind == "night":
        img[:] = gradient((0.02, 0.03, 0.12), (0.08, 0.1, 0.28))
        for k in range(6):
            sy, sx = int(u[k] * size * 0.8), int(((k + u[(k + 2) % 8]) / 6) * size) % size
            img[sy, sx] = (1.0, 1.0, 0.85)
    elif kind == "grass":
        stripe = 0.5 + 0.5 * np.sin(10 * y + 4 * u[0])
        img[:] = np.stack([0.22 + 0.06 * stripe, 0.55 + 0.12 * stripe, 0.16 + 0.04 * stripe], -1)
    elif kind == "desert":
        dune = 0.5 + 0.5 * np.sin(7 * x + 5 * y + 6 * u[0])
        img[:] = np.stack([0.86 + 0.08 * dune, 0.58 + 0.1 * dune, 0.26 + 0.06 * dune], -1)
        paint(y < 0.2 + 0.08 * u[1], (0.62, 0.82, 0.96))
    elif kind == "table":
        grain = 0.5 + 0.5 * np.sin(30 * y + 2.5 * np.sin(4 * x + 6 * u[0]))
        img[:] = np.stack([0.5 + 0.12 * grain, 0.3 + 0.08 * grain, 0.13 + 0.04 * grain], -1)
    else:
        raise ValueError(f"unknown background {kind!r}")
    return np.clip(img, 0.0, 1.0)


def _pattern_mix(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """1 where the pattern colour shows, 0 where the body colour does; local coordinates in [-1, 1]."""
    if pattern == "plain":
        return np.zeros_like(u)
    if pattern == "hstripes":
        return (np.sin(2.5 * math.pi * v + 0.3) > 0).astype(np.float32)
    if pattern == "vstripes":
        return (np.sin(2.5 * math.pi * u + 0.3) > 0).astype(np.float32)
    if pattern == "diagonal":
        return (np.sin(1.9 * math.pi * (u + v)) > 0).astype(np.float32)
    if pattern == "checks":
        return ((np.floor(2 * u + 2) + np.floor(2 * v + 2)) % 2).astype(np.float32)
    if pattern == "dots":
        fu, fv = np.mod(1.5 * u + 0.25, 1.0) - 0.5, np.mod(1.5 * v + 0.25, 1.0) - 0.5
        return (np.hypot(fu, fv) < 0.28).astype(np.float32)
    if pattern == "rings":
        return (np.sin(2.6 * math.pi * np.hypot(u, v)) < 0).astype(np.float32)
    if pattern == "quarters":
        return ((u > 0) == (v > 0)).astype(np.float32)
    raise ValueError(f"unknown pattern {pattern!r}")


class MiniWorld:
    """Subjects, scenes and the renderer of the mini world (see the module docstring).

    Args:
        num_subjects: subjects drawn from ``seed`` (all distinct).
        num_heldout: the last ``num_heldout`` subjects are held out for evaluation.
        resolution: image side in pixels.
        seed: world seed (subjects); backgrounds use per-image seeds.
    """

    def __init__(self, num_subjects: int = 64, num_heldout: int = 16, resolution: int = 32, seed: int = 0) -> None:
        if not 0 < num_heldout < num_subjects:
            raise ValueError(f"need 0 < num_heldout < num_subjects, got {num_heldout} and {num_subjects}")
        if resolution < 16 or resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 and >= 16, got {resolution}")
        self.resolution = resolution
        self.seed = seed
        self.subjects = self._draw_subjects(num_subjects, np.random.default_rng([seed, 7]))
        self.train_subjects = self.subjects[: num_subjects - num_heldout]
        self.heldout_subjects = self.subjects[num_subjects - num_heldout :]
        self.scenes = [Scene(b, p, s) for b, p, s in itertools.product(BACKGROUNDS, POSITIONS, SCALES)]
        self._by_name = {s.name: s for s in self.subjects}
        self._layers: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = {}

    # ------------------------------------------------------------------------------------------------ structure
    @staticmethod
    def _draw_subjects(n: int, rng: np.random.Generator) -> list[Subject]:
        colors = list(PALETTE)
        seen: set[tuple[str, ...]] = set()
        out: list[Subject] = []
        while len(out) < n:
            shape = SHAPES[rng.integers(len(SHAPES))]
            body, pattern_color, emblem = (colors[i] for i in rng.permutation(len(colors))[:3])
            pattern = PATTERNS[rng.integers(len(PATTERNS))]
            key = (shape, body, pattern, pattern_color, emblem)
            if key in seen:
                continue
            seen.add(key)
            out.append(Subject(f"s{len(out):02d}", *key))
        return out

    def subject(self, name: str) -> Subject:
        """The subject called ``name`` (``s00``, ``s01``, ...)."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no subject {name!r} in this world") from None

    def scene_from_prompt(self, prompt: str) -> Scene:
        """The scene a prompt of :attr:`Scene.prompt` describes."""
        for scene in self.scenes:
            if scene.prompt == prompt:
                return scene
        raise KeyError(f"not a mini-world prompt: {prompt!r}")

    def settings(self) -> dict[str, Any]:
        """JSON-serializable description (recorded in run folders)."""
        return {
            "resolution": self.resolution,
            "seed": self.seed,
            "num_subjects": len(self.subjects),
            "num_heldout": len(self.heldout_subjects),
            "subjects": [asdict(s) for s in self.subjects],
        }

    # ------------------------------------------------------------------------------------------------ rendering
    def _subject_layer(self, subject: Subject, cx: float, cy: float, radius: float) -> tuple[np.ndarray, np.ndarray]:
        """Supersampled subject colour ``(H, W, 3)`` and coverage ``(H, W)`` at pixel resolution (memoized)."""
        key = (subject, cx, cy, radius)
        if key not in self._layers:
            self._layers[key] = self._draw_subject(subject, cx, cy, radius)
        return self._layers[key]

    def _draw_subject(self, subject: Subject, cx: float, cy: float, radius: float) -> tuple[np.ndarray, np.ndarray]:
        size, ss = self.resolution, _SUPERSAMPLE
        coords = (np.arange(size * ss, dtype=np.float32) + 0.5) / ss
        y, x = np.meshgrid(coords, coords, indexing="ij")
        u, v = (x - cx) / radius, (y - cy) / radius
        inside = (shape_distance(subject.shape, u, v) < 0).astype(np.float32)
        mix = _pattern_mix(subject.pattern, u, v)[..., None]
        body = np.asarray(PALETTE[subject.body], np.float32)
        color = (1 - mix) * body + mix * np.asarray(PALETTE[subject.pattern_color], np.float32)
        emblem = ((np.abs(u) < _EMBLEM_HALF) & (np.abs(v) < _EMBLEM_HALF)).astype(np.float32)[..., None]
        color = (1 - emblem) * color + emblem * np.asarray(PALETTE[subject.emblem], np.float32)
        weighted = (color * inside[..., None]).reshape(size, ss, size, ss, 3).sum(axis=(1, 3))
        coverage = inside.reshape(size, ss, size, ss).sum(axis=(1, 3))
        rgb = np.where(coverage[..., None] > 0, weighted / np.maximum(coverage[..., None], 1e-6), 0.0)
        return rgb.astype(np.float32), (coverage / ss**2).astype(np.float32)

    def render(self, subject: Subject | str, scene: Scene | str, seed: int = 0) -> Render:
        """The subject in the scene (a :class:`Scene` or its prompt); ``seed`` draws the background texture."""
        subject = self.subject(subject) if isinstance(subject, str) else subject
        scene = self.scene_from_prompt(scene) if isinstance(scene, str) else scene
        rgb, alpha = self._subject_layer(subject, *scene.placement(self.resolution))
        background = render_background(scene.background, self.resolution, np.random.default_rng([self.seed, seed]))
        image = background * (1 - alpha[..., None]) + rgb * alpha[..., None]
        return Render(image.astype(np.float32), alpha.copy(), rgb.copy(), background.astype(np.float32))

    def render_reference(self, subject: Subject | str) -> Render:
        """The subject's clean reference: large, centred, on white."""
        subject = self.subject(subject) if isinstance(subject, str) else subject
        size = self.resolution
        rgb, alpha = self._subject_layer(subject, 0.5 * size, 0.5 * size, _REFERENCE_RADIUS * size)
        background = np.broadcast_to(np.asarray(_REFERENCE_BACKGROUND, np.float32), rgb.shape).copy()
        image = background * (1 - alpha[..., None]) + rgb * alpha[..., None]
        return Render(image.astype(np.float32), alpha.copy(), rgb.copy(), background)

    def reference_to_scene(self, scene: Scene) -> tuple[float, float, float]:
        """``(scale, shift_x, shift_y)`` mapping reference pixel coordinates to the scene's: ``p' = s p + t``."""
        size = self.resolution
        cx, cy, radius = scene.placement(size)
        s = radius / (_REFERENCE_RADIUS * size)
        return s, cx - s * 0.5 * size, cy - s * 0.5 * size

    def background_bank(self, background: str, count: int = 16, seed: int = 10_000) -> np.ndarray:
        """``count`` samples of a background kind ``(count, H, W, 3)``: what "a correct background" looks like."""
        return np.stack(
            [
                render_background(background, self.resolution, np.random.default_rng([self.seed, seed, i]))
                for i in range(count)
            ]
        ).astype(np.float32)

    # ------------------------------------------------------------------------------------------------ prompts
    def prompt_subset(self, index: int, count: int) -> list[Scene]:
        """``count`` scenes for the ``index``-th subject, rotating so that every scene is used equally often."""
        n = len(self.scenes)
        step = max(1, n // count)
        return [self.scenes[(index + k * step) % n] for k in range(count)]

    @staticmethod
    def pair_scenes(count: int) -> list[Scene]:
        """The prompts of pair building: backgrounds in turn, positions and scales varied, none an evaluation one."""
        positions, scales = ("left", "center", "right"), ("large", "small")
        return [
            Scene(BACKGROUNDS[i % len(BACKGROUNDS)], positions[(i + 1) % 3], scales[(i + 1) % 2]) for i in range(count)
        ]

    @staticmethod
    def eval_scenes() -> list[Scene]:
        """The fixed evaluation prompts: every background once, positions and scales balanced."""
        positions = ("left", "center", "right")
        return [Scene(b, positions[i % 3], "large" if i % 2 == 0 else "small") for i, b in enumerate(BACKGROUNDS)]


def attribute_classes() -> dict[str, Sequence[str]]:
    """The class names of every attribute (for the identity judge's heads)."""
    return {
        "shape": SHAPES,
        "body": tuple(PALETTE),
        "pattern": PATTERNS,
        "pattern_color": tuple(PALETTE),
        "emblem": tuple(PALETTE),
    }
