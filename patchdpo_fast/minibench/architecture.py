"""The mini world's IP-Adapter-Plus: SDXL's structure at a size that learns from scratch on 2 CPU cores.

Every component is a stock diffusers / transformers class built from a config, so the whole library runs on it
unchanged (``patchdpo train``, ``build-pairs``, ``quality``, generation): a UNet with SDXL's blocks and
``text_time`` micro-conditioning, two CLIP text encoders whose hidden states are concatenated, a CLIP vision tower
whose penultimate hidden states feed a Perceiver Resampler, decoupled IP cross-attention. What differs is size and
one substitution: no VAE but :class:`~patchdpo_fast.models.pixel_space.PixelSpaceAutoencoder` (an exact
space-to-depth fold, so diffusion runs on pixels and the renderer's ground truth is directly comparable), and a
cosine noise schedule suited to pixels.

:func:`write_initial_model` writes the randomly initialized model as local folders in the layout
:func:`patchdpo_fast.models.build_models` loads (``base/{unet,vae,text_encoder,...}``, ``image_encoder/`` and the
initial adapter file); the text and image encoders stay frozen and random (they carry the information: the image
tower's patch embedding is wider than a patch's pixels), the UNet and the adapter are what pretraining learns.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from patchdpo_fast.data.procedural import CONTEXTS
from patchdpo_fast.minibench.world import POSITIONS, SCALES

__all__ = ["SIZES", "MiniArchitecture", "prompt_words", "write_initial_model"]

#: Noise schedule: DDPM training, cosine betas (better than SDXL's scaled-linear one on pixels) and v-prediction (its
#: clean-image estimate stays well conditioned near pure noise, where an epsilon target divides by a vanishing signal
#: level); samplers built from it space their steps "trailing", so the first step starts from pure noise, and clip
#: their clean-image estimate to the pixel range [-1, 1].
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "timestep_spacing": "trailing",
}


@dataclass(frozen=True)
class MiniArchitecture:
    """Sizes of the mini world's model. ``unet_channels`` lists the UNet's block widths (the first level has no
    attention, like SDXL's); the latent grid is ``resolution / downsample``."""

    unet_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    head_dim: int = 32
    text_width: int = 64  #: per text encoder; cross-attention width = 2 x this
    text_layers: int = 2
    max_prompt_tokens: int = 16
    image_width: int = 96
    image_patch: int = 4
    image_layers: int = 2
    resampler_dim: int = 128
    resampler_heads: int = 2
    num_ip_tokens: int = 16
    downsample: int = 2
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cross_attention_dim(self) -> int:
        return 2 * self.text_width

    def unet_config(self, resolution: int) -> dict[str, Any]:
        n = len(self.unet_channels)
        return {
            "sample_size": resolution // self.downsample,
            "in_channels": 3 * self.downsample**2,
            "out_channels": 3 * self.downsample**2,
            "block_out_channels": tuple(self.unet_channels),
            "layers_per_block": self.layers_per_block,
            "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
            "up_block_types": ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
            "attention_head_dim": tuple(max(1, c // self.head_dim) for c in self.unet_channels),
            "transformer_layers_per_block": (1,) * n,
            "use_linear_projection": True,
            "cross_attention_dim": self.cross_attention_dim,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + self.text_width,
            "norm_num_groups": 16,
        }

    def text_config(self, vocab_size: int, special: dict[str, int]) -> dict[str, Any]:
        return {
            "vocab_size": vocab_size,
            "hidden_size": self.text_width,
            "intermediate_size": 2 * self.text_width,
            "num_attention_heads": 4,
            "num_hidden_layers": self.text_layers,
            "max_position_embeddings": self.max_prompt_tokens,
            "projection_dim": self.text_width,
            "hidden_act": "gelu",
            **special,
        }

    def image_config(self, resolution: int) -> dict[str, Any]:
        return {
            "hidden_size": self.image_width,
            "intermediate_size": 2 * self.image_width,
            "num_attention_heads": 4,
            "num_hidden_layers": self.image_layers,
            "image_size": resolution,
            "patch_size": self.image_patch,
            "projection_dim": self.image_width,
            "hidden_act": "gelu",
        }


#: Named sizes (``--size``). ``default`` was chosen from measured learning curves (docs/minibench.md): at equal CPU
#: time the 1.8 M-parameter UNet got further than the 6.8 M one (``medium``), which runs 2.3x fewer images a second.
SIZES: dict[str, MiniArchitecture] = {
    "smoke": MiniArchitecture(unet_channels=(16, 32), text_width=16, image_width=48, resampler_dim=32, head_dim=16),
    "default": MiniArchitecture(unet_channels=(32, 64, 64)),
    "medium": MiniArchitecture(unet_channels=(64, 128, 128)),
}


def prompt_words() -> tuple[str, ...]:
    """Every word of the mini world's prompts (each becomes one token of the mini tokenizer)."""
    words: dict[str, None] = {}
    for phrase in [*CONTEXTS.values(), "a object in the on", *POSITIONS, *SCALES]:
        for word in phrase.replace(",", " ").split():
            words[word] = None
    return tuple(words)


def write_initial_model(folder: str | Path, arch: MiniArchitecture, resolution: int) -> dict[str, Path]:
    """Write the randomly initialized mini model into ``folder`` (replacing an earlier one).

    Returns ``{"base": ..., "image_encoder": ..., "ip_adapter": ...}``: a diffusers SDXL-layout folder (UNet, pixel
    space autoencoder, two text encoders and tokenizers, scheduler), a transformers CLIP vision folder, and the
    initial IP-Adapter-Plus file (random resampler; IP K/V projections initialised from the text K/V, as
    IP-Adapter training starts). Deterministic in ``arch.seed``.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from patchdpo_fast.models import build_models
    from patchdpo_fast.models.pixel_space import PixelSpaceAutoencoder
    from patchdpo_fast.models.tiny import write_tiny_clip_tokenizer_files

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    base, image_dir = folder / "base", folder / "image_encoder"
    for sub in ("tokenizer", "tokenizer_2"):
        write_tiny_clip_tokenizer_files(base / sub, arch.max_prompt_tokens, words=prompt_words())
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer", local_files_only=True)
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vocab = len(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(arch.seed)
        UNet2DConditionModel(**arch.unet_config(resolution)).save_pretrained(base / "unet")
        torch.manual_seed(arch.seed + 2)
        CLIPTextModel(CLIPTextConfig(**arch.text_config(vocab, special))).save_pretrained(base / "text_encoder")
        torch.manual_seed(arch.seed + 3)
        CLIPTextModelWithProjection(CLIPTextConfig(**arch.text_config(vocab, special))).save_pretrained(
            base / "text_encoder_2"
        )
        torch.manual_seed(arch.seed + 4)
        CLIPVisionModelWithProjection(CLIPVisionConfig(**arch.image_config(resolution))).save_pretrained(image_dir)
    PixelSpaceAutoencoder(downsample=arch.downsample).save_pretrained(base / "vae")
    DDPMScheduler.from_config(SCHEDULER_CONFIG).save_pretrained(base / "scheduler")
    # the image tower reads [0, 1] pixels normalized with mean 0.5 / std 0.5 (no CLIP photo statistics here)
    (image_dir / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}) + "\n"
    )
    models = build_models(
        pretrained_model_path=base,
        image_encoder_path=image_dir,
        seed=arch.seed,
        num_ip_tokens=arch.num_ip_tokens,
        resampler_dim=arch.resampler_dim,
        resampler_heads=arch.resampler_heads,
    )
    adapter = models.export_ip_adapter(folder / "ip_adapter_init.safetensors")
    (folder / "architecture.json").write_text(json.dumps({**asdict(arch), "resolution": resolution}, indent=2) + "\n")
    return {"base": base, "image_encoder": image_dir, "ip_adapter": adapter}
