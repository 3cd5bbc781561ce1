"""Tiny, randomly initialized SDXL- or SD1.5-shaped components for CPU tests and demos.

Two architectures (:data:`TINY_ARCHITECTURES`), both at toy widths so the same training code runs on them and on the
real scale:

* ``sdxl``: two text encoders whose penultimate hidden states are concatenated into the cross-attention width, a
  pooled projection from the second one, ``text_time`` micro-conditioning (``addition_embed_type``), a VAE with an 8x
  downsampling factor, a CLIP vision tower with projection;
* ``sd15``: one text encoder whose last hidden state is the cross-attention input (width 32 = the UNet's
  ``cross_attention_dim``), no added conditioning, SD1.5's block order (cross-attention in the outer blocks) and
  latent scaling factor.

Tokenizers are built from a small byte-level BPE vocabulary written by :func:`write_tiny_clip_tokenizer_files`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "SDXL_DDPM_CONFIG",
    "TINY_ARCHITECTURES",
    "TINY_IMAGE_ENCODER",
    "TINY_RESAMPLER",
    "TINY_SD15_UNET",
    "TINY_SD15_VAE",
    "TINY_TEXT_ENCODER",
    "TINY_UNET",
    "TINY_VAE",
    "build_tiny_components",
    "build_tiny_tokenizer",
    "write_tiny_clip_tokenizer_files",
]

#: Text encoders: 32 + 32 wide -> cross_attention_dim 64; encoder 2 pools to 32.
TINY_TEXT_ENCODER: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "max_position_embeddings": 77,
    "projection_dim": 32,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}

#: UNet: SDXL block structure at toy width (addition_time_embed_dim * 6 + pooled 32 = 80).
TINY_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4),
    "transformer_layers_per_block": (1, 2),
    "use_linear_projection": True,
    "cross_attention_dim": 64,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,
    "norm_num_groups": 16,
}

#: SD1.5-class UNet at toy width: cross-attention in the outer blocks (SD1.5 has it in all but the innermost),
#: one text encoder's width as ``cross_attention_dim``, no ``addition_embed_type`` (no pooled text, no time ids).
#: 6 cross-attention layers: down 2, mid 1, up 3.
TINY_SD15_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "attention_head_dim": 4,
    "cross_attention_dim": 32,
    "norm_num_groups": 16,
}

#: VAE: four levels -> 8x downsampling like SDXL's; SDXL's scaling factor.
TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 8, 16, 16),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 64,
    "scaling_factor": 0.13025,
}

#: The SD1.5 VAE's shape at toy width: SD1.5's latent scaling factor.
TINY_SD15_VAE: dict[str, Any] = {**TINY_VAE, "scaling_factor": 0.18215}

#: Architectures :func:`build_tiny_components` builds.
TINY_ARCHITECTURES: tuple[str, ...] = ("sdxl", "sd15")

#: CLIP vision tower: 32 px, 8 px patches -> 16 + 1 tokens of width 32.
TINY_IMAGE_ENCODER: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 32,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}

#: SDXL's training noise schedule (the DDPMScheduler config of tiny builds).
SDXL_DDPM_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}

#: Resampler: dim_head 64 and depth 4 as stock diffusers' converter requires; 16 IP tokens like IP-Adapter-Plus.
TINY_RESAMPLER: dict[str, Any] = {"dim": 32, "depth": 4, "dim_head": 64, "heads": 2, "num_queries": 16, "ff_mult": 4}

_TINY_WORDS: tuple[str, ...] = (
    "a", "photo", "of", "the", "dog", "cat", "toy", "backpack", "in", "on", "with", "and", "red", "blue",
    "green", "sks", "beach", "snow", "city", "grass", "table", "wearing", "hat", "sunglasses", "floating",
    "water", "purple", "fur",
)  # fmt: skip


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (GPT-2 / CLIP byte-to-unicode table), in byte order."""
    direct = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    direct += list(range(ord("®"), ord("ÿ") + 1))
    table: dict[int, str] = {b: chr(b) for b in direct}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def write_tiny_clip_tokenizer_files(
    folder: str | os.PathLike, model_max_length: int = 77, words: tuple[str, ...] | None = None
) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` of a tiny CLIP BPE tokenizer.

    The vocabulary holds every byte symbol (with and without the ``</w>`` end-of-word marker), the merges that
    spell ``words`` (default: a few prompt words) as single tokens, and the CLIP special tokens last; with the
    default words the ids stay below 1000.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in words if words is not None else _TINY_WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merge = f"{parts[0]} {parts[1]}"
            merged = parts[0] + parts[1]
            if merge not in merges:
                merges.append(merge)
                vocab_list.append(merged)
            parts = [merged, *parts[2:]]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def build_tiny_tokenizer(model_max_length: int = 77):
    """A tiny ``CLIPTokenizer`` (vocabulary < 1000 ids) built from files written to a temporary folder."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="tiny_clip_tok_") as tmp:
        write_tiny_clip_tokenizer_files(tmp, model_max_length)
        return CLIPTokenizer.from_pretrained(tmp, local_files_only=True)


def special_token_ids(tokenizer) -> dict[str, int]:
    """The ``bos`` / ``eos`` / ``pad`` token ids of ``tokenizer``, as CLIP text-encoder config entries."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_tiny_components(
    seed: int = 0, architecture: str = "sdxl", prediction_type: str | None = None
) -> dict[str, Any]:
    """Tiny random components named as the diffusers pipeline arguments of ``architecture``.

    ``sdxl`` keys: ``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``, ``tokenizer``, ``tokenizer_2``,
    ``scheduler`` (DDPM, SDXL schedule), ``image_encoder`` and ``feature_extractor`` (a ``CLIPImageProcessor`` at the
    encoder's size), so ``StableDiffusionXLPipeline(**build_tiny_components())`` works and ``save_pretrained`` writes
    a folder that :func:`~patchdpo_fast.models.build_models` loads. ``sd15`` has no ``text_encoder_2`` /
    ``tokenizer_2`` (``StableDiffusionPipeline(**components, safety_checker=None, requires_safety_checker=False)``).
    ``prediction_type`` (``epsilon`` / ``v_prediction``) overrides the scheduler's. Deterministic in ``seed``; the
    global RNG state is left untouched.
    """
    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {architecture!r}; choose one of {TINY_ARCHITECTURES}")
    import torch
    from diffusers import DDPMScheduler
    from transformers import (
        CLIPImageProcessor,
    )

    tokenizer = build_tiny_tokenizer()
    tokenizer_2 = build_tiny_tokenizer()
    special = {"vocab_size": 1000, **special_token_ids(tokenizer)}
    sd15 = architecture == "sd15"
    with torch.random.fork_rng(devices=[]):
        modules = instantiate_components(
            TINY_SD15_UNET if sd15 else TINY_UNET, TINY_SD15_VAE if sd15 else TINY_VAE,
            {**TINY_TEXT_ENCODER, **special}, None if sd15 else {**TINY_TEXT_ENCODER, **special},
            TINY_IMAGE_ENCODER, seed,
        )  # fmt: skip
    size = TINY_IMAGE_ENCODER["image_size"]
    scheduler = {**SDXL_DDPM_CONFIG, **({"prediction_type": prediction_type} if prediction_type else {})}
    out = {
        **modules,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": DDPMScheduler.from_config(scheduler),
        "feature_extractor": CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        ),
    }
    if sd15:
        del out["text_encoder_2"], out["tokenizer_2"]
    return out


def instantiate_components(
    unet: dict[str, Any],
    vae: dict[str, Any],
    text_encoder: dict[str, Any],
    text_encoder_2: dict[str, Any] | None,
    image_encoder: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    """Randomly initialized UNet, VAE, the text encoder(s) and the CLIP image encoder from their configs (eval mode).

    Each component is seeded on its own (``seed``, ``seed + 1``, ...), so one component's size does not change the
    others' weights. ``text_encoder_2=None`` (SD1.5-class) builds no second text encoder (``None`` in the result).
    Runs in the caller's RNG scope and device context.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(seed)
    unet_model = UNet2DConditionModel(**unet)
    torch.manual_seed(seed + 1)
    vae_model = AutoencoderKL(**vae)
    torch.manual_seed(seed + 2)
    text_model = CLIPTextModel(CLIPTextConfig(**text_encoder))
    text_model_2 = None
    if text_encoder_2 is not None:
        torch.manual_seed(seed + 3)
        text_model_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_encoder_2)).eval()
    torch.manual_seed(seed + 4)
    image_model = CLIPVisionModelWithProjection(CLIPVisionConfig(**image_encoder))
    return {
        "unet": unet_model.eval(),
        "vae": vae_model.eval(),
        "text_encoder": text_model.eval(),
        "text_encoder_2": text_model_2,
        "image_encoder": image_model.eval(),
    }
