"""A lossless "autoencoder" for diffusion in pixel space: space-to-depth instead of a VAE.

Small worlds learnt from scratch on a CPU (``patchdpo minibench``) have no pretrained VAE, and a VAE trained there
would blur exactly the local detail PatchDPO is about. :class:`PixelSpaceAutoencoder` stands where SDXL's
``AutoencoderKL`` stands (``vae/`` subfolder of a model folder, same ``encode``/``decode`` interface, a config with
``scaling_factor`` and ``block_out_channels``) but is an exact, parameter-free transform: encoding folds every
``f x f`` block of pixels into channels (``torch.nn.functional.pixel_unshuffle``), decoding unfolds it. So a
``(B, 3, 32, 32)`` image in ``[-1, 1]`` becomes ``(B, 12, 16, 16)`` "latents" with ``f = 2``: diffusion runs on
pixels, the UNet sees a 4x smaller grid, and ``decode(encode(x)) == x`` bit for bit.

``vae_scale_factor`` (``2 ** (len(block_out_channels) - 1)``, the formula of diffusers' pipelines) equals ``f``,
so stock ``StableDiffusionXLPipeline`` sizes its latents correctly. The module is saved as a diffusers folder
(``config.json`` with ``_class_name: PixelSpaceAutoencoder``, no weights) and loaded by
:func:`patchdpo_fast.models.build_models` when it finds that class name in ``vae/config.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

__all__ = ["PixelSpaceAutoencoder", "is_pixel_space_folder"]

CLASS_NAME = "PixelSpaceAutoencoder"


@dataclass
class _PointPosterior:
    """The "posterior" of an exact encoder: a point mass, so sampling and the mode agree."""

    value: torch.Tensor

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.value

    def mode(self) -> torch.Tensor:
        return self.value


@dataclass
class _EncoderOutput:
    latent_dist: _PointPosterior


@dataclass
class _DecoderOutput:
    sample: torch.Tensor


class PixelSpaceAutoencoder(ModelMixin, ConfigMixin):
    """Exact space-to-depth autoencoder with the ``AutoencoderKL`` interface (see the module docstring).

    Args:
        in_channels: image channels (3).
        downsample: ``f``, pixels per latent cell along each side (1 = plain pixels).
        scaling_factor: latents are ``pixel_unshuffle(x) * scaling_factor`` for ``x`` in ``[-1, 1]``.
        block_out_channels: only its length matters (``2 ** (len - 1) == downsample``); derived when omitted.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        downsample: int = 2,
        scaling_factor: float = 1.0,
        block_out_channels: tuple[int, ...] | None = None,
        force_upcast: bool = False,
    ) -> None:
        super().__init__()
        if downsample < 1 or downsample & (downsample - 1):
            raise ValueError(f"downsample must be a power of two >= 1, got {downsample}")
        levels = downsample.bit_length()  # 1 -> 1 level, 2 -> 2, 4 -> 3, ...
        if block_out_channels is None:
            self.register_to_config(block_out_channels=(in_channels,) * levels)
        elif len(block_out_channels) != levels:
            raise ValueError(f"block_out_channels must have {levels} entries for downsample={downsample}")
        # carries the module's device and dtype (ModelMixin.dtype / .device read parameters, then buffers)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def latent_channels(self) -> int:
        """Channels of the latents: ``in_channels * downsample ** 2``."""
        return self.config.in_channels * self.config.downsample**2

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> Any:
        """``(B, C, H, W)`` images in ``[-1, 1]`` -> point posterior over ``(B, C f^2, H/f, W/f)`` latents."""
        f = self.config.downsample
        if x.dim() != 4 or x.shape[1] != self.config.in_channels or x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(
                f"expected images (B, {self.config.in_channels}, H, W) with H and W multiples of {f}, "
                f"got {tuple(x.shape)}"
            )
        latents = F.pixel_unshuffle(x, f) if f > 1 else x
        posterior = _PointPosterior(latents * self.config.scaling_factor)
        return _EncoderOutput(posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, **_: Any) -> Any:
        """Latents -> images (exact inverse of :meth:`encode`)."""
        f = self.config.downsample
        if z.dim() != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents (B, {self.latent_channels}, h, w), got {tuple(z.shape)}")
        z = z / self.config.scaling_factor
        images = F.pixel_shuffle(z, f) if f > 1 else z
        return _DecoderOutput(images) if return_dict else (images,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Round trip (identity up to rounding)."""
        return self.decode(self.encode(x).latent_dist.mode()).sample

    def save_pretrained(self, save_directory: str | os.PathLike, **_: Any) -> None:  # type: ignore[override]
        """Write ``config.json`` only: the transform has no weights."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.save_config(folder)


def is_pixel_space_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder/config.json`` describes a :class:`PixelSpaceAutoencoder`."""
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("_class_name") == CLASS_NAME
    except (OSError, ValueError):
        return False
