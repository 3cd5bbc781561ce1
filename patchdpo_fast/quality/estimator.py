"""Patch quality estimation: how well each patch of a generated image matches the reference (DESIGN.md 1, step 2).

>>> est = PatchQualityEstimator.tiny(seed=0)                    # or .from_pretrained("runs/quality")
>>> maps = est.estimate(reference, generated)                   # (B, 3, H, W) images in [0, 1]
>>> maps.generated.shape, maps.reference.shape                  # (B, h, w) in [0, 1] on the patch grid
>>> q_ref, q_gen = resize_to_latent(maps, (64, 64))              # onto the latent grid used in training

* Generated side: the quality of a generated patch is the maximum cosine similarity of its backbone feature to the
  reference patch features (nearest-patch matching, no positional alignment), mapped to [0, 1] by the calibration.
* Reference side: the same from each reference patch to the generated patches: low where the generator failed to
  reproduce a part of the subject.
* Foreground mask (optional, for clean-background references): reference patches whose mask coverage is below
  ``mask_threshold`` are background. They are not match candidates for generated patches (a generated patch cannot
  score well by resembling the empty background), and they get the neutral value ``reference_background``
  (default 1.0: "nothing to fix", so the reference weight ``1 - q_ref`` of the official loss is 0 there) on the
  reference map.
* Flip invariance (``flip_invariant=True``, the default): the patch feature is the sum of the normalized features
  of the image and of its mirror image (mirrored back), so a mirrored generated image gets exactly the mirrored
  map. The price: mirror-image detail (e.g. mirrored lettering) is not penalized.
* Sharpness channel (``sharpness_weight=lambda``, default 0; quality-train writes 0.3): the L2-normalized feature is
  joined with the patch's local sharpness relative to its image (:mod:`.sharpness`), so the similarity of two patches
  is ``(1 - lambda) * cos(features) + lambda * sharpness agreement`` (learned features ignore blur).
* Reference views (``reference_views``, default the reference alone; quality-train writes scales 1 and 1.2 and
  half-patch shifts): the generated patches are matched against the reference re-sampled at other scales and grid
  offsets too (:mod:`.reference_views`), so a part drawn a little larger or off the reference's patch grid still finds
  itself. The reference-side map does the same the other way round (the generated image's views at the reciprocal
  scales), so one calibration serves both maps.
* Calibration: ``q = clamp((s - low) / (high - low), 0, 1)`` for the similarity ``s``. The identity calibration
  (``low=0, high=1``) is the default; :meth:`PatchQualityEstimator.fit_calibration` (run by ``quality-train``) sets
  ``low`` to the median similarity of synthetically corrupted patches and ``high`` to the median similarity of clean
  patches under a global geometric/photometric change, and ``save_pretrained`` stores both in the JSON config.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from patchdpo_fast.quality.backbone import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    backbone_patch_size,
    build_tiny_backbone,
    load_backbone,
    patch_tokens,
    read_preprocessor,
)
from patchdpo_fast.quality.matching import patch_match
from patchdpo_fast.quality.reference_views import ReferenceViews, view_images, view_masks
from patchdpo_fast.quality.sharpness import local_sharpness, sharpness_embedding
from patchdpo_fast.utils import atomic_write_json, set_default_permissions

__all__ = [
    "CONFIG_NAME",
    "TINY_TRAINED_DIR",
    "Calibration",
    "PatchQualityEstimator",
    "QualityMaps",
    "resize_to_latent",
]

#: Name of the estimator's JSON config inside a saved folder; the backbone lives in the ``backbone/`` subfolder.
CONFIG_NAME = "quality_config.json"
FORMAT_VERSION = 1
#: The tiny ViT after 60 CPU minutes of ``quality-train`` on the 12 DreamBench training subjects (2.6 MB, shipped;
#: docs/quality.md).
TINY_TRAINED_DIR = Path(__file__).resolve().parent / "assets" / "tiny_dreambench"


@dataclass(frozen=True)
class Calibration:
    """Linear map of cosine similarity to quality with clamping: ``q = clamp((s - low) / (high - low), 0, 1)``.

    ``low`` is the similarity that counts as quality 0, ``high`` the one that counts as quality 1. ``info`` records
    how the anchors were obtained (e.g. the fitting statistics); it is stored, not used.
    """

    low: float = 0.0
    high: float = 1.0
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.high > self.low):
            raise ValueError(f"Calibration: need finite low < high, got low={self.low!r}, high={self.high!r}")

    def __call__(self, similarity: torch.Tensor) -> torch.Tensor:
        return ((similarity - self.low) / (self.high - self.low)).clamp(0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "linear", "low": float(self.low), "high": float(self.high), "info": self.info}

    @classmethod
    def from_any(cls, value: Calibration | dict[str, Any] | Sequence[float] | None) -> Calibration:
        """Accept a Calibration, a dict as written by :meth:`to_dict`, a ``(low, high)`` pair, or None (identity)."""
        if value is None:
            return cls()
        if isinstance(value, Calibration):
            return value
        if isinstance(value, dict):
            kind = value.get("kind", "linear")
            if kind != "linear":
                raise ValueError(f"Calibration: unknown kind {kind!r} (only 'linear' exists)")
            return cls(float(value["low"]), float(value["high"]), dict(value.get("info") or {}))
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return cls(float(value[0]), float(value[1]))
        raise ValueError(f"`calibration` must be a Calibration, a dict, a (low, high) pair or None, got {value!r}")


@dataclass
class QualityMaps:
    """Result of :meth:`PatchQualityEstimator.estimate`; all maps ``(B, h, w)`` on the backbone's patch grid.

    Attributes:
        generated: calibrated quality of each generated patch in [0, 1] (1 = matches the reference).
        reference: calibrated quality of each reference patch in [0, 1] (1 = reproduced in the generated image;
            background patches get the estimator's ``reference_background`` value when a mask was given).
        generated_similarity / reference_similarity: the raw best cosine similarities before calibration (fp32).
        reference_foreground: bool foreground patches of the reference, or None without a mask.
    """

    generated: torch.Tensor
    reference: torch.Tensor
    generated_similarity: torch.Tensor
    reference_similarity: torch.Tensor
    reference_foreground: torch.Tensor | None = None

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.generated.shape[-2]), int(self.generated.shape[-1])

    def to(self, *args: Any, **kwargs: Any) -> QualityMaps:
        return QualityMaps(**{k: None if v is None else v.to(*args, **kwargs) for k, v in self.__dict__.items()})

    def to_latent(self, latent_hw: tuple[int, int], mode: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """``(q_ref, q_gen)`` resized to the latent grid (see :func:`resize_to_latent`)."""
        return resize_to_latent(self, latent_hw, mode)


def _resize_map(m: torch.Tensor, latent_hw: tuple[int, int], mode: str) -> torch.Tensor:
    if not isinstance(m, torch.Tensor) or m.dim() not in (3, 4) or (m.dim() == 4 and m.shape[1] != 1):
        raise ValueError(f"resize_to_latent: `maps` must be (B, h, w) or (B, 1, h, w), got {getattr(m, 'shape', m)}")
    x = (m[:, None] if m.dim() == 3 else m).float()
    h, w = x.shape[-2:]
    th, tw = latent_hw
    if mode == "auto":
        mode = "area" if (th <= h and tw <= w) else "bilinear"
    if (th, tw) == (h, w):
        y = x
    elif mode == "area":
        y = F.adaptive_avg_pool2d(x, (th, tw))
    elif mode == "bilinear":
        y = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False)
    else:
        raise ValueError(f"resize_to_latent: `mode` must be 'auto', 'area' or 'bilinear', got {mode!r}")
    y = y.clamp(0.0, 1.0)
    return y[:, 0] if m.dim() == 3 else y


def resize_to_latent(
    maps: QualityMaps | torch.Tensor, latent_hw: tuple[int, int] | Sequence[int], mode: str = "auto"
) -> Any:
    """Resize quality maps from the patch grid to the latent grid ``(H, W)`` used in training.

    ``mode="area"`` averages (for shrinking), ``"bilinear"`` interpolates (for enlarging, ``align_corners=False``),
    ``"auto"`` picks area when the latent grid is not larger in either dimension, bilinear otherwise. Values stay
    in [0, 1]. Accepts a tensor ``(B, h, w)`` / ``(B, 1, h, w)`` (returns the same layout, fp32) or a
    :class:`QualityMaps` (returns ``(q_ref, q_gen)``, the order :func:`patchdpo_fast.ops.patchdpo_weights` takes).
    """
    if len(latent_hw) != 2 or any(int(v) <= 0 for v in latent_hw):
        raise ValueError(f"resize_to_latent: `latent_hw` must be two positive sizes (H, W), got {latent_hw!r}")
    hw = (int(latent_hw[0]), int(latent_hw[1]))
    if isinstance(maps, QualityMaps):
        return _resize_map(maps.reference, hw, mode), _resize_map(maps.generated, hw, mode)
    return _resize_map(maps, hw, mode)


def _as_size(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    h, w = value
    return (int(h), int(w))


class PatchQualityEstimator(nn.Module):
    """Patch quality maps from a ViT/DINOv2 backbone and nearest-patch matching (see the module docstring).

    Args:
        backbone: a transformers ``ViTModel`` / ``Dinov2Model`` / ``Dinov2WithRegistersModel``.
        image_size: ``(H, W)`` (or one int) the images are resized to before the backbone; multiples of the patch
            size. Default: the backbone config's ``image_size``.
        image_mean, image_std: per-channel normalization of [0, 1] pixels (default ImageNet's).
        calibration: :class:`Calibration`, its dict, a ``(low, high)`` pair, or None for the identity.
        feature_layer: -1 for the final hidden state, else an index into the backbone's ``hidden_states``.
        flip_invariant: symmetrize features under a horizontal flip (two backbone passes per image).
        mask_threshold: a reference patch is foreground when the mask covers at least this fraction of it.
        reference_background: reference-map value of background patches when a mask is given.
        backend: matching backend, ``"auto"``, ``"triton"`` or ``"torch"`` (:func:`~.matching.patch_match`).
        sharpness_weight: ``lambda`` in [0, 1): the patch feature becomes the L2-normalized backbone feature
            (weight ``sqrt(1 - lambda)``) joined with the embedding of the patch's local sharpness relative to its
            image (weight ``sqrt(lambda)``; :mod:`~.sharpness`), so the similarity of two patches is
            ``(1 - lambda) * cos_features + lambda * sharpness_agreement``. 0 (default): the backbone feature alone.
        reference_views: :class:`~.reference_views.ReferenceViews` (or its dict): the generated patches are matched
            against the reference re-sampled at these scales and grid offsets too, and the reference patches against
            the generated image at the reciprocal scales and the same offsets (default: the images alone;
            quality-train writes ``ReferenceViews((1.0, 1.2), crops=3, shift=0.5)``,
            :data:`~.train_backbone.REFERENCE_VIEWS`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        image_size: int | Sequence[int] | None = None,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        calibration: Calibration | dict[str, Any] | Sequence[float] | None = None,
        feature_layer: int = -1,
        flip_invariant: bool = True,
        mask_threshold: float = 0.5,
        reference_background: float = 1.0,
        backend: str = "auto",
        sharpness_weight: float = 0.0,
        reference_views: ReferenceViews | dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone.eval()
        size = image_size if image_size is not None else backbone.config.image_size
        self.image_size = _as_size(size)
        ph, pw = backbone_patch_size(backbone)
        if self.image_size[0] % ph or self.image_size[1] % pw or min(self.image_size) <= 0:
            raise ValueError(f"`image_size` {self.image_size} must be positive multiples of the patch size {(ph, pw)}")
        if len(image_mean) != 3 or len(image_std) != 3 or min(image_std) <= 0:
            raise ValueError("`image_mean` and `image_std` must hold 3 values (`image_std` positive)")
        if not 0.0 < mask_threshold <= 1.0:
            raise ValueError(f"`mask_threshold` must be in (0, 1], got {mask_threshold!r}")
        if not 0.0 <= reference_background <= 1.0:
            raise ValueError(f"`reference_background` must be in [0, 1], got {reference_background!r}")
        if not (0.0 <= float(sharpness_weight) < 1.0):
            raise ValueError(f"`sharpness_weight` must be in [0, 1), got {sharpness_weight!r}")
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.calibration = Calibration.from_any(calibration)
        self.feature_layer = int(feature_layer)
        self.flip_invariant = bool(flip_invariant)
        self.mask_threshold = float(mask_threshold)
        self.reference_background = float(reference_background)
        self.backend = backend
        self.sharpness_weight = float(sharpness_weight)
        self.reference_views = ReferenceViews.from_any(reference_views)
        self.register_buffer("_mean", torch.tensor(self.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.image_std).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------------------------------------ construction
    @classmethod
    def tiny(cls, seed: int = 0, **kwargs: Any) -> PatchQualityEstimator:
        """Untrained tiny ViT (:data:`~.backbone.TINY_VIT_CONFIG`: 128 px, 16 x 16 patch grid), CPU-fast."""
        return cls(build_tiny_backbone(seed), **kwargs)

    @classmethod
    def tiny_trained(cls, **kwargs: Any) -> PatchQualityEstimator:
        """The shipped tiny ViT trained by ``quality-train`` (:data:`TINY_TRAINED_DIR`; see docs/quality.md)."""
        return cls.from_pretrained(TINY_TRAINED_DIR, **kwargs)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None, **kwargs
    ) -> PatchQualityEstimator:
        """Load a folder written by :meth:`save_pretrained` / ``patchdpo quality-train``, or a plain local
        transformers ViT/DINOv2 folder (image size and normalization from its ``preprocessor_config.json``).

        Keyword arguments override the stored settings (e.g. ``backend``, ``flip_invariant``). Nothing downloads.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"quality estimator folder {str(folder)!r} does not exist (nothing is downloaded; pass a folder "
                f"written by save_pretrained / `patchdpo quality-train`, or a local ViT/DINOv2 folder)"
            )
        cfg_file = folder / CONFIG_NAME
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())
            if cfg.get("format") != "patchdpo_fast.quality" or int(cfg.get("version", 0)) > FORMAT_VERSION:
                raise ValueError(f"{cfg_file}: not a patchdpo_fast quality config of version <= {FORMAT_VERSION}")
            backbone = load_backbone(folder / cfg.get("backbone", "backbone"), dtype=dtype)
            settings = {k: cfg[k] for k in _SETTINGS if k in cfg}
        else:
            backbone = load_backbone(folder, dtype=dtype)
            settings = read_preprocessor(folder)
        settings.update(kwargs)
        est = cls(backbone, **settings)
        return est.to(device) if device is not None else est

    def config_dict(self) -> dict[str, Any]:
        """The JSON-serializable settings :meth:`save_pretrained` writes (``sharpness_weight`` only when it is not 0,
        and ``reference_views`` only when there is more than the reference itself, so the settings, and the map tags
        of :mod:`.manifest_maps`, of estimators without them stay as they were)."""
        cfg = {
            "format": "patchdpo_fast.quality",
            "version": FORMAT_VERSION,
            "backbone": "backbone",
            "image_size": list(self.image_size),
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "calibration": self.calibration.to_dict(),
            "feature_layer": self.feature_layer,
            "flip_invariant": self.flip_invariant,
            "mask_threshold": self.mask_threshold,
            "reference_background": self.reference_background,
        }
        if self.sharpness_weight:
            cfg["sharpness_weight"] = self.sharpness_weight
        if not self.reference_views.is_identity:
            cfg["reference_views"] = self.reference_views.to_dict()
        return cfg

    def save_pretrained(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``quality_config.json`` and the backbone (``backbone/config.json`` + safetensors; no pickle).

        ``extra`` is merged into the JSON under ``"extra"`` (e.g. training metadata). Returns the folder.
        """
        from safetensors.torch import save_file

        folder = Path(path)
        backbone_dir = folder / "backbone"
        backbone_dir.mkdir(parents=True, exist_ok=True)
        # the transformers layout (config.json + model.safetensors), written directly: no pickle, and none of
        # save_pretrained's optional integrations get imported
        self.backbone.config.save_pretrained(backbone_dir)
        state = {k: v.detach().cpu().contiguous() for k, v in self.backbone.state_dict().items()}
        save_file(state, str(backbone_dir / "model.safetensors"), metadata={"format": "pt"})
        set_default_permissions(backbone_dir / "model.safetensors")  # safetensors writes 0600
        cfg = self.config_dict()
        if extra:
            cfg["extra"] = extra
        atomic_write_json(folder / CONFIG_NAME, cfg)
        return folder

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    @property
    def grid_size(self) -> tuple[int, int]:
        """The patch grid ``(h, w)`` of every map."""
        ph, pw = backbone_patch_size(self.backbone)
        return self.image_size[0] // ph, self.image_size[1] // pw

    # ------------------------------------------------------------------------------------------------ features
    def preprocess(self, images: torch.Tensor, name: str = "images") -> torch.Tensor:
        """Resize ``(B, 3, H, W)`` [0, 1] images (or uint8) to ``image_size`` and normalize them."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"`{name}` must be a (B, 3, H, W) image tensor, got {getattr(images, 'shape', images)}")
        if images.shape[0] == 0 or images.shape[-1] == 0 or images.shape[-2] == 0:
            raise ValueError(f"`{name}` must not be empty, got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        elif not images.is_floating_point():
            raise ValueError(f"`{name}` must be float in [0, 1] or uint8, got {images.dtype}")
        x = images.to(device=self.device, dtype=torch.float32)
        lo, hi = float(x.amin()), float(x.amax())
        if lo < -1e-3 or hi > 1.0 + 1e-3 or not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"`{name}` must hold values in [0, 1], got min {lo:.4g}, max {hi:.4g}")
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
        x = (x - self._mean) / self._std
        return x.to(self.dtype)

    def features_from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch features ``(B, h, w, D)`` of preprocessed pixels (differentiable; used by training too)."""
        feats = patch_tokens(self.backbone, pixels, self.feature_layer)
        if self.flip_invariant:
            mirrored = patch_tokens(self.backbone, pixels.flip(-1), self.feature_layer).flip(2)
            feats = F.normalize(feats.float(), dim=-1) + F.normalize(mirrored.float(), dim=-1)
        if not self.sharpness_weight:
            return feats
        # the sharpness of a cell is mirror-symmetric (symmetric blurs, cell means): one pass serves both views
        images = (pixels.float() * self._std + self._mean).clamp(0.0, 1.0)
        sharp = sharpness_embedding(local_sharpness(images, tuple(feats.shape[1:3])))
        lam = self.sharpness_weight
        return torch.cat([math.sqrt(1.0 - lam) * F.normalize(feats.float(), dim=-1), math.sqrt(lam) * sharp], dim=-1)

    @torch.no_grad()
    def features(self, images: torch.Tensor, name: str = "images") -> torch.Tensor:
        """Patch features ``(B, h, w, D)`` of ``(B, 3, H, W)`` images in [0, 1]."""
        return self.features_from_pixels(self.preprocess(images, name))

    def _foreground(self, mask: torch.Tensor, batch: int) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"`reference_mask` must be a tensor or None, got {type(mask).__name__}")
        m = mask[:, None] if mask.dim() == 3 else mask
        if m.dim() != 4 or m.shape[1] != 1 or m.shape[0] not in (1, batch):
            raise ValueError(
                f"`reference_mask` must be (B, H, W) or (B, 1, H, W) with B = {batch} or 1, got {tuple(mask.shape)}"
            )
        m = m.expand(batch, 1, *m.shape[-2:])
        cover = F.adaptive_avg_pool2d(m.to(device=self.device, dtype=torch.float32), self.grid_size)[:, 0]
        fg = cover >= self.mask_threshold - 1e-6
        empty = (~fg.flatten(1).any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"`reference_mask` marks no patch as foreground for batch item(s) {empty} "
                f"(a patch is foreground when the mask covers >= {self.mask_threshold} of it)"
            )
        return fg

    def _mask_pixels(self, mask: torch.Tensor, batch: int) -> torch.Tensor:
        """A validated reference mask as ``(batch, 1, H, W)`` float at the input size (for the reference views)."""
        m = mask[:, None] if mask.dim() == 3 else mask
        m = m.expand(batch, 1, *m.shape[-2:]).to(device=self.device, dtype=torch.float32)
        if tuple(m.shape[-2:]) != self.image_size:
            m = F.interpolate(m, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
        return m

    # ------------------------------------------------------------------------------------------------ estimation
    @torch.no_grad()
    def estimate(
        self,
        reference: torch.Tensor,
        generated: torch.Tensor,
        reference_mask: torch.Tensor | None = None,
        *,
        batch_size: int | None = None,
    ) -> QualityMaps:
        """Quality maps for ``(B, 3, H, W)`` reference and generated images in [0, 1].

        ``reference`` may hold one image for all generated images (B = 1). ``reference_mask`` (``(B, H, W)`` or
        ``(B, 1, H, W)``, 1 = subject) marks the reference foreground (see the module docstring). ``batch_size``
        bounds how many images go through the backbone at once.
        """
        if not isinstance(generated, torch.Tensor) or generated.dim() != 4:
            raise ValueError(
                f"`generated` must be a (B, 3, H, W) image tensor, got {getattr(generated, 'shape', None)}"
            )
        b = generated.shape[0]
        if not isinstance(reference, torch.Tensor) or reference.dim() != 4 or reference.shape[0] not in (1, b):
            raise ValueError(
                f"`reference` must be (B, 3, H, W) with B = {b} (like `generated`) or 1, "
                f"got {getattr(reference, 'shape', None)}"
            )
        fg = None if reference_mask is None else self._foreground(reference_mask, b)
        ref_pix = self.preprocess(reference, "reference")  # validates both inputs before any backbone work
        gen_pix = self.preprocess(generated, "generated")
        step = batch_size or max(b, 1)
        views = self.reference_views
        nr = ref_pix.shape[0]
        ref_src, index = ref_pix, None
        if nr > 1 and not views.is_identity:
            # a reference repeated in the batch (one subject photo for several generated images) is seen once
            unique, which = torch.unique(ref_pix.flatten(1), dim=0, return_inverse=True)
            if unique.shape[0] < nr:
                ref_src, index = unique.view(-1, *ref_pix.shape[1:]), which
        ref_views = (
            view_images(ref_src, views, backbone_patch_size(self.backbone)) if not views.is_identity else [ref_src]
        )
        # features of every view (view 0 is the reference itself), in chunks of `step` images
        ref_all = torch.cat(ref_views)
        ref_feat = torch.cat(
            [self.features_from_pixels(ref_all[i : i + step]) for i in range(0, ref_all.shape[0], step)]
        )
        gen_feat = torch.cat([self.features_from_pixels(gen_pix[i : i + step]) for i in range(0, b, step)])
        h, w = self.grid_size
        nv = len(ref_views)
        keys = ref_feat.view(nv, ref_src.shape[0], h * w, -1).transpose(0, 1).flatten(1, 2)  # (Bref, V * h * w, D)
        rf = ref_feat[: ref_src.shape[0]].flatten(1, 2)
        if index is not None:
            keys, rf = keys[index], rf[index]
        if views.is_identity:
            key_mask = None if fg is None else fg.flatten(1)
        else:
            mask = None if reference_mask is None else self._mask_pixels(reference_mask, b)
            cand = view_masks(views, self.image_size, (h, w), mask=mask, threshold=self.mask_threshold, batch=nr)
            if fg is not None:
                cand[:, 0] = fg  # the reference itself: exactly the foreground of the plain match
            key_mask = cand.to(keys.device).flatten(1)
        if nr == 1 and b > 1:
            keys, rf = keys.expand(b, *keys.shape[1:]), rf.expand(b, *rf.shape[1:])
        if key_mask is not None and key_mask.shape[0] != b:
            key_mask = key_mask.expand(b, -1)
        gf = gen_feat.flatten(1, 2)
        sim_gen = patch_match(gf, keys, key_mask, backend=self.backend).float()
        gen_keys, gen_mask = gf, None
        if not views.is_identity:
            # the reference side, symmetrically: the generated image's views at the reciprocal scales
            inverse = views.inverse()
            gen_all = torch.cat(view_images(gen_pix, inverse, backbone_patch_size(self.backbone))[1:])
            extra = torch.cat(
                [self.features_from_pixels(gen_all[i : i + step]) for i in range(0, gen_all.shape[0], step)]
            )
            nv_gen = gen_all.shape[0] // b
            gen_keys = torch.cat([gf, extra.view(nv_gen, b, h * w, -1).transpose(0, 1).flatten(1, 2)], dim=1)
            gen_mask = view_masks(inverse, self.image_size, (h, w), batch=b).to(gf.device).flatten(1)
        sim_ref = patch_match(rf, gen_keys, gen_mask, backend=self.backend).float()
        sim_gen, sim_ref = sim_gen.view(b, h, w), sim_ref.view(b, h, w)
        q_gen = self.calibration(sim_gen)
        q_ref = self.calibration(sim_ref)
        if fg is not None:
            q_ref = torch.where(fg, q_ref, torch.full_like(q_ref, self.reference_background))
        return QualityMaps(q_gen, q_ref, sim_gen, sim_ref, fg)

    def fit_calibration(self, images: torch.Tensor, **kwargs: Any) -> Calibration:
        """Fit the calibration anchors on synthetic corrupted pairs made from ``images`` and set it (see
        :func:`patchdpo_fast.quality.calibration.fit_calibration` for the arguments). Returns the calibration."""
        from patchdpo_fast.quality.calibration import fit_calibration

        self.calibration = fit_calibration(self, images, **kwargs)
        return self.calibration

    def extra_repr(self) -> str:
        c = self.calibration
        return (
            f"image_size={self.image_size}, grid={self.grid_size}, calibration=({c.low:.4f}, {c.high:.4f}), "
            f"flip_invariant={self.flip_invariant}, backend={self.backend!r}"
        )


_SETTINGS = (
    "image_size",
    "image_mean",
    "image_std",
    "calibration",
    "feature_layer",
    "flip_invariant",
    "mask_threshold",
    "reference_background",
    "sharpness_weight",
    "reference_views",
)
