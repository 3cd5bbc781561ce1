"""Off-grid synthetic defects with patch labels from the covered fraction (the honest benchmark and the training
recipe of issue 11).

A "generated" view of a photo is made in four steps, every draw from an explicit ``torch.Generator``:

1. **Global changes that are not defects** (:class:`GlobalChange`): horizontal flip, crop-rescale (zoom), small
   rotation, brightness / contrast / saturation / hue jitter (before the defects), and a slight blur of the whole
   image and JPEG re-encoding (after them, so defect edges go through them too).
2. **Regions not aligned to the patch grid** (:class:`DefectRecipe`): 1-N regions per image, each a rotated
   rectangle, an ellipse or an irregular blob (a thresholded smooth random field inside an ellipse), of any size
   (side log-uniform in a fraction of the image side), anywhere, with soft (feathered) edges. The region's soft
   mask ``alpha`` blends the altered image into the view: ``out = (1 - alpha) * out + alpha * altered``.
3. **Defect families** of the kind diffusion models make (:data:`FAMILIES`):

   * ``smear``: texture smeared: Gaussian blur or a directional (motion) blur;
   * ``recolor``: wrong colour of a part: hue rotation, a colour cast and a saturation change;
   * ``missing``: a part removed: filled smoothly from the surrounding pixels (normalized convolution);
   * ``duplicate``: a part duplicated: content copied from elsewhere in the same image (optionally mirrored);
   * ``foreign``: a foreign object: content of another photo, or a synthetic coloured object;
   * ``resample``: local resampling: pixelation, low resolution, a local elastic warp or shuffled blocks.

4. **Labels from coverage**: the covered fraction of every patch-grid cell is the mean of the union mask over the
   cell's pixels (:attr:`DefectPairs.coverage`). :func:`coverage_labels` turns it into 0 (clean: coverage at most
   ``clean_max``), 1 (more than ``positive_min`` covered *and* visibly changed) or -1 (partly covered, or covered
   without a visible change, e.g. a blurred flat background), which is what the benchmark grades.

Two recipes exist on purpose: :data:`BENCHMARK_RECIPE` / :data:`BENCHMARK_CHANGE` (``quality-eval``) and
:data:`TRAIN_RECIPE` / :data:`TRAIN_CHANGE` (``quality-train``) use the same families but draw their parameters
from different ranges and laws, so the benchmark is not a replay of the training distribution.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from patchdpo_fast.quality.synthetic import (
    Geometry,
    Photometric,
    SyntheticPairs,
    _hue_matrix,
    _resize,
    apply_photometric,
    gaussian_blur,
    map_cells,
    sample_affine,
    warp,
)

__all__ = [
    "BENCHMARK_CHANGE",
    "BENCHMARK_RECIPE",
    "FAMILIES",
    "FAMILY_ALIASES",
    "SHAPES",
    "TRAIN_CHANGE",
    "TRAIN_RECIPE",
    "DefectPairs",
    "DefectRecipe",
    "GlobalChange",
    "coverage_labels",
    "make_defect_pairs",
    "parse_families",
    "region_mask",
]

#: Defect families, in the order of their codes (code = index + 1; 0 = clean).
FAMILIES = ("smear", "recolor", "missing", "duplicate", "foreign", "resample")
#: Names of the grid-aligned corruption kinds of :mod:`.synthetic` accepted for the family they belong to.
FAMILY_ALIASES = {"blur": "smear", "paste": "foreign", "shuffle": "resample"}
#: Region shapes.
SHAPES = ("rect", "ellipse", "blob")


def parse_families(value: str | list[str] | tuple[str, ...] | None, *, default: tuple[str, ...] = FAMILIES) -> tuple:
    """``"smear,paste"`` / a list -> a tuple of family names (aliases resolved, order kept, duplicates dropped).

    Raises ValueError naming the unknown entries.
    """
    if value is None:
        return tuple(default)
    items = [value] if isinstance(value, str) else list(value)
    names = [s.strip() for item in items for s in item.split(",") if s.strip()]
    bad = [n for n in names if n not in FAMILIES and n not in FAMILY_ALIASES]
    if bad:
        raise ValueError(
            f"unknown defect families {bad}; choose from {', '.join(FAMILIES)} "
            f"(aliases: {', '.join(f'{k}={v}' for k, v in FAMILY_ALIASES.items())})"
        )
    out: list[str] = []
    for n in names:
        n = FAMILY_ALIASES.get(n, n)
        if n not in out:
            out.append(n)
    if not out:
        raise ValueError("no defect family given")
    return tuple(out)


_BENCH_GEOMETRY = Geometry(flip_p=0.5, zoom=(1.0, 1.35), rotate_deg=6.0)
_BENCH_PHOTOMETRIC = Photometric(brightness=0.2, contrast=0.2, saturation=0.1, hue_deg=6.0)


@dataclass(frozen=True)
class GlobalChange:
    """A global change of the whole view that is *not* a defect (every patch stays "clean")."""

    geometry: Geometry = _BENCH_GEOMETRY
    photometric: Photometric | None = _BENCH_PHOTOMETRIC
    blur_p: float = 0.3  # probability of a slight blur of the whole image (after the defects)
    blur_sigma_px: tuple[float, float] = (0.3, 0.9)
    jpeg_p: float = 0.5  # probability of JPEG re-encoding (last)
    jpeg_quality: tuple[int, int] = (55, 90)

    @classmethod
    def none(cls) -> GlobalChange:
        return cls(geometry=Geometry.identity(), photometric=None, blur_p=0.0, jpeg_p=0.0)


@dataclass(frozen=True)
class DefectRecipe:
    """How the local defects are drawn. Sizes are fractions of the image side unless marked ``_px`` (pixels at the
    output size)."""

    families: tuple[str, ...] = FAMILIES
    family_weights: tuple[float, ...] | None = None  # relative frequency per family (None: uniform)
    regions: tuple[int, int] = (1, 3)  # regions per image, inclusive
    side: tuple[float, float] = (0.05, 0.30)  # region side (log-uniform)
    aspect: tuple[float, float] = (0.5, 2.0)  # height / width (log-uniform)
    shapes: tuple[str, ...] = SHAPES
    feather_px: tuple[float, float] = (0.0, 2.5)  # Gaussian sigma of the soft edge
    smear_sigma_px: tuple[float, float] = (1.5, 5.0)
    smear_length_px: tuple[int, int] = (7, 19)
    recolor_hue_deg: tuple[float, float] = (50.0, 180.0)
    recolor_cast: tuple[float, float] = (0.06, 0.22)
    recolor_saturation: tuple[float, float] = (0.4, 1.6)
    duplicate_min_shift: float = 1.2  # minimum shift in region sizes
    foreign_synthetic_p: float = 0.25  # a synthetic coloured object instead of another photo's content
    resample_factor: tuple[int, int] = (3, 8)  # pixelation / low-resolution factor
    warp_px: tuple[float, float] = (3.0, 8.0)  # amplitude of the local elastic warp
    shuffle_block_px: tuple[int, int] = (6, 14)
    min_change: float = 0.03  # mean |pixel change| over the covered part below which a covered cell is ignored

    def __post_init__(self) -> None:
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families:
            raise ValueError(f"DefectRecipe: unknown families {bad}; choose from {', '.join(FAMILIES)}")
        bad_shapes = [s for s in self.shapes if s not in SHAPES]
        if bad_shapes or not self.shapes:
            raise ValueError(f"DefectRecipe: unknown shapes {bad_shapes}; choose from {', '.join(SHAPES)}")
        if self.family_weights is not None and len(self.family_weights) != len(self.families):
            raise ValueError("DefectRecipe: `family_weights` needs one weight per family")

    def only(self, families: tuple[str, ...] | list[str]) -> DefectRecipe:
        """The same recipe restricted to ``families`` (weights kept for the remaining ones)."""
        fams = tuple(families)
        weights = None
        if self.family_weights is not None:
            table = dict(zip(self.families, self.family_weights, strict=True))
            weights = tuple(table.get(f, 1.0) for f in fams)
        return replace(self, families=fams, family_weights=weights)

    def without(self, families: tuple[str, ...] | list[str]) -> DefectRecipe:
        """The same recipe without ``families`` (leave-one-family-out training)."""
        rest = tuple(f for f in self.families if f not in set(families))
        if not rest:
            raise ValueError(f"DefectRecipe: excluding {list(families)} leaves no family")
        return self.only(rest)


#: The benchmark's draws (quality-eval): fixed, never tuned on results.
BENCHMARK_RECIPE = DefectRecipe()
BENCHMARK_CHANGE = GlobalChange()
#: The training draws: same families, other ranges and laws (more, smaller and larger regions, stronger
#: and weaker defects, stronger global changes, and the reference view changes too).
TRAIN_RECIPE = DefectRecipe(
    regions=(1, 5),
    side=(0.03, 0.40),
    aspect=(0.35, 2.8),
    feather_px=(0.0, 4.0),
    smear_sigma_px=(1.0, 7.0),
    smear_length_px=(5, 25),
    recolor_hue_deg=(30.0, 180.0),
    recolor_cast=(0.04, 0.3),
    recolor_saturation=(0.25, 1.9),
    duplicate_min_shift=1.0,
    foreign_synthetic_p=0.35,
    resample_factor=(2, 10),
    warp_px=(2.0, 10.0),
    shuffle_block_px=(4, 18),
    min_change=0.025,
)
TRAIN_CHANGE = GlobalChange(
    geometry=Geometry(flip_p=0.5, zoom=(1.0, 1.5), rotate_deg=10.0),
    photometric=Photometric(brightness=0.25, contrast=0.25, saturation=0.25, hue_deg=12.0),
    blur_p=0.35,
    blur_sigma_px=(0.2, 1.2),
    jpeg_p=0.5,
    jpeg_quality=(40, 95),
)
TRAIN_REF_CHANGE = GlobalChange(
    geometry=Geometry(flip_p=0.5, zoom=(1.0, 1.2), rotate_deg=3.0),
    photometric=Photometric(brightness=0.1, contrast=0.1, saturation=0.1, hue_deg=5.0),
    blur_p=0.1,
    blur_sigma_px=(0.2, 0.8),
    jpeg_p=0.3,
    jpeg_quality=(50, 95),
)


@dataclass
class DefectPairs(SyntheticPairs):
    """:class:`~.synthetic.SyntheticPairs` with off-grid defects.

    Extra attributes:
        coverage: ``(N, gh, gw)`` float, covered fraction of every generated cell in [0, 1].
        change: ``(N, gh, gw)`` float, mean absolute pixel change of every cell caused by the defects.
        alpha: ``(N, H, W)`` float, the union mask of the defects at pixel resolution.
        quality: ``(N, gh, gw)`` float soft target, ``1 - coverage`` where the defect visibly changed the cell
            (mean change over the covered part at least ``min_change``), 1 where it did not.

    ``labels`` come from :func:`coverage_labels` with the recipe's ``min_change``; ``kinds`` is the family code
    (``FAMILIES`` index + 1) covering most of each cell, 0 where nothing covers it.
    """

    coverage: torch.Tensor | None = None
    change: torch.Tensor | None = None
    alpha: torch.Tensor | None = None
    quality: torch.Tensor | None = None


def coverage_labels(
    coverage: torch.Tensor,
    change: torch.Tensor,
    *,
    clean_max: float = 0.01,
    positive_min: float = 0.5,
    min_change: float = 0.03,
) -> torch.Tensor:
    """int8 labels of cells from their covered fraction and pixel change.

    0 (clean): ``coverage <= clean_max``; 1 (corrupted): ``coverage > positive_min`` and the mean change over the
    covered part (``change / coverage``) at least ``min_change``; -1 (left out) otherwise.
    """
    labels = torch.full(coverage.shape, -1, dtype=torch.int8)
    labels[coverage <= clean_max] = 0
    visible = change >= min_change * coverage
    labels[(coverage > positive_min) & visible] = 1
    return labels


# ------------------------------------------------------------------------------------------------------ sampling
def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(1, generator=g))


def _logu(g: torch.Generator, lo: float, hi: float) -> float:
    return math.exp(_u(g, math.log(lo), math.log(hi)))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:  # inclusive
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def _choice(g: torch.Generator, items: tuple, weights: tuple[float, ...] | None = None):
    if weights is None:
        return items[_randint(g, 0, len(items) - 1)]
    w = torch.tensor(weights, dtype=torch.float64)
    return items[int(torch.multinomial(w / w.sum(), 1, generator=g))]


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(C, H, W)`` with replicate padding; identity below sigma 0.05."""
    if sigma <= 0.05:
        return x
    return gaussian_blur(x, sigma, max_radius=min(x.shape[-1], x.shape[-2]) - 1)


def region_mask(
    size: tuple[int, int],
    center: tuple[float, float],
    radii: tuple[float, float],
    angle: float,
    shape: str,
    feather_px: float = 0.0,
    g: torch.Generator | None = None,
) -> torch.Tensor:
    """Soft mask ``(H, W)`` in [0, 1] of one region: ``center`` (y, x) and ``radii`` (half height, half width) in
    pixels, rotated by ``angle`` radians; ``blob`` needs ``g`` for its random boundary. ``feather_px`` softens the
    edge with a Gaussian of that sigma."""
    h, w = size
    # work in a window around the region (the shape never reaches past 1.5 radii; the soft edge past 3 sigma)
    reach = 1.5 * max(radii) + 3.0 * feather_px + 2.0
    wy0, wy1 = max(0, math.floor(center[0] - reach)), min(h, math.ceil(center[0] + reach))
    wx0, wx1 = max(0, math.floor(center[1] - reach)), min(w, math.ceil(center[1] + reach))
    out = torch.zeros(h, w)
    if wy1 <= wy0 or wx1 <= wx0:
        return out
    ys = torch.arange(wy0, wy1, dtype=torch.float32)[:, None] + 0.5 - center[0]
    xs = torch.arange(wx0, wx1, dtype=torch.float32)[None, :] + 0.5 - center[1]
    cos, sin = math.cos(angle), math.sin(angle)
    u = cos * xs + sin * ys  # along the region's width
    v = -sin * xs + cos * ys  # along its height
    ry, rx = max(radii[0], 0.5), max(radii[1], 0.5)
    if shape == "rect":
        inside = (u.abs() <= rx) & (v.abs() <= ry)
    elif shape == "ellipse":
        inside = (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
    elif shape == "blob":
        if g is None:
            raise ValueError("region_mask: shape 'blob' needs a generator `g`")
        field = torch.randn(1, 1, 5, 5, generator=g)
        grid = torch.stack([u / (1.3 * rx), v / (1.3 * ry)], dim=-1)[None].clamp(-1.0, 1.0)
        noise = F.grid_sample(field, grid, mode="bicubic", padding_mode="border", align_corners=True)[0, 0]
        r = torch.sqrt((u / rx) ** 2 + (v / ry) ** 2)
        inside = r <= 0.8 + 0.3 * noise.clamp(-2.0, 2.0)  # stays within 1.4 radii
        if not inside.any():  # a degenerate draw: fall back to the ellipse
            inside = r <= 1.0
    else:
        raise ValueError(f"region_mask: unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    m = inside.float()
    if feather_px > 0.05:
        pad = math.ceil(3 * feather_px) + 1
        m = F.pad(m[None, None], (pad, pad, pad, pad))[0]
        m = _blur(m, feather_px)[0][pad:-pad, pad:-pad]
    out[wy0:wy1, wx0:wx1] = m.clamp(0.0, 1.0)
    return out


# ------------------------------------------------------------------------------------------------------ families
def _smear(x: torch.Tensor, r: DefectRecipe, g: torch.Generator) -> torch.Tensor:
    if float(torch.rand(1, generator=g)) < 0.5:
        return _blur(x, _u(g, *r.smear_sigma_px))
    length = _randint(g, *r.smear_length_px)
    theta = _u(g, 0.0, math.pi)
    offsets = [t - (length - 1) / 2 for t in range(length)]
    shifts = [(round(t * math.sin(theta)), round(t * math.cos(theta))) for t in offsets]
    pad = max(max(abs(a), abs(b)) for a, b in shifts)
    _, h, w = x.shape
    xp = F.pad(x[None], (pad, pad, pad, pad), mode="replicate")[0]
    acc = torch.zeros_like(x)
    for dy, dx in shifts:
        acc += xp[:, pad + dy : pad + dy + h, pad + dx : pad + dx + w]
    return acc / len(shifts)


def _recolor(x: torch.Tensor, r: DefectRecipe, g: torch.Generator) -> torch.Tensor:
    sign = 1.0 if float(torch.rand(1, generator=g)) < 0.5 else -1.0
    rot = _hue_matrix(torch.tensor([sign * math.radians(_u(g, *r.recolor_hue_deg))]))[0].to(x)
    y = torch.einsum("ij,jhw->ihw", rot, x)
    gray = (y * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
    y = gray + _u(g, *r.recolor_saturation) * (y - gray)
    direction = torch.randn(3, generator=g)
    cast = direction / direction.norm().clamp(min=1e-6) * _u(g, *r.recolor_cast)
    return y + cast.view(3, 1, 1)


def _missing(x: torch.Tensor, hard: torch.Tensor, radius: float) -> torch.Tensor:
    """Fill the hard mask from the surrounding pixels (normalized convolution at quarter resolution)."""
    _, h, w = x.shape
    f = 4 if min(h, w) >= 32 else 1
    keep = (1.0 - hard)[None]
    num = F.avg_pool2d((x * keep)[None], f)[0]
    den = F.avg_pool2d(keep[None], f)[0]
    sigma = max(1.0, radius / f / 1.5)
    num, den = _blur(num, sigma), _blur(den, sigma)
    fill = num / den.clamp(min=1e-4)
    fallback = (x * keep).sum(dim=(1, 2), keepdim=True) / keep.sum().clamp(min=1.0)
    fill = torch.where(den > 1e-3, fill, fallback)
    return F.interpolate(fill[None], size=(h, w), mode="bilinear", align_corners=False)[0]


def _duplicate(
    x: torch.Tensor, center: tuple[float, float], radii: tuple[float, float], r: DefectRecipe, g: torch.Generator
) -> torch.Tensor:
    w = x.shape[-1]
    dist = r.duplicate_min_shift * 2 * max(radii) * _u(g, 1.0, 1.8)
    phi = _u(g, 0.0, 2 * math.pi)
    dy, dx = round(dist * math.sin(phi)), round(dist * math.cos(phi))
    y = torch.roll(x, shifts=(dy, dx), dims=(1, 2))
    if float(torch.rand(1, generator=g)) < 0.3:  # a mirrored duplicate (mirrored about the region's centre)
        cols = (round(2 * center[1]) - 1 - torch.arange(w)) % w
        y = y[:, :, cols]
    return y


def _foreign(x: torch.Tensor, donor: torch.Tensor, r: DefectRecipe, g: torch.Generator) -> torch.Tensor:
    _, h, w = x.shape
    if float(torch.rand(1, generator=g)) < r.foreign_synthetic_p:
        # a synthetic object: a random colour with a linear shading and a stripe texture
        ys = torch.linspace(0, 1, h)[:, None]
        xs = torch.linspace(0, 1, w)[None, :]
        c0, c1 = torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g)
        t = _u(g, 0.0, 1.0)
        shade = (t * ys + (1 - t) * xs)[None]
        freq, phase = _u(g, 4.0, 30.0), _u(g, 0.0, 6.28)
        stripes = 0.1 * torch.sin(2 * math.pi * freq * (xs * math.cos(phase) + ys * math.sin(phase)))[None]
        return c0 * (1 - shade) + c1 * shade + stripes
    d = _resize(donor[None], (h, w))[0]
    if float(torch.rand(1, generator=g)) < 0.5:
        d = d.flip(-1)
    return torch.roll(d, shifts=(_randint(g, 0, h - 1), _randint(g, 0, w - 1)), dims=(1, 2))


def _resample(x: torch.Tensor, box: tuple[int, int, int, int], r: DefectRecipe, g: torch.Generator) -> torch.Tensor:
    _, h, w = x.shape
    variant = _randint(g, 0, 3)
    if variant == 0:  # pixelation
        f = _randint(g, *r.resample_factor)
        small = F.avg_pool2d(x[None], f, ceil_mode=True)
        return F.interpolate(small, scale_factor=f, mode="nearest")[0, :, :h, :w]
    if variant == 1:  # low resolution, smooth upsampling
        f = _randint(g, *r.resample_factor)
        small = F.interpolate(x[None], size=(max(1, h // f), max(1, w // f)), mode="area")
        return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]
    if variant == 2:  # local elastic warp
        amp = _u(g, *r.warp_px)
        field = torch.randn(1, 2, 6, 6, generator=g)
        disp = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=True)[0]
        disp = disp / disp.abs().amax().clamp(min=1e-6) * amp
        ys, xs = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
        gx = (xs + disp[0] + 0.5) / w * 2 - 1
        gy = (ys + disp[1] + 0.5) / h * 2 - 1
        grid = torch.stack([gx, gy], dim=-1)[None]
        return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]
    # shuffled blocks inside the region's bounding box
    y0, y1, x0, x1 = box
    b = _randint(g, *r.shuffle_block_px)
    ny, nx = (y1 - y0) // b, (x1 - x0) // b
    out = x.clone()
    if ny * nx >= 2:
        win = x[:, y0 : y0 + ny * b, x0 : x0 + nx * b]
        blocks = win.reshape(3, ny, b, nx, b).permute(1, 3, 0, 2, 4).reshape(-1, 3, b, b)
        perm = torch.randperm(ny * nx, generator=g)
        if bool((perm == torch.arange(ny * nx)).all()):
            perm = perm.roll(1)
        out[:, y0 : y0 + ny * b, x0 : x0 + nx * b] = (
            blocks[perm].reshape(ny, nx, 3, b, b).permute(2, 0, 3, 1, 4).reshape(3, ny * b, nx * b)
        )
    else:  # too small for blocks: smear it instead
        out = _smear(x, r, g)
    return out


def _apply_defects(
    img: torch.Tensor, donor: torch.Tensor, recipe: DefectRecipe, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Defects on one ``(3, H, W)`` view: returns (image, union alpha (H, W), per-family alpha (F, H, W))."""
    _, h, w = img.shape
    side = min(h, w)
    out = img.clone()
    fam_alpha = torch.zeros(len(FAMILIES), h, w)
    for _ in range(_randint(g, *recipe.regions)):
        family = _choice(g, recipe.families, recipe.family_weights)
        s = _logu(g, *recipe.side) * side
        aspect = _logu(g, *recipe.aspect)
        ry, rx = 0.5 * s * math.sqrt(aspect), 0.5 * s / math.sqrt(aspect)
        cy, cx = _u(g, 0.0, h), _u(g, 0.0, w)
        shape = _choice(g, recipe.shapes)
        angle = _u(g, 0.0, math.pi) if float(torch.rand(1, generator=g)) < 0.6 else 0.0
        alpha = region_mask((h, w), (cy, cx), (ry, rx), angle, shape, _u(g, *recipe.feather_px), g)
        if float(alpha.sum()) < 1.0:
            continue
        rows = torch.nonzero(alpha.amax(1) > 0.5).flatten()
        cols = torch.nonzero(alpha.amax(0) > 0.5).flatten()
        if rows.numel() == 0 or cols.numel() == 0:
            continue
        # the family is applied to a window around the region (with a margin for blurs and fills), not the image
        support_r = torch.nonzero(alpha.amax(1) > 0).flatten()
        support_c = torch.nonzero(alpha.amax(0) > 0).flatten()
        margin = max(16, math.ceil(0.5 * max(ry, rx)))
        y0, y1 = max(0, int(support_r[0]) - margin), min(h, int(support_r[-1]) + 1 + margin)
        x0, x1 = max(0, int(support_c[0]) - margin), min(w, int(support_c[-1]) + 1 + margin)
        crop = out[:, y0:y1, x0:x1]
        a = alpha[y0:y1, x0:x1]
        box = (int(rows[0]) - y0, int(rows[-1]) + 1 - y0, int(cols[0]) - x0, int(cols[-1]) + 1 - x0)
        if family == "smear":
            altered = _smear(crop, recipe, g)
        elif family == "recolor":
            altered = _recolor(crop, recipe, g)
        elif family == "missing":
            altered = _missing(crop, (a > 0.05).float(), max(ry, rx))
        elif family == "duplicate":
            altered = _duplicate(out, (cy, cx), (ry, rx), recipe, g)[:, y0:y1, x0:x1]
        elif family == "foreign":
            altered = _foreign(out, donor, recipe, g)[:, y0:y1, x0:x1]
        else:
            altered = _resample(crop, box, recipe, g)
        out = out.clone()
        out[:, y0:y1, x0:x1] = (1 - a) * crop + a * altered.clamp(0.0, 1.0)
        k = FAMILIES.index(family)
        fam_alpha[k] = torch.maximum(fam_alpha[k], alpha)
    union = fam_alpha.amax(0)
    return out.clamp(0.0, 1.0), union, fam_alpha


def _jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    from PIL import Image

    arr = (img.permute(1, 2, 0).clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        back = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(back).permute(2, 0, 1).contiguous()


def _post(img: torch.Tensor, change: GlobalChange, g: torch.Generator) -> torch.Tensor:
    """The global changes applied after the defects: slight blur of the whole image, then JPEG."""
    if change.blur_p > 0 and float(torch.rand(1, generator=g)) < change.blur_p:
        img = _blur(img, _u(g, *change.blur_sigma_px))
    if change.jpeg_p > 0 and float(torch.rand(1, generator=g)) < change.jpeg_p:
        img = _jpeg(img, _randint(g, *change.jpeg_quality))
    return img


def make_defect_pairs(
    sources: torch.Tensor,
    grid: tuple[int, int],
    g: torch.Generator,
    *,
    donors: torch.Tensor | None = None,
    recipe: DefectRecipe | None = BENCHMARK_RECIPE,
    gen_change: GlobalChange = BENCHMARK_CHANGE,
    ref_change: GlobalChange | None = None,
    size: tuple[int, int] | None = None,
    clean_max: float = 0.01,
    positive_min: float = 0.5,
) -> DefectPairs:
    """One (reference, generated) pair per source photo ``(N, 3, H, W)`` in [0, 1] (module docstring).

    The reference is ``ref_change`` of the source (None: the photo itself), the generated view ``gen_change``
    with ``recipe``'s defects (None: no defect). ``donors`` ``(N, 3, H', W')`` supply foreign content (default: the
    next source in the batch). ``size``: output size (default the sources'); views are warped at the sources'
    resolution, resized, then the defects and the post-processing are applied at ``size``.
    """
    n = sources.shape[0]
    sources = sources.float()
    size = size or (int(sources.shape[-2]), int(sources.shape[-1]))
    ref_change = ref_change or GlobalChange.none()
    theta_ref = sample_affine(n, ref_change.geometry, g)
    theta_gen = sample_affine(n, gen_change.geometry, g)
    reference = apply_photometric(_resize(warp(sources, theta_ref), size), ref_change.photometric, g)
    generated = apply_photometric(_resize(warp(sources, theta_gen), size), gen_change.photometric, g)
    if donors is None:
        donors = sources.roll(1, dims=0) if n > 1 else sources.flip(-1)
    donors = donors.float()
    gh, gw = grid
    refs, gens, alphas, fams = [], [], [], []
    for i in range(n):
        if recipe is None:
            out, union, fam = generated[i], torch.zeros(size), torch.zeros(len(FAMILIES), *size)
        else:
            out, union, fam = _apply_defects(generated[i], donors[i], recipe, g)
        base = generated[i]
        # the pixel change caused by the defects alone (before the global post-processing)
        alphas.append(union)
        fams.append(fam)
        gens.append((_post(out, gen_change, g), (out - base).abs().mean(0)))
        refs.append(_post(reference[i], ref_change, g))
    gen_imgs = torch.stack([x for x, _ in gens])
    change_px = torch.stack([c for _, c in gens])
    alpha = torch.stack(alphas)
    fam_alpha = torch.stack(fams)
    coverage = F.adaptive_avg_pool2d(alpha[:, None], (gh, gw))[:, 0]
    change = F.adaptive_avg_pool2d(change_px[:, None], (gh, gw))[:, 0]
    min_change = recipe.min_change if recipe is not None else 0.0
    labels = coverage_labels(coverage, change, clean_max=clean_max, positive_min=positive_min, min_change=min_change)
    fam_cov = F.adaptive_avg_pool2d(fam_alpha, (gh, gw))  # (N, F, gh, gw)
    kinds = (fam_cov.argmax(1) + 1).to(torch.int8)
    kinds[coverage <= clean_max] = 0
    return DefectPairs(
        reference=torch.stack(refs).clamp(0.0, 1.0),
        generated=gen_imgs.clamp(0.0, 1.0),
        labels=labels,
        kinds=kinds,
        gen_to_ref=map_cells(theta_gen, theta_ref, grid),
        ref_to_gen=map_cells(theta_ref, theta_gen, grid),
        coverage=coverage,
        change=change,
        alpha=alpha,
        quality=torch.where(change >= min_change * coverage, 1.0 - coverage, torch.ones_like(coverage)),
    )
