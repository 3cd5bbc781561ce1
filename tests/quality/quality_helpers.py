"""Helpers shared by the quality tests (a uniquely named module: the test folders are not packages)."""

from __future__ import annotations

import math

import torch


def synthetic_photos(n: int, size: int = 128, seed: int = 0) -> torch.Tensor:
    """``(n, 3, size, size)`` images in [0, 1] with local structure: a colour gradient, sinusoidal texture and a
    few solid discs, different in every image (so patches of one image are distinguishable from another's)."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        c0, c1 = torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g)
        img = c0 * (1 - xs) + c1 * ys
        for _ in range(3):
            fx, fy, ph = (torch.rand(3, generator=g) * torch.tensor([18.0, 18.0, 6.28])).tolist()
            amp = 0.25 * torch.rand(3, 1, 1, generator=g)
            img = img + amp * torch.sin(2 * math.pi * (fx * xs + fy * ys) + ph)
        for _ in range(4):
            cx, cy, r = torch.rand(3, generator=g).tolist()
            disc = ((xs - cx) ** 2 + (ys - cy) ** 2) < (0.05 + 0.1 * r) ** 2
            img = torch.where(disc, torch.rand(3, 1, 1, generator=g), img)
        out.append(img.clamp(0, 1))
    return torch.stack(out)
