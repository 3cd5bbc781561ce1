"""The SD1.5 UNet's architecture, for the ``ip-adapter-plus_sd15`` layout at the real scale without any weights.

:data:`SD15_UNET` is the ``UNet2DConditionModel`` config of Stable Diffusion 1.5 (860 M parameters, cross-attention
width 768 = CLIP ViT-L/14's text tokens, no ``addition_embed_type``); built on the ``meta`` device it allocates
nothing, so tests check the IP-Adapter-Plus SD1.5 layout that :func:`~patchdpo_fast.models.build_models` chooses
from such a config (16 IP layers, a Resampler 768 wide with 12 heads of 64, reading ViT-H/14's 1280-wide features)
against the official file's key names and shapes.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SD15_NUM_IP_LAYERS", "SD15_UNET", "SD15_UNET_PARAMETERS"]

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
