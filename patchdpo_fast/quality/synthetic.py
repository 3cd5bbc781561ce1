"""Synthetic (reference, generated) pairs with known patch correspondence and known corrupted patches.

Shared by the self-supervised backbone training (``quality-train``), the calibration fit and the
corruption-localization benchmark (``quality-eval``), so all three see the same kinds of change:

1. **Geometry** (:class:`Geometry`): each view is an affine warp of the source photo: horizontal flip, zoom in
   (a crop of ``1/zoom`` of the side), rotation, and a translation that keeps the crop inside the photo when
   possible (reflection padding otherwise). The warps are known, so every patch-grid cell of one view maps to a
   continuous cell position in the other (:attr:`SyntheticPairs.gen_to_ref`, :attr:`SyntheticPairs.ref_to_gen`).
2. **Photometric jitter** (:class:`Photometric`): brightness, contrast, saturation and a hue rotation (a rotation of
   RGB about the grey axis), per image.
3. **Local corruptions** (:class:`Corruptions`) on the *generated* view, as rectangles of whole cells of the
   estimator's patch grid: ``paste`` (content from another photo), ``blur`` (Gaussian), ``recolor`` (hue rotation
   plus a colour cast), ``shuffle`` (sub-cell blocks permuted), and ``noise`` (additive Gaussian; not used in
   training, available to the benchmark as an unseen kind). A corrupted cell whose pixels barely changed (mean
   absolute change below ``min_change``, e.g. a blurred flat sky) is marked *ignore* (-1), not corrupted.

Everything is sampled from an explicit ``torch.Generator`` so pairs are reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "ALL_KINDS",
    "DEFAULT_CORRUPTIONS",
    "DEFAULT_GEOMETRY",
    "DEFAULT_PHOTOMETRIC",
    "IDENTITY",
    "TRAIN_KINDS",
    "Corruptions",
    "Geometry",
    "Photometric",
    "SyntheticPairs",
    "apply_photometric",
    "cell_index",
    "make_pairs",
    "map_cells",
    "sample_affine",
    "warp",
]

#: Corruption kinds, in the order of their codes (code = index + 1; 0 = clean).
ALL_KINDS = ("paste", "blur", "recolor", "shuffle", "noise")
#: Kinds used for training and (by default) for the benchmark.
TRAIN_KINDS = ("paste", "blur", "recolor", "shuffle")


@dataclass(frozen=True)
class Geometry:
    """Ranges of the per-view affine warp."""

    flip_p: float = 0.5
    zoom: tuple[float, float] = (1.0, 1.4)  # side of the photo / side of the crop (log-uniform)
    rotate_deg: float = 5.0  # uniform in [-rotate_deg, rotate_deg]

    @classmethod
    def identity(cls) -> Geometry:
        return cls(flip_p=0.0, zoom=(1.0, 1.0), rotate_deg=0.0)


@dataclass(frozen=True)
class Photometric:
    """Strength of the per-image photometric jitter (factors uniform in ``1 +- strength``; hue in degrees)."""

    brightness: float = 0.15
    contrast: float = 0.15
    saturation: float = 0.15
    hue_deg: float = 10.0


@dataclass(frozen=True)
class Corruptions:
    """How local corruptions are drawn on the generated view (sizes in cells of the patch grid)."""

    kinds: tuple[str, ...] = TRAIN_KINDS
    regions: tuple[int, int] = (1, 3)  # rectangles per image (inclusive range)
    region_cells: tuple[int, int] = (1, 4)  # side of a rectangle, per axis (inclusive range)
    min_change: float = 0.04  # mean |change| of a cell (pixels in [0, 1]) below which it is ignored
    blur_sigma: tuple[float, float] = (0.15, 0.35)  # in cell sides
    recolor_hue_deg: tuple[float, float] = (60.0, 180.0)
    recolor_cast: tuple[float, float] = (0.08, 0.25)  # norm of an RGB offset
    shuffle_blocks: int = 2  # blocks per cell side for ``shuffle``
    noise_std: tuple[float, float] = (0.08, 0.2)

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in ALL_KINDS]
        if bad or not self.kinds:
            raise ValueError(f"Corruptions: unknown kinds {bad}; choose from {', '.join(ALL_KINDS)}")


DEFAULT_GEOMETRY = Geometry()
IDENTITY = Geometry.identity()
DEFAULT_PHOTOMETRIC = Photometric()
DEFAULT_CORRUPTIONS = Corruptions()


@dataclass
class SyntheticPairs:
    """A batch of synthetic pairs on a ``(gh, gw)`` patch grid.

    Attributes:
        reference, generated: ``(N, 3, H, W)`` images in [0, 1].
        labels: ``(N, gh, gw)`` int8 of the generated view: 1 corrupted, 0 clean, -1 ignore.
        kinds: ``(N, gh, gw)`` int8 corruption code (``ALL_KINDS`` index + 1; 0 = clean).
        gen_to_ref: ``(N, gh, gw, 2)`` continuous (row, col) of each generated cell centre in the reference grid
            (cell centres at integers), NaN where it falls outside the reference view.
        ref_to_gen: the same from reference cells into the generated grid.
    """

    reference: torch.Tensor
    generated: torch.Tensor
    labels: torch.Tensor
    kinds: torch.Tensor
    gen_to_ref: torch.Tensor
    ref_to_gen: torch.Tensor


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def sample_affine(n: int, geometry: Geometry, g: torch.Generator) -> torch.Tensor:
    """``(n, 2, 3)`` affine maps from output to input normalized coordinates (``F.affine_grid`` convention)."""
    flip = torch.where(torch.rand(n, generator=g) < geometry.flip_p, -1.0, 1.0)
    lz0, lz1 = math.log(geometry.zoom[0]), math.log(geometry.zoom[1])
    zoom = torch.exp(_uniform(n, lz0, lz1, g))
    angle = _uniform(n, -1.0, 1.0, g) * math.radians(geometry.rotate_deg)
    cos, sin = torch.cos(angle), torch.sin(angle)
    extent = (cos.abs() + sin.abs()) / zoom
    margin = (1.0 - extent).clamp(min=0.0)
    cx = _uniform(n, -1.0, 1.0, g) * margin
    cy = _uniform(n, -1.0, 1.0, g) * margin
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos * flip / zoom
    theta[:, 0, 1] = -sin / zoom
    theta[:, 1, 0] = sin * flip / zoom
    theta[:, 1, 1] = cos / zoom
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    return theta


def warp(images: torch.Tensor, theta: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Resample ``(N, 3, H, W)`` images through ``theta`` (bilinear, reflection padding)."""
    h, w = size or tuple(images.shape[-2:])
    grid = F.affine_grid(theta.to(images), [images.shape[0], images.shape[1], h, w], align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.clamp(0.0, 1.0)


def map_cells(theta_from: torch.Tensor, theta_to: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Continuous ``(row, col)`` in the ``to`` view's grid of every cell centre of the ``from`` view.

    Both views are warps of the same source (``theta_*`` from :func:`sample_affine`). Returns ``(N, gh, gw, 2)``
    with NaN where the point lies outside the ``to`` view.
    """
    gh, gw = grid
    ys = (torch.arange(gh, dtype=torch.float64) + 0.5) / gh * 2 - 1
    xs = (torch.arange(gw, dtype=torch.float64) + 0.5) / gw * 2 - 1
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([xx, yy], dim=-1).reshape(1, -1, 2)  # (1, P, 2) as (x, y)
    tf, tt = theta_from.double(), theta_to.double()
    src = pts @ tf[:, :, :2].transpose(1, 2) + tf[:, None, :, 2]  # (N, P, 2) in source coordinates
    inv = torch.linalg.inv(tt[:, :, :2])
    dst = (src - tt[:, None, :, 2]) @ inv.transpose(1, 2)  # (N, P, 2) in the to view
    inside = (dst.abs() <= 1.0).all(dim=-1)
    col = (dst[..., 0] + 1) / 2 * gw - 0.5
    row = (dst[..., 1] + 1) / 2 * gh - 0.5
    out = torch.stack([row, col], dim=-1).float()
    out[~inside] = float("nan")
    return out.reshape(-1, gh, gw, 2)


def _hue_matrix(angle: torch.Tensor) -> torch.Tensor:
    """``(N, 3, 3)`` rotations of RGB about the grey axis by ``angle`` radians (a linear hue shift)."""
    u = torch.full((3,), 1.0 / math.sqrt(3.0))
    cross = torch.tensor([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]])
    outer = torch.outer(u, u)
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    return cos * torch.eye(3) + (1 - cos) * outer + sin * cross


_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


def apply_photometric(images: torch.Tensor, params: Photometric | None, g: torch.Generator) -> torch.Tensor:
    """Per-image hue rotation, saturation, contrast and brightness jitter of ``(N, 3, H, W)`` images in [0, 1]."""
    if params is None:
        return images
    n = images.shape[0]
    hue = _hue_matrix(_uniform(n, -1.0, 1.0, g) * math.radians(params.hue_deg)).to(images)
    x = torch.einsum("nij,njhw->nihw", hue, images)
    gray = (x * _LUMA.to(x)).sum(1, keepdim=True)
    sat = _uniform(n, 1 - params.saturation, 1 + params.saturation, g).view(n, 1, 1, 1).to(x)
    x = gray + sat * (x - gray)
    mean = (x * _LUMA.to(x)).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    con = _uniform(n, 1 - params.contrast, 1 + params.contrast, g).view(n, 1, 1, 1).to(x)
    x = mean + con * (x - mean)
    bri = _uniform(n, 1 - params.brightness, 1 + params.brightness, g).view(n, 1, 1, 1).to(x)
    return (x * bri).clamp(0.0, 1.0)


def cell_index(size: int, cells: int) -> torch.Tensor:
    """Cell of every pixel along one axis: ``floor(i * cells / size)``."""
    return torch.arange(size) * cells // size


def _pixel_span(c0: int, c1: int, size: int, cells: int) -> tuple[int, int]:
    """Pixels ``[p0, p1)`` whose cell lies in ``[c0, c1)``."""
    return (c0 * size + cells - 1) // cells, (c1 * size + cells - 1) // cells


def gaussian_blur(x: torch.Tensor, sigma: float, max_radius: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur of ``(C, H, W)`` with replicate padding.

    The kernel reaches ``3 sigma``: at least 1 pixel, at most ``max_radius`` when given.
    """
    radius = max(1, math.ceil(3 * sigma))
    if max_radius is not None:
        radius = min(radius, max_radius)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[0]
    y = x[None]
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return y[0]


def _corrupt_one(
    img: torch.Tensor,
    donor: torch.Tensor,
    grid: tuple[int, int],
    params: Corruptions,
    g: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Corrupt one ``(3, H, W)`` image; returns (image, rectangle cells (gh, gw) bool, kinds (gh, gw))."""
    _, height, width = img.shape
    gh, gw = grid
    cell = min(height / gh, width / gw)
    out = img.clone()
    region = torch.zeros(gh, gw, dtype=torch.bool)
    kinds = torch.zeros(gh, gw, dtype=torch.int8)

    def randint(lo: int, hi: int) -> int:  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    for _ in range(randint(*params.regions)):
        rh = min(gh, randint(*params.region_cells))
        rw = min(gw, randint(*params.region_cells))
        r0, c0 = randint(0, gh - rh), randint(0, gw - rw)
        y0, y1 = _pixel_span(r0, r0 + rh, height, gh)
        x0, x1 = _pixel_span(c0, c0 + rw, width, gw)
        if y1 <= y0 or x1 <= x0:
            continue
        kind = params.kinds[randint(0, len(params.kinds) - 1)]
        patch = out[:, y0:y1, x0:x1]
        if kind == "paste":
            dy = randint(0, donor.shape[1] - (y1 - y0))
            dx = randint(0, donor.shape[2] - (x1 - x0))
            new = donor[:, dy : dy + y1 - y0, dx : dx + x1 - x0]
        elif kind == "blur":
            sigma = float(_uniform(1, *params.blur_sigma, g)) * cell
            pad = math.ceil(3 * sigma)
            wy0, wy1, wx0, wx1 = max(0, y0 - pad), min(height, y1 + pad), max(0, x0 - pad), min(width, x1 + pad)
            blurred = gaussian_blur(out[:, wy0:wy1, wx0:wx1], sigma)
            new = blurred[:, y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0]
        elif kind == "recolor":
            sign = 1.0 if float(torch.rand(1, generator=g)) < 0.5 else -1.0
            angle = sign * math.radians(float(_uniform(1, *params.recolor_hue_deg, g)))
            rot = _hue_matrix(torch.tensor([angle]))[0].to(patch)
            direction = torch.randn(3, generator=g)
            cast = direction / direction.norm().clamp(min=1e-6) * float(_uniform(1, *params.recolor_cast, g))
            new = torch.einsum("ij,jhw->ihw", rot, patch) + cast.to(patch).view(3, 1, 1)
        elif kind == "shuffle":
            b = max(1, int(cell // params.shuffle_blocks))
            ny, nx = (y1 - y0) // b, (x1 - x0) // b
            new = patch.clone()
            if ny * nx >= 2:
                blocks = (
                    patch[:, : ny * b, : nx * b].reshape(3, ny, b, nx, b).permute(1, 3, 0, 2, 4).reshape(-1, 3, b, b)
                )
                perm = torch.randperm(ny * nx, generator=g)
                if bool((perm == torch.arange(ny * nx)).all()):
                    perm = perm.roll(1)
                shuffled = blocks[perm].reshape(ny, nx, 3, b, b).permute(2, 0, 3, 1, 4).reshape(3, ny * b, nx * b)
                new[:, : ny * b, : nx * b] = shuffled
        else:  # noise
            std = float(_uniform(1, *params.noise_std, g))
            new = patch + std * torch.randn(patch.shape, generator=g).to(patch)
        out[:, y0:y1, x0:x1] = new.clamp(0.0, 1.0)
        region[r0 : r0 + rh, c0 : c0 + rw] = True
        kinds[r0 : r0 + rh, c0 : c0 + rw] = ALL_KINDS.index(kind) + 1

    return out, region, kinds


def _label_cells(
    before: torch.Tensor, after: torch.Tensor, region: torch.Tensor, kinds: torch.Tensor, min_change: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels from the mean absolute pixel change of every cell: corrupted (1) where a rectangle changed the cell
    by at least ``min_change``, ignore (-1) inside rectangles below it, clean (0) elsewhere."""
    gh, gw = region.shape[-2:]
    change = F.adaptive_avg_pool2d((after - before).abs().mean(dim=1, keepdim=True), (gh, gw))[:, 0]
    labels = torch.zeros(region.shape, dtype=torch.int8)
    labels[region & (change >= min_change)] = 1
    labels[region & (change < min_change)] = -1
    kinds = kinds.clone()
    kinds[labels != 1] = 0
    return labels, kinds


def make_pairs(
    sources: torch.Tensor,
    grid: tuple[int, int],
    g: torch.Generator,
    *,
    donors: torch.Tensor | None = None,
    gen_geometry: Geometry = DEFAULT_GEOMETRY,
    ref_geometry: Geometry = IDENTITY,
    gen_photometric: Photometric | None = DEFAULT_PHOTOMETRIC,
    ref_photometric: Photometric | None = None,
    corruptions: Corruptions | None = DEFAULT_CORRUPTIONS,
    size: tuple[int, int] | None = None,
) -> SyntheticPairs:
    """Make one pair per source photo ``(N, 3, H, W)`` in [0, 1].

    The reference view is ``ref_geometry`` + ``ref_photometric`` of the source (default: the photo itself); the
    generated view is ``gen_geometry`` + ``gen_photometric`` followed by ``corruptions`` (None: no jitter / no
    corruption). ``donors`` ``(N, 3, H', W')`` supplies the pasted content for each pair (default: the next source
    in the batch). ``size`` is the output size (default the sources' size): the views are warped at the sources'
    resolution, resized to ``size`` (antialiased) and corrupted at ``size``.
    """
    n = sources.shape[0]
    sources = sources.float()
    size = size or (int(sources.shape[-2]), int(sources.shape[-1]))
    theta_ref = sample_affine(n, ref_geometry, g)
    theta_gen = sample_affine(n, gen_geometry, g)
    reference = apply_photometric(_resize(warp(sources, theta_ref), size), ref_photometric, g)
    generated = apply_photometric(_resize(warp(sources, theta_gen), size), gen_photometric, g)
    if donors is None:
        donors = sources.roll(1, dims=0) if n > 1 else sources.flip(-1)
    donors = _resize(donors.float(), size)
    if corruptions is None:
        labels = torch.zeros(n, *grid, dtype=torch.int8)
        kinds = torch.zeros(n, *grid, dtype=torch.int8)
        corrupted = generated
    else:
        outs, regions, kind_list = [], [], []
        for i in range(n):
            o, r, k = _corrupt_one(generated[i], donors[i], grid, corruptions, g)
            outs.append(o)
            regions.append(r)
            kind_list.append(k)
        corrupted = torch.stack(outs)
        labels, kinds = _label_cells(
            generated, corrupted, torch.stack(regions), torch.stack(kind_list), corruptions.min_change
        )
    return SyntheticPairs(
        reference=reference,
        generated=corrupted,
        labels=labels,
        kinds=kinds,
        gen_to_ref=map_cells(theta_gen, theta_ref, grid),
        ref_to_gen=map_cells(theta_ref, theta_gen, grid),
    )


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(0.0, 1.0)
