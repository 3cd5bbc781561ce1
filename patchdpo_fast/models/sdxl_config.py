"""SDXL-architecture configs and a builder of a randomly initialized, SDXL-shaped IP-Adapter-Plus stack.

No weights are read and nothing is downloaded: every component is constructed from the configs below, which
describe the shapes of SDXL base 1.0 (UNet, VAE, the CLIP ViT-L and OpenCLIP ViT-bigG text encoders) and of the
OpenCLIP ViT-H/14 image encoder used by IP-Adapter-Plus for SDXL. Uses: throughput and memory benchmarks at the
real scale without the real weights (``benchmarks/test_bench_train.py``), and parameter / FLOP counts on the
``meta`` device (no memory at all).

Sizes (checked by ``tests/benchmarks_smoke``): UNet 2,567,463,684 parameters with 70 cross-attention layers (so 70
IP K/V projection pairs), VAE 83.7 M, text encoders 123.1 M + 694.7 M, image encoder 632.1 M.

The tokenizers are the tiny CLIP BPE tokenizers of :mod:`~patchdpo_fast.models.tiny` (ids < 1000, 77 tokens):
the real vocabularies are files we do not have, and for speed and memory only the sequence length matters.

:func:`build_sdxl_models` returns the same :class:`~patchdpo_fast.models.build.PatchDPOModels` as
:func:`~patchdpo_fast.models.build.build_models` and assembles it the same way (frozen, eval-mode encoders; a fp32
Resampler of IP-Adapter-Plus's SDXL shape; :class:`~patchdpo_fast.models.ip_adapter.IPAdapterUNet` with the fp32
trainable adapter and, for the DPO losses, its frozen reference copy). Components are created directly on ``device``
(on a GPU the random initialization takes seconds; on the CPU the 2.6 B-parameter UNet takes much longer and ~10 GiB
of RAM).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .build import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD, PatchDPOModels
from .ip_adapter import IPAdapterUNet, cross_attention_processor_names
from .resampler import Resampler
from .tiny import SDXL_DDPM_CONFIG, build_tiny_tokenizer, instantiate_components, special_token_ids

__all__ = [
    "SDXL_IMAGE_ENCODER",
    "SDXL_NUM_IP_LAYERS",
    "SDXL_RESAMPLER",
    "SDXL_TEXT_ENCODER",
    "SDXL_TEXT_ENCODER_2",
    "SDXL_UNET",
    "SDXL_UNET_PARAMETERS",
    "SDXL_VAE",
    "assemble_models",
    "build_sdxl_components",
    "build_sdxl_models",
]

#: SDXL base 1.0 UNet (``UNet2DConditionModel``). Cross-attention width 2048 = 768 (ViT-L) + 1280 (bigG); the
#: ``text_time`` embedding takes the pooled bigG embedding (1280) plus 6 micro-conditioning values x 256 = 2816.
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
}

#: Parameters of :data:`SDXL_UNET` (diffusers 0.3x-0.4x), the figure DESIGN.md section 4 uses.
SDXL_UNET_PARAMETERS = 2_567_463_684

#: Cross-attention layers of :data:`SDXL_UNET` = IP K/V projection pairs of IP-Adapter-Plus SDXL: one per
#: transformer block, down 2x2 + 2x10, mid 10, up 3x10 + 3x2.
SDXL_NUM_IP_LAYERS = 70

#: SDXL VAE (``AutoencoderKL``, 8x downsampling, SDXL's latent scaling factor).
SDXL_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

#: First text encoder: CLIP ViT-L/14 text tower (``CLIPTextModel``).
SDXL_TEXT_ENCODER: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}

#: Second text encoder: OpenCLIP ViT-bigG/14 text tower with its 1280-wide projection
#: (``CLIPTextModelWithProjection``; the pooled, projected output feeds the UNet's ``text_time`` embedding).
SDXL_TEXT_ENCODER_2: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "max_position_embeddings": 77,
    "projection_dim": 1280,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}

#: IP-Adapter-Plus SDXL image encoder: OpenCLIP ViT-H/14 vision tower (``CLIPVisionModelWithProjection``),
#: 224 px, 14 px patches -> 256 + 1 tokens of width 1280 (penultimate hidden states feed the Resampler).
SDXL_IMAGE_ENCODER: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 16,
    "num_hidden_layers": 32,
    "image_size": 224,
    "patch_size": 14,
    "num_channels": 3,
    "projection_dim": 1024,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}

#: The IP-Adapter-Plus SDXL Resampler (``embedding_dim`` / ``output_dim`` / ``num_queries`` come from the stack).
SDXL_RESAMPLER: dict[str, Any] = {"dim": 1280, "depth": 4, "dim_head": 64, "heads": 20, "ff_mult": 4}


def _rng_scope(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Fork the RNG of the CPU (and of ``device`` if it is a GPU), so building leaves the caller's state alone."""
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    return torch.random.fork_rng(devices=devices)


def build_sdxl_components(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, Any]:
    """Randomly initialized SDXL-shaped components, created on ``device``, named as ``build_tiny_components`` does.

    Keys: ``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``, ``tokenizer``, ``tokenizer_2``, ``scheduler``
    (DDPM, SDXL's schedule), ``image_encoder``. The UNet and the three encoders are cast to ``dtype`` after the
    fp32 initialization; the VAE stays fp32 (as in :func:`~patchdpo_fast.models.build.build_models`). With
    ``device="meta"`` nothing is allocated (for parameter and FLOP counts). Deterministic in ``seed`` for a given
    device; the caller's RNG state is left untouched.
    """
    from diffusers import DDPMScheduler

    dev = torch.device(device)
    tokenizer = build_tiny_tokenizer()
    tokenizer_2 = build_tiny_tokenizer()
    special = special_token_ids(tokenizer)
    with _rng_scope(dev), dev:
        modules = instantiate_components(
            SDXL_UNET, SDXL_VAE, {**SDXL_TEXT_ENCODER, **special}, {**SDXL_TEXT_ENCODER_2, **special},
            SDXL_IMAGE_ENCODER, seed,
        )  # fmt: skip
    if dtype != torch.float32:
        for name in ("unet", "text_encoder", "text_encoder_2", "image_encoder"):
            modules[name].to(dtype)
    return {
        **modules,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": DDPMScheduler.from_config(SDXL_DDPM_CONFIG),
    }


def assemble_models(
    components: dict[str, Any],
    *,
    weight_dtype: torch.dtype,
    seed: int = 0,
    train_resampler: bool = False,
    attention_backend: str = "sdpa",
    xformers_fallback: bool = True,
    ip_scale: float = 1.0,
    num_ip_tokens: int = 16,
    resampler: dict[str, Any] | None = None,
    gradient_checkpointing: bool = False,
    reference: bool = True,
    train_unet: bool = False,
    train_adapter: bool = True,
    use_ip_adapter: bool = True,
) -> PatchDPOModels:
    """A :class:`PatchDPOModels` from already built components, assembled as ``build_models`` assembles its own.

    Freezes the components (eval mode), creates the fp32 Resampler (``resampler`` overrides :data:`SDXL_RESAMPLER`;
    seeded with ``seed + 5`` like ``build_models``) on the UNet's device, installs the IP processors (fp32
    adapter initialized from each layer's ``to_k`` / ``to_v``, plus the frozen reference copy when ``reference``) and
    optionally enables gradient checkpointing. ``weight_dtype`` is recorded on the bundle; it does not cast anything.
    ``components`` may lack a second text encoder (``text_encoder_2`` / ``tokenizer_2`` ``None``: SD1.5-class).
    ``train_unet`` / ``train_adapter`` are :class:`~patchdpo_fast.models.ip_adapter.IPAdapterUNet`'s; with
    ``use_ip_adapter=False`` no resampler, no IP processors and no image encoder (text-only conditioning; needs
    ``train_adapter=False``).
    """
    unet = components["unet"]
    image_encoder = components.get("image_encoder") if use_ip_adapter else None
    for key in ("unet", "vae", "text_encoder", "text_encoder_2", "image_encoder"):
        if components.get(key) is not None:
            components[key].requires_grad_(False)
            components[key].eval()
    shape = {**SDXL_RESAMPLER, **(resampler or {})}
    cfg = {
        "dim": shape["dim"],
        "depth": shape["depth"],
        "dim_head": shape["dim_head"],
        "heads": shape["heads"],
        "num_queries": num_ip_tokens,
        "embedding_dim": int(image_encoder.config.hidden_size) if image_encoder is not None else 0,
        "output_dim": int(unet.config.cross_attention_dim),
        "ff_mult": shape["ff_mult"],
    }
    dev = unet.conv_in.weight.device
    with _rng_scope(dev), dev:
        torch.manual_seed(seed + 5)
        image_proj = Resampler(**cfg).float() if image_encoder is not None else None
        ip_unet = IPAdapterUNet(
            unet,
            image_proj,
            train_resampler=train_resampler,
            attention_backend=attention_backend,
            xformers_fallback=xformers_fallback,
            ip_scale=ip_scale,
            train_unet=train_unet,
            reference=reference,
            train_adapter=train_adapter,
        )
    ip_unet.eval()
    if gradient_checkpointing:
        ip_unet.enable_gradient_checkpointing()
    return PatchDPOModels(
        ip_unet=ip_unet,
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        text_encoder_2=components.get("text_encoder_2"),
        tokenizer=components["tokenizer"],
        tokenizer_2=components.get("tokenizer_2"),
        image_encoder=image_encoder,
        noise_scheduler=components["scheduler"],
        image_mean=CLIP_IMAGE_MEAN,
        image_std=CLIP_IMAGE_STD,
        weight_dtype=weight_dtype,
    )


def build_sdxl_models(
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    *,
    seed: int = 0,
    **adapter_kwargs: Any,
) -> PatchDPOModels:
    """A randomly initialized SDXL-shaped IP-Adapter-Plus stack as :class:`PatchDPOModels`, built on ``device``.

    ``dtype`` is the frozen UNet's and encoders' dtype (``weight_dtype`` of ``build_models``); the VAE and the
    adapter are fp32. ``adapter_kwargs`` go to :func:`assemble_models` (``attention_backend``, ``ip_scale``,
    ``num_ip_tokens``, ``train_resampler``, ``gradient_checkpointing``, ...).

    Example (shapes and counts without allocating anything)::

        models = build_sdxl_models("meta", torch.float32)
        len(models.ip_unet.ip_processors)                      # 70 IP K/V pairs
        sum(p.numel() for p in models.trainable_parameters())  # 340.8 M trainable K/V weights
    """
    components = build_sdxl_components(device, dtype, seed)
    models = assemble_models(components, weight_dtype=dtype, seed=seed, **adapter_kwargs)
    found = len(cross_attention_processor_names(models.unet))
    if found != SDXL_NUM_IP_LAYERS:  # a diffusers release that builds the config differently
        raise RuntimeError(f"SDXL UNet built with {found} cross-attention layers, expected {SDXL_NUM_IP_LAYERS}")
    return models
