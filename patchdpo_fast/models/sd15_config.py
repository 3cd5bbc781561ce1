"""The SD1.5 UNet's architecture, for the ``ip-adapter-plus_sd15`` layout at the real scale without any weights.

:data:`SD15_UNET` is the ``UNet2DConditionModel`` config of Stable Diffusion 1.5 (860 M parameters, cross-attention
width 768 = CLIP ViT-L/14's text tokens, no ``addition_embed_type``); built on the ``meta`` device it allocates
nothing, so tests check the IP-Adapter-Plus SD1.5 layout that :func:`~patchdpo_fast.models.build_models` chooses
from such a config (16 IP layers, a Resampler 768 wide with 12 heads of 64, reading ViT-H/14's 1280-wide features)
against the official file's key names and shapes.

The other components at their real sizes (for the memory plan of ``patchdpo estimate-memory`` before anything is
downloaded): :data:`SD15_TEXT_ENCODER` (CLIP ViT-L/14 text tower, 123.1 M), :data:`SD15_VAE` (83.7 M, SD1.5's latent
scaling factor), :data:`SD15_IMAGE_ENCODER` (IP-Adapter-Plus SD1.5's OpenCLIP ViT-H/14 vision tower, 632.1 M, the same
encoder as SDXL's Plus adapter) and :data:`SD15_RESAMPLER`; :func:`build_sd15_components` instantiates them.
"""

from __future__ import annotations

from typing import Any

import torch

from patchdpo_fast.models.sdxl_config import SDXL_IMAGE_ENCODER, SDXL_TEXT_ENCODER, SDXL_VAE

__all__ = [
    "SD15_IMAGE_ENCODER",
    "SD15_NUM_IP_LAYERS",
    "SD15_RESAMPLER",
    "SD15_TEXT_ENCODER",
    "SD15_TEXT_ENCODER_PARAMETERS",
    "SD15_UNET",
    "SD15_UNET_PARAMETERS",
    "SD15_VAE",
    "build_sd15_components",
]

#: Stable Diffusion 1.5 UNet (``UNet2DConditionModel``): cross-attention in the three outer down blocks, the mid
#: block and the three outer up blocks; one text encoder's 768-wide tokens; no added conditioning.
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

#: Parameters of :data:`SD15_UNET`.
SD15_UNET_PARAMETERS = 859_520_964

#: Cross-attention layers of :data:`SD15_UNET` = IP K/V pairs of ``ip-adapter-plus_sd15`` (keys ``1, 3, ..., 31``):
#: down 3 x 2, mid 1, up 3 x 3.
SD15_NUM_IP_LAYERS = 16

#: Stable Diffusion 1.5's text encoder: the CLIP ViT-L/14 text tower (``CLIPTextModel``); its last hidden state
#: (768 wide) is the UNet's cross-attention input.
SD15_TEXT_ENCODER: dict[str, Any] = dict(SDXL_TEXT_ENCODER)  # the same CLIP ViT-L/14 text tower as SDXL's first

#: Parameters of :data:`SD15_TEXT_ENCODER`.
SD15_TEXT_ENCODER_PARAMETERS = 123_060_480

#: Stable Diffusion 1.5's VAE (``AutoencoderKL``, 8x downsampling, latent scaling factor 0.18215).
SD15_VAE: dict[str, Any] = {
    **{k: v for k, v in SDXL_VAE.items() if k != "force_upcast"},  # the same AutoencoderKL layout as SDXL's
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

#: ``ip-adapter-plus_sd15``'s image encoder: the OpenCLIP ViT-H/14 vision tower (``models/image_encoder`` of the
#: IP-Adapter release, shared with the SDXL ``vit-h`` adapters): 224 px, 257 tokens of width 1280.
SD15_IMAGE_ENCODER: dict[str, Any] = dict(SDXL_IMAGE_ENCODER)  # the same ViT-H/14 vision tower

#: ``ip-adapter-plus_sd15``'s Resampler: ``cross_attention_dim`` (768) wide, 12 heads of 64, depth 4 (what
#: :func:`~patchdpo_fast.models.build.default_resampler_config` chooses for an SD1.5-class UNet).
SD15_RESAMPLER: dict[str, Any] = {"dim": 768, "depth": 4, "dim_head": 64, "heads": 12, "ff_mult": 4}


def build_sd15_components(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> dict[str, Any]:
    """Randomly initialized SD1.5-shaped components (with the IP-Adapter-Plus SD1.5 image encoder) on ``device``.

    Keys as :func:`~patchdpo_fast.models.sdxl_config.build_sdxl_components` returns them, with ``text_encoder_2`` and
    ``tokenizer_2`` ``None`` (one text encoder). The UNet and the encoders are cast to ``dtype``; the VAE stays fp32.
    ``device="meta"`` allocates nothing (parameter counts, the memory plan). The tokenizer is the tiny CLIP BPE one
    (only the 77-token sequence length matters for speed and memory).
    """
    from diffusers import DDPMScheduler

    from .sdxl_config import _rng_scope
    from .tiny import SDXL_DDPM_CONFIG, build_tiny_tokenizer, instantiate_components, special_token_ids

    dev = torch.device(device)
    tokenizer = build_tiny_tokenizer()
    special = special_token_ids(tokenizer)
    with _rng_scope(dev), dev:
        modules = instantiate_components(
            SD15_UNET, SD15_VAE, {**SD15_TEXT_ENCODER, **special}, None, SD15_IMAGE_ENCODER, seed
        )
    if dtype != torch.float32:
        for name in ("unet", "text_encoder", "image_encoder"):
            modules[name].to(dtype)
    # SD1.5 trains on the same scaled-linear schedule (0.00085 -> 0.012, 1000 steps) as SDXL
    scheduler = DDPMScheduler.from_config(SDXL_DDPM_CONFIG)
    return {**modules, "tokenizer": tokenizer, "tokenizer_2": None, "scheduler": scheduler}
