"""Make ``docs/images/quality_example.png``: the README's patch quality example, drawn by the library itself.

    python docs/images/make_quality_example.py [--photo PATH] [--donor PATH] [--seed N] [--out PNG]

1. The reference is a real DreamBench photo (default ``robot_toy/00.jpg`` of ``../shared/data/dreambench256``, a
   subject held out of the shipped estimator's training; without that folder, ``backpack/00.jpg`` of
   ``tests/assets/dreambench_mini``), centre-cropped to 256 px.
2. The "generated" image comes from the quality package's own synthetic pair code
   (:func:`patchdpo_fast.quality.synthetic.make_pairs`): a mild global change (zoom 1.05-1.12x, rotation within 3
   degrees, small brightness / contrast / saturation / hue jitter) and 3 corrupted rectangles of 2-3 x 2-3 patch
   cells, each pasted from a photo of another subject (``--donor``) or recoloured.
3. The shipped tiny estimator trained by ``quality-train`` (:meth:`PatchQualityEstimator.tiny_trained`) gives the
   quality maps on its 16 x 16 patch grid; :func:`patchdpo_fast.quality.manifest_maps.pair_panel` draws reference |
   generated | generated quality | reference quality, with the truly corrupted cells outlined in white, saved as a
   256-colour PNG (about 120 KB).

The default ``--seed`` was picked (by looking at a few) so that the corruptions land on the subject rather than on
the empty background; the maps are whatever the estimator gives for it. The AUROC of this one pair is printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from patchdpo_fast.quality import PatchQualityEstimator
from patchdpo_fast.quality.manifest_maps import pair_panel
from patchdpo_fast.quality.metrics import auroc
from patchdpo_fast.quality.synthetic import Corruptions, Geometry, Photometric, make_pairs

REPO = Path(__file__).resolve().parents[2]
DREAMBENCH = REPO.parent / "shared" / "data" / "dreambench256"
MINI = REPO / "tests" / "assets" / "dreambench_mini"


def _default(subject_path: str, fallback: str) -> Path:
    return DREAMBENCH / subject_path if (DREAMBENCH / subject_path).is_file() else MINI / fallback


def _square(path: Path, size: int = 256) -> torch.Tensor:
    """A photo centre-cropped to a square and resized to ``size``: ``(3, size, size)`` in [0, 1]."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photo", type=Path, default=_default("robot_toy/00.jpg", "backpack/00.jpg"))
    parser.add_argument("--donor", type=Path, default=_default("colorful_sneaker/00.jpg", "dog/00.jpg"))
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "quality_example.png")
    parser.add_argument("--tile", type=int, default=256, help="side of each tile in pixels (default 256)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    photo, donor = _square(args.photo), _square(args.donor)
    est = PatchQualityEstimator.tiny_trained()
    pairs = make_pairs(
        photo[None],
        est.grid_size,
        torch.Generator().manual_seed(args.seed),
        donors=donor[None],
        gen_geometry=Geometry(flip_p=0.0, zoom=(1.05, 1.12), rotate_deg=3.0),
        gen_photometric=Photometric(brightness=0.08, contrast=0.08, saturation=0.08, hue_deg=5.0),
        corruptions=Corruptions(kinds=("paste", "recolor"), regions=(3, 3), region_cells=(2, 3)),
    )
    maps = est.estimate(pairs.reference, pairs.generated)
    labels = pairs.labels[0]
    keep = labels >= 0
    score = auroc((-maps.generated_similarity[0])[keep].numpy(), (labels[keep] == 1).numpy())
    subject = args.photo.parent.name
    caption = f"DreamBench '{subject}' photo; white outline: the corrupted cells (AUROC {score:.3f})"
    panel = pair_panel(
        pairs.reference[0], pairs.generated[0], maps.reference[0], maps.generated[0],
        caption=caption, size=args.tile, marks=labels == 1,
    )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # a 256-colour palette (octree, Floyd-Steinberg dithering) keeps the PNG near 120 KB instead of ~400 KB
    panel.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.FLOYDSTEINBERG).save(
        args.out, optimize=True
    )
    kb = args.out.stat().st_size / 1024
    print(f"{args.out}: {panel.width}x{panel.height}, {kb:.0f} KB; {int((labels == 1).sum())} corrupted cells, "
          f"AUROC {score:.3f}, mean generated quality {float(maps.generated.mean()):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
