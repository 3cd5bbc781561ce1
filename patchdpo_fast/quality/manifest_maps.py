"""``patchdpo quality``: patch quality maps for every pair of a manifest (DESIGN.md section 1, step 2, offline).

::

    patchdpo quality --manifest data/pairs/manifest.jsonl [--estimator trained|tiny|DIR] [--batch-size 16]
                     [--map-size H[,W]] [--overwrite] [--visualize DIR] [--limit N] [--device auto|cpu|cuda]

For every training pair ``(reference, generated[k])`` of the manifest that has no quality maps yet (every pair with
``--overwrite``), in batches:

1. both images are read and resized (not cropped, as training does) to the estimator's input size;
2. :meth:`PatchQualityEstimator.estimate` gives the generated-side and reference-side maps on its patch grid;
3. the maps are resized to the manifest's training grid with :func:`resize_to_latent` (area when shrinking,
   bilinear when enlarging): ``--map-size``, else the header's ``map_size``, else the size of the maps already in
   the manifest, else the estimator's grid (training then averages or repeats them onto
   ``data.resolution / data.patch_size`` when the ratio is an integer);
4. they are written atomically as ``.safetensors`` next to the pairs
   (:meth:`~patchdpo_fast.data.Manifest.default_map_paths`: ``maps/<record id>/<k>.q_{ref,gen}.safetensors``) and
   recorded in the manifest, which is saved atomically after **every batch**.

So a killed run loses at most one batch: starting the same command again computes only what is missing. Maps that
are recorded but missing, unreadable or of another size than the target are recomputed. Every map file records the
tag of the estimator that made it (a hash of its settings and weights, in the file's safetensors metadata) and the
header key ``quality_maps`` records the estimator (kind, settings including its calibration, SHA-256 of its
weights): a run recomputes every map made by another estimator, or of unknown origin (maps written by
``procedural-pairs``, imported or older ones), so one manifest never mixes two estimators' maps and maps of a
replaced estimator are never reported as present. ``--overwrite`` recomputes every map, its own included.

``--visualize DIR`` writes one PNG per pair (``DIR/<record id>_<k>.png``): reference | generated | generated
quality | reference quality, the quality drawn as a red (0) -> yellow -> green (1) overlay on the training grid, with
labels, the prompt and a colour scale. Panels of pairs computed earlier are drawn from their stored maps when their
PNG does not exist yet.

Python: :func:`compute_manifest_maps` (used by the command line) returns a :class:`ManifestMapsSummary`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from patchdpo_fast.errors import UserError
from patchdpo_fast.quality.estimator import PatchQualityEstimator, QualityMaps, resize_to_latent
from patchdpo_fast.utils import resolve_device

__all__ = [
    "HEADER_KEY",
    "ManifestMapsSummary",
    "compute_manifest_maps",
    "estimator_identity",
    "estimator_tag",
    "load_estimator",
    "main",
    "map_estimator_tag",
    "pair_panel",
    "weights_digest",
]

logger = logging.getLogger(__name__)

#: Manifest header key recording which estimator computed the maps (see the module docstring).
HEADER_KEY = "quality_maps"
#: Metadata key of each map file holding the tag of the estimator that made it (:func:`estimator_tag`).
MAP_TAG_KEY = "estimator"
_TRAINED_NAMES = ("trained", "tiny-trained")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------------
# Estimator
# ----------------------------------------------------------------------------------------------------------------


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_estimator(
    spec: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> tuple[PatchQualityEstimator, str]:
    """The estimator named by ``spec`` and its kind (recorded in the manifest).

    ``"trained"`` (or ``"tiny-trained"``): the shipped tiny ViT trained by ``quality-train``
    (:meth:`PatchQualityEstimator.tiny_trained`); ``"tiny"``: the untrained tiny ViT of ``seed``; anything else: a
    folder for :meth:`PatchQualityEstimator.from_pretrained` (a ``quality-train`` output or a local ViT / DINOv2).

    Raises:
        FileNotFoundError: the folder does not exist (nothing is downloaded).
    """
    device = resolve_device(device, "device")
    name = str(spec)
    if name == "tiny":
        est = PatchQualityEstimator.tiny(seed=seed)
        est = est.to(device=device, dtype=dtype) if dtype is not None else est.to(device)
        return est, f"tiny(seed={seed})"
    if name in _TRAINED_NAMES:
        return PatchQualityEstimator.tiny_trained(device=device, dtype=dtype), "tiny-trained"
    folder = Path(name)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"quality estimator folder {name!r} does not exist: pass 'trained' (the shipped tiny checkpoint), "
            "'tiny' (untrained) or a folder written by `patchdpo quality-train` / a local ViT or DINOv2 folder "
            "(nothing is downloaded)"
        )
    return PatchQualityEstimator.from_pretrained(folder, device=device, dtype=dtype), "folder"


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state (every tensor's name, dtype, shape and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def estimator_identity(estimator: PatchQualityEstimator, kind: str, source: str | None = None) -> dict[str, Any]:
    """What the manifest header records about the estimator: its kind, its settings (image size, normalization,
    calibration, ...), the SHA-256 of its weights, the tag written into every map it makes
    (:func:`estimator_tag`) and, for information, where it came from."""
    settings = {k: v for k, v in estimator.config_dict().items() if k not in ("format", "version", "backbone")}
    settings["calibration"] = {k: v for k, v in settings["calibration"].items() if k != "info"}  # keep the anchors
    out: dict[str, Any] = {"kind": kind, "settings": json.loads(json.dumps(settings))}
    out["weights_sha256"] = weights_digest(estimator)
    out["tag"] = estimator_tag(out)
    if source is not None:
        out["source"] = source
    return out


def estimator_tag(identity: dict[str, Any]) -> str:
    """Short id of an estimator (settings and weights; not its name or location), stored in each map it writes."""
    keys = ("settings", "weights_sha256")
    text = json.dumps({k: identity.get(k) for k in keys}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def map_estimator_tag(path: str | Path) -> str | None:
    """The estimator tag stored in a quality-map file (None: not a safetensors map written with one)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as handle:
            return (handle.metadata() or {}).get(MAP_TAG_KEY)
    except Exception:  # unreadable: _map_ok reports it
        return None


# ----------------------------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ManifestMapsSummary:
    """What :func:`compute_manifest_maps` did.

    Attributes:
        manifest: the manifest file.
        estimator: the estimator's kind (``tiny-trained``, ``tiny(seed=0)``, ``folder``, ``custom``).
        map_size: ``(h, w)`` of the stored maps (the manifest's ``map_size``).
        estimator_grid: ``(h, w)`` of the estimator's patch grid.
        pairs: training pairs in the manifest.
        already_present: pairs whose valid maps were kept.
        invalid: recorded maps found missing, unreadable or of another size (cleared, to be recomputed).
        other_estimator: recorded maps made by another estimator, or of unknown origin (cleared, to be recomputed).
        computed: pairs computed by this run.
        remaining: pairs still without maps (``limit`` reached).
        batches: batches run (the manifest was saved after each one).
        seconds: wall time of the call.
        mean_q_ref, mean_q_gen: mean of the maps computed by this run (None when nothing was computed).
        panels: PNG files written by ``visualize``.
    """

    manifest: Path
    estimator: str
    map_size: tuple[int, int]
    estimator_grid: tuple[int, int]
    pairs: int = 0
    already_present: int = 0
    invalid: int = 0
    other_estimator: int = 0
    computed: int = 0
    remaining: int = 0
    batches: int = 0
    seconds: float = 0.0
    mean_q_ref: float | None = None
    mean_q_gen: float | None = None
    panels: list[Path] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Whether every pair of the manifest now has quality maps."""
        return self.remaining == 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["manifest"] = str(self.manifest)
        out["map_size"] = list(self.map_size)
        out["estimator_grid"] = list(self.estimator_grid)
        out["panels"] = [str(p) for p in self.panels]
        out["complete"] = self.complete
        return out

    def format(self) -> str:
        """One human-readable line."""
        rate = f" ({self.computed / self.seconds:.1f} pairs/s)" if self.computed and self.seconds > 0 else ""
        means = ""
        if self.mean_q_gen is not None:
            means = f"; mean q_gen {self.mean_q_gen:.3f}, q_ref {self.mean_q_ref:.3f}"
        return (
            f"quality maps: {self.computed} computed in {self.seconds:.1f} s{rate}, {self.already_present} already "
            f"present, {self.remaining} still missing of {self.pairs} pairs; {self.map_size[0]}x{self.map_size[1]} "
            f"maps (estimator {self.estimator}, grid {self.estimator_grid[0]}x{self.estimator_grid[1]}){means}"
            + (f"; {len(self.panels)} panels" if self.panels else "")
            + f" -> {self.manifest}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Images and panels
# ----------------------------------------------------------------------------------------------------------------


class _ImageReader:
    """Reads images resized to the estimator's input size; recent references are kept (a subject's reference is
    shared by many pairs)."""

    def __init__(self, size: tuple[int, int], keep: int = 32) -> None:
        self.size = size
        self.keep = keep
        self._cache: OrderedDict[Path, torch.Tensor] = OrderedDict()

    def read(self, path: Path, cache: bool = False) -> torch.Tensor:
        from patchdpo_fast.data.files import load_image

        if cache and path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        image = load_image(path)
        if tuple(image.shape[-2:]) != self.size:
            image = F.interpolate(image[None], size=self.size, mode="bilinear", antialias=True, align_corners=False)
            image = image[0].clamp_(0.0, 1.0)
        if cache:
            self._cache[path] = image
            if len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        return image


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` shortened with an ellipsis so it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def pair_panel(
    reference: torch.Tensor,
    generated: torch.Tensor,
    q_ref: torch.Tensor,
    q_gen: torch.Tensor,
    *,
    caption: str = "",
    size: int = 256,
    labels: Sequence[str] = ("reference", "generated", "generated quality", "reference quality"),
    marks: torch.Tensor | None = None,
):
    """One labelled PIL panel of a pair: reference | generated | generated quality | reference quality.

    ``reference`` / ``generated`` are ``(3, H, W)`` images in [0, 1]; ``q_ref`` / ``q_gen`` ``(h, w)`` maps in [0, 1]
    (any grid: each cell is drawn as a block). The tiles come from
    :func:`patchdpo_fast.quality.visualize.quality_panel`; this adds a title row (the quality tiles show their mean),
    a caption line (e.g. the prompt) and a red -> yellow -> green scale from 0 (does not match) to 1 (matches).
    ``marks`` (bool ``(gh, gw)``, optional) outlines those cells of the generated image on the generated-quality
    tile, e.g. the known corrupted cells of a synthetic pair.
    """
    from PIL import Image, ImageDraw

    from patchdpo_fast.quality.visualize import quality_colors, quality_panel

    q_ref = q_ref.detach().float().cpu()
    q_gen = q_gen.detach().float().cpu()
    maps = QualityMaps(q_gen[None], q_ref[None], q_gen[None], q_ref[None])
    tiles = quality_panel(reference.detach().cpu()[None], generated.detach().cpu()[None], maps, 0, size=size)
    gap = 4
    font = _font(max(11, size // 16))
    small = _font(max(10, size // 20))
    probe = ImageDraw.Draw(tiles)
    line_h = int(probe.textbbox((0, 0), "Ag", font=font)[3]) + 6
    top, bottom = line_h + 4, line_h + 8
    panel = Image.new("RGB", (tiles.width, tiles.height + top + bottom), "white")
    panel.paste(tiles, (0, top))
    draw = ImageDraw.Draw(panel)
    titles = list(labels)
    titles[2] = f"{titles[2]} (mean {float(q_gen.mean()):.2f})"
    titles[3] = f"{titles[3]} (mean {float(q_ref.mean()):.2f})"
    for i, title in enumerate(titles):
        x0 = i * (size + gap)
        text = _fit(draw, title, font, size - 4)
        draw.text((x0 + (size - draw.textlength(text, font=font)) / 2, 3), text, fill=(20, 20, 20), font=font)
    if marks is not None:
        _outline_cells(draw, marks, (2 * (size + gap), top), size)
    # colour scale at the bottom right, caption at the bottom left
    y = top + tiles.height + 5
    bar_w, bar_h = min(160, size), max(8, line_h - 10)
    scale_text = ("0 = wrong", "1 = matches")
    right_w = draw.textlength(scale_text[1], font=small)
    bar_x1 = panel.width - int(right_w) - 8
    bar_x0 = bar_x1 - bar_w
    ramp = quality_colors(np.linspace(0.0, 1.0, bar_w))
    strip = (np.repeat(ramp[None], bar_h, axis=0) * 255).round().astype(np.uint8)
    panel.paste(Image.fromarray(strip), (bar_x0, y + 2))
    draw.text((bar_x1 + 4, y), scale_text[1], fill=(20, 20, 20), font=small)
    left_w = draw.textlength(scale_text[0], font=small)
    draw.text((bar_x0 - left_w - 4, y), scale_text[0], fill=(20, 20, 20), font=small)
    if caption:
        room = int(bar_x0 - left_w - 16)
        if room > 40:
            draw.text((4, y), _fit(draw, caption, small, room), fill=(60, 60, 60), font=small)
    return panel


def _outline_cells(draw, marks: torch.Tensor, origin: tuple[int, int], size: int) -> None:
    """Draw the outline of the union of the marked cells of a ``size``-pixel tile at ``origin`` (white on black)."""
    m = marks.detach().bool().cpu().numpy()
    gh, gw = m.shape
    ys = [origin[1] + round(r * size / gh) for r in range(gh + 1)]
    xs = [origin[0] + round(c * size / gw) for c in range(gw + 1)]
    padded = np.pad(m, 1)
    segments = []
    for r in range(gh):
        for c in range(gw):
            if not m[r, c]:
                continue
            if not padded[r, c + 1]:  # above
                segments.append(((xs[c], ys[r]), (xs[c + 1], ys[r])))
            if not padded[r + 2, c + 1]:  # below
                segments.append(((xs[c], ys[r + 1]), (xs[c + 1], ys[r + 1])))
            if not padded[r + 1, c]:  # left
                segments.append(((xs[c], ys[r]), (xs[c], ys[r + 1])))
            if not padded[r + 1, c + 2]:  # right
                segments.append(((xs[c + 1], ys[r]), (xs[c + 1], ys[r + 1])))
    for width, color in ((4, (0, 0, 0)), (2, (255, 255, 255))):
        for a, b in segments:
            draw.line([a, b], fill=color, width=width)


def _panel_name(manifest: Any, record_id: str, k: int) -> str:
    return f"{manifest.default_map_paths(record_id, k)[0].parent.name}_{k}.png"


# ----------------------------------------------------------------------------------------------------------------
# The computation
# ----------------------------------------------------------------------------------------------------------------


def _as_size(value: int | Sequence[int] | None) -> tuple[int, int] | None:
    if value is None:
        return None
    h, w = (value, value) if isinstance(value, int) else tuple(value)
    if int(h) <= 0 or int(w) <= 0:
        raise ValueError(f"map size must be positive, got {value!r}")
    return int(h), int(w)


def _map_ok(manifest: Any, pair: Any, size: tuple[int, int] | None) -> tuple[bool, tuple[int, int] | None]:
    """Whether both recorded maps of ``pair`` are readable (and of ``size`` when given); their size."""
    from patchdpo_fast.data.files import probe_quality_map

    try:
        sizes = {probe_quality_map(pair.q_ref), probe_quality_map(pair.q_gen)}
    except (FileNotFoundError, ValueError):
        return False, None
    if len(sizes) != 1:
        return False, None
    found = sizes.pop()
    return (size is None or found == size), found


def compute_manifest_maps(
    manifest_path: str | Path,
    estimator: PatchQualityEstimator | str | Path = "trained",
    *,
    batch_size: int = 16,
    map_size: int | Sequence[int] | None = None,
    overwrite: bool = False,
    visualize: str | Path | None = None,
    limit: int | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    tiny_seed: int = 0,
    estimator_name: str | None = None,
    panel_size: int = 256,
) -> ManifestMapsSummary:
    """Compute the quality maps of every pair of a manifest that lacks them (see the module docstring).

    Args:
        manifest_path: the manifest ``.jsonl`` (updated in place, atomically, after every batch).
        estimator: a :class:`PatchQualityEstimator`, or ``"trained"`` / ``"tiny"`` / a folder (:func:`load_estimator`).
        batch_size: pairs per estimator call (and per manifest save).
        map_size: ``h`` or ``(h, w)`` of the stored maps (the training grid ``data.resolution / data.patch_size``);
            default: the manifest's ``map_size``, else the size of its existing maps, else the estimator's grid.
        overwrite: recompute every pair (all recorded maps are cleared first). Without it, maps made by another
            estimator (or of unknown origin) are recomputed too; only this estimator's valid maps are kept.
        visualize: folder for one PNG panel per pair (:func:`pair_panel`).
        limit: compute at most this many pairs in this call (the rest stays missing; call again to continue).
        progress: show a tqdm progress bar.
        device, dtype: where / in which dtype a named estimator is loaded (default: CUDA when available, fp32).
        tiny_seed: seed of the untrained ``"tiny"`` estimator.
        estimator_name: the kind recorded for an estimator instance (default ``"custom"``).
        panel_size: side of each panel tile in pixels.

    Raises:
        FileNotFoundError: no manifest, or no estimator folder.
        ManifestError: bad records (schema, unreadable images; all listed with their lines).
        ValueError: bad arguments.
    """
    from tqdm.auto import tqdm

    from patchdpo_fast.data.files import load_quality_map, save_image_atomic, write_quality_map
    from patchdpo_fast.data.manifest import Manifest, ManifestError

    t0 = time.perf_counter()
    path = Path(manifest_path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if limit is not None and int(limit) < 0:
        raise ValueError(f"limit must be >= 0, got {limit!r}")
    requested = _as_size(map_size)
    manifest = Manifest.load(path, check="none")  # schema only: the files are checked below
    original = manifest.to_text()

    if isinstance(estimator, PatchQualityEstimator):
        est, kind, source = estimator, estimator_name or "custom", None
    else:
        est, kind = load_estimator(estimator, device=device, dtype=dtype, seed=tiny_seed)
        source = None if kind != "folder" else str(Path(estimator).resolve())
    identity = estimator_identity(est, kind, source)
    grid = tuple(int(v) for v in est.grid_size)

    # 1. the target size and the recorded maps that stay: readable, of the target size, made by this estimator
    pairs = manifest.pairs()
    target = requested or manifest.map_size
    invalid = other = 0
    if overwrite:
        for p in pairs:
            if p.has_maps:
                manifest.set_quality_maps(p.record_id, p.k, None, None)
    else:
        tag = identity["tag"]
        for p in pairs:
            if not p.has_maps:
                continue
            ok, found = _map_ok(manifest, p, target)
            if ok and target is None:
                target = found
            if not ok:
                manifest.set_quality_maps(p.record_id, p.k, None, None)
                invalid += 1
            elif not map_estimator_tag(p.q_ref) == map_estimator_tag(p.q_gen) == tag:
                manifest.set_quality_maps(p.record_id, p.k, None, None)
                other += 1
        if other:
            previous = (manifest.header.get(HEADER_KEY) or {}).get("estimator", {})
            logger.warning(
                "%s: %d pair(s) have quality maps made by another estimator (%s) or of unknown origin; they are "
                "recomputed with this one (%s)",
                path, other, previous.get("kind", "unknown") if isinstance(previous, dict) else "unknown", kind,
            )  # fmt: skip
        if invalid:
            logger.warning(
                "%s: %d pair(s) had missing, unreadable or not %s quality maps; they are recomputed",
                path, invalid, "x".join(map(str, target)) if target else "uniformly sized",
            )  # fmt: skip
    target = target or grid
    kept = sum(1 for p in manifest.pairs() if p.has_maps)

    # 2. every image must be readable before any work
    report = manifest.validate("quick")
    if not report.ok:
        raise ManifestError(f"{report.num_bad} bad record(s); fix or remove them first", path, report.problems)

    todo = manifest.pairs_missing_maps()
    missing_total = len(todo)
    if limit is not None:
        todo = todo[: int(limit)]
    if todo or invalid or other or overwrite:
        manifest.map_size = target
    if todo:
        manifest.header[HEADER_KEY] = {
            "estimator": identity,
            "estimator_grid": list(grid),
            "map_size": list(target),
            "created_by": "patchdpo_fast.quality.manifest_maps",
        }
    if manifest.to_text() != original:
        manifest.save()  # cleared maps and the header are on disk before the first batch

    summary = ManifestMapsSummary(
        manifest=path,
        estimator=kind,
        map_size=target,
        estimator_grid=grid,
        pairs=len(pairs),
        already_present=kept,
        invalid=invalid,
        other_estimator=other,
    )
    panels_dir = Path(visualize) if visualize is not None else None
    if panels_dir is not None:
        panels_dir.mkdir(parents=True, exist_ok=True)
    reader = _ImageReader(est.image_size)
    sums = [0.0, 0.0]

    # 3. the batches
    bar = tqdm(total=len(todo), desc="quality maps", unit="pair", disable=not progress, dynamic_ncols=True)
    try:
        for start in range(0, len(todo), int(batch_size)):
            batch = todo[start : start + int(batch_size)]
            refs = torch.stack([reader.read(p.reference, cache=True) for p in batch])
            gens = torch.stack([reader.read(p.generated) for p in batch])
            maps = est.estimate(refs, gens)
            q_ref, q_gen = (m.float().cpu() for m in resize_to_latent(maps, target))
            for i, p in enumerate(batch):
                ref_file, gen_file = manifest.default_map_paths(p.record_id, p.k)
                write_quality_map(ref_file, q_ref[i], metadata={MAP_TAG_KEY: identity["tag"]})
                write_quality_map(gen_file, q_gen[i], metadata={MAP_TAG_KEY: identity["tag"]})
                manifest.set_quality_maps(p.record_id, p.k, ref_file, gen_file)
                if panels_dir is not None:
                    panel = pair_panel(refs[i], gens[i], q_ref[i], q_gen[i], caption=p.prompt, size=panel_size)
                    summary.panels.append(
                        save_image_atomic(panel, panels_dir / _panel_name(manifest, p.record_id, p.k))
                    )
            manifest.save()
            sums[0] += float(q_ref.mean(dim=(1, 2)).sum())
            sums[1] += float(q_gen.mean(dim=(1, 2)).sum())
            summary.computed += len(batch)
            summary.batches += 1
            bar.update(len(batch))
    finally:
        bar.close()

    # 4. panels of pairs computed earlier
    if panels_dir is not None:
        done = {(p.record_id, p.k) for p in todo}
        for p in manifest.pairs():
            out = panels_dir / _panel_name(manifest, p.record_id, p.k)
            if not p.has_maps or (p.record_id, p.k) in done or out.exists():
                continue
            q_ref_i = load_quality_map(p.q_ref, target, p.record_id)
            q_gen_i = load_quality_map(p.q_gen, target, p.record_id)
            panel = pair_panel(
                reader.read(p.reference, cache=True), reader.read(p.generated), q_ref_i, q_gen_i,
                caption=p.prompt, size=panel_size,
            )  # fmt: skip
            summary.panels.append(save_image_atomic(panel, out))

    summary.remaining = missing_total - summary.computed
    if summary.computed:
        summary.mean_q_ref = sums[0] / summary.computed
        summary.mean_q_gen = sums[1] / summary.computed
    summary.seconds = time.perf_counter() - t0
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def _parse_map_size(text: str) -> tuple[int, int]:
    parts = [s for s in text.lower().replace("x", ",").split(",") if s.strip()]
    try:
        values = [int(s) for s in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H or H,W (positive integers), got {text!r}") from None
    if len(values) not in (1, 2) or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected H or H,W (positive integers), got {text!r}")
    return (values[0], values[-1])


def build_parser() -> argparse.ArgumentParser:
    """The ``patchdpo quality`` argument parser."""
    p = argparse.ArgumentParser(
        prog="patchdpo quality",
        description="Compute patch quality maps for every pair of a manifest that lacks them (resumable; the "
        "manifest is updated after every batch).",
    )
    p.add_argument("--manifest", required=True, type=Path, help="the pair manifest (.jsonl), updated in place")
    p.add_argument(
        "--estimator",
        default="trained",
        help="'trained' (shipped tiny checkpoint, default), 'tiny' (untrained) or an estimator / ViT / DINOv2 folder",
    )
    p.add_argument("--batch-size", type=int, default=16, help="pairs per batch and per manifest save (default 16)")
    p.add_argument(
        "--map-size",
        type=_parse_map_size,
        default=None,
        metavar="H[,W]",
        help="stored map size, the training grid data.resolution/data.patch_size (default: the manifest's "
        "map_size, else its existing maps' size, else the estimator's grid)",
    )
    p.add_argument("--overwrite", action="store_true", help="recompute every pair (without it: the pairs without "
                   "maps of this estimator)")  # fmt: skip
    p.add_argument("--visualize", type=Path, default=None, metavar="DIR", help="write one PNG panel per pair here")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="compute at most N pairs in this run")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', ...")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32", help="estimator dtype (default fp32)")
    p.add_argument("--tiny-seed", type=int, default=0, help="seed of the untrained tiny estimator (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the summary as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``patchdpo quality``; user errors propagate to :func:`patchdpo_fast.cli.run_command` (one line, status 2)."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.limit is not None and args.limit < 0:
        parser.error("--limit must be >= 0")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.visualize is not None and args.visualize.exists() and not args.visualize.is_dir():
        raise UserError(
            f"--visualize {args.visualize} is a file; expected a folder for the panels (created if missing)"
        )
    summary = compute_manifest_maps(
        args.manifest,
        args.estimator,
        batch_size=args.batch_size,
        map_size=args.map_size,
        overwrite=args.overwrite,
        visualize=args.visualize,
        limit=args.limit,
        progress=not args.no_progress,
        device=device,
        dtype=_DTYPES[args.dtype],
        tiny_seed=args.tiny_seed,
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    print(summary.format())
    return 0


if __name__ == "__main__":
    from patchdpo_fast.cli import run_command

    raise SystemExit(run_command("quality", main))
