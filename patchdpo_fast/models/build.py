"""Build the IP-Adapter-Plus model bundle that PatchDPO training needs (SDXL- or SD1.5-class), tiny or pretrained.

The base model's family is read from its UNet's config, never from a name: ``addition_embed_type="text_time"``
means SDXL-class (two text encoders, pooled text + micro-conditioning time ids, the IP-Adapter-Plus SDXL Resampler
1280 wide with 20 heads); no ``addition_embed_type`` means SD1.5-class (one text encoder whose last hidden state is
the cross-attention input, no added conditioning, the ``ip-adapter-plus_sd15`` Resampler: ``cross_attention_dim``
wide, 12 heads of 64 for 768).

:func:`build_models` returns a :class:`PatchDPOModels` with the frozen encoders, the noise scheduler and an
:class:`~patchdpo_fast.models.ip_adapter.IPAdapterUNet` (frozen UNet + trainable adapter + the frozen reference
adapter when ``reference=True``, as the DPO losses need). Nothing downloads: pretrained components load from local
folders with ``local_files_only=True``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .ip_adapter import IPAdapterUNet, check_adapter_fits, read_ip_adapter_file, unet_added_conditioning
from .pixel_space import PixelSpaceAutoencoder, is_pixel_space_folder
from .resampler import Resampler, resampler_config_from_state_dict
from .tiny import TINY_ARCHITECTURES, TINY_RESAMPLER, build_tiny_components

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

__all__ = ["CLIP_IMAGE_MEAN", "CLIP_IMAGE_STD", "PatchDPOModels", "build_models", "default_resampler_config"]

CLIP_IMAGE_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

PRETRAINED_SUBFOLDERS: tuple[str, ...] = (
    "unet",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "scheduler",
)
#: The subfolders only an SDXL-class base model (UNet ``addition_embed_type="text_time"``) needs.
SDXL_ONLY_SUBFOLDERS: tuple[str, ...] = ("text_encoder_2", "tokenizer_2")

#: IP-Adapter-Plus SDXL Resampler shape (``ip-adapter-plus_sdxl_vit-h``); SD1.5-class UNets use
#: ``dim = cross_attention_dim`` with ``dim / 64`` heads (``ip-adapter-plus_sd15``: 768 wide, 12 heads).
_SDXL_PLUS_RESAMPLER = {"dim": 1280, "heads": 20}


def default_resampler_config(
    unet: Any, embedding_dim: int, num_ip_tokens: int = 16, *, tiny: bool = False, depth: int = 4
) -> dict[str, int]:
    """The IP-Adapter-Plus Resampler shape for ``unet``, chosen by the UNet's config as the official code does.

    SDXL-class (``addition_embed_type="text_time"``): width 1280, 20 heads of 64; SD1.5-class (no added
    conditioning): width ``cross_attention_dim``, ``cross_attention_dim / 64`` heads (768 and 12 for SD1.5). Both:
    depth 4, ``ff_mult`` 4, ``output_dim = cross_attention_dim``, ``embedding_dim`` = the image encoder's hidden
    size. ``tiny`` uses :data:`~patchdpo_fast.models.tiny.TINY_RESAMPLER`'s width and heads.
    """
    cross_dim = int(unet.config.cross_attention_dim)
    if tiny:
        dim, heads = TINY_RESAMPLER["dim"], TINY_RESAMPLER["heads"]
    elif unet_added_conditioning(unet):
        dim, heads = _SDXL_PLUS_RESAMPLER["dim"], _SDXL_PLUS_RESAMPLER["heads"]
    else:
        dim, heads = cross_dim, max(1, cross_dim // 64)
    return {
        "dim": dim,
        "depth": depth,
        "dim_head": 64,
        "heads": heads,
        "num_queries": num_ip_tokens,
        "embedding_dim": int(embedding_dim),
        "output_dim": cross_dim,
        "ff_mult": 4,
    }


@dataclass
class PatchDPOModels:
    """Everything the PatchDPO training loop needs from the model side.

    Frozen: ``vae`` (always fp32), ``text_encoder``, ``text_encoder_2`` (``None`` for an SD1.5-class base model),
    ``image_encoder`` and the UNet inside ``ip_unet``. Trainable: the IP K/V projections (plus the resampler when
    ``ip_unet.train_resampler``, the UNet when ``ip_unet.train_unet``).
    Wrap ``ip_unet`` for distributed training and call it with :meth:`predict_noise`'s arguments.
    :meth:`release_encoders` drops the VAE and the encoders once nothing needs them (an input cache serves every
    input); they are ``None`` afterwards.
    """

    ip_unet: IPAdapterUNet
    vae: AutoencoderKL | None
    text_encoder: CLIPTextModel | None
    text_encoder_2: CLIPTextModelWithProjection | None
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer | None
    image_encoder: CLIPVisionModelWithProjection | None
    noise_scheduler: DDPMScheduler
    image_mean: tuple[float, float, float] = CLIP_IMAGE_MEAN
    image_std: tuple[float, float, float] = CLIP_IMAGE_STD
    weight_dtype: torch.dtype = torch.float32
    encoders_released: bool = False

    # ------------------------------------------------------------------ properties
    @property
    def unet(self) -> UNet2DConditionModel:
        """The frozen UNet (with the IP processors installed)."""
        return self.ip_unet.unet

    @property
    def image_proj(self) -> Resampler | None:
        """The (policy) resampler (``None`` without an IP-Adapter)."""
        return self.ip_unet.image_proj

    @property
    def added_conditioning(self) -> bool:
        """Whether the UNet takes SDXL's pooled text embedding and time ids (from its config; False: SD1.5-class)."""
        return unet_added_conditioning(self.unet)

    @property
    def device(self) -> torch.device:
        """Device of the UNet."""
        return self.unet.conv_in.weight.device

    @property
    def vae_scale_factor(self) -> int:
        """Pixel-to-latent downsampling factor (8 for SDXL and for the tiny VAE, ``f`` in pixel space)."""
        return 2 ** (len(self._encoder("vae").config.block_out_channels) - 1)

    @property
    def num_ip_tokens(self) -> int:
        """Number of image-prompt tokens."""
        return self.ip_unet.num_ip_tokens

    @property
    def image_size(self) -> int:
        """Input resolution of the CLIP image encoder."""
        return int(self._encoder("image_encoder").config.image_size)

    # ------------------------------------------------------------------ releasing the encoders
    def release_encoders(self) -> None:
        """Drop the VAE, both text encoders and the image encoder (the tokenizers and the UNet stay).

        For training from an input cache that serves every input: their weights are freed as soon as nothing else
        holds them (on the CPU as on an accelerator). The ``encode_*`` / ``decode_latents`` methods raise afterwards.
        """
        self.vae = self.text_encoder = self.text_encoder_2 = self.image_encoder = None
        self.encoders_released = True

    def _encoder(self, name: str) -> torch.nn.Module:
        module = getattr(self, name)
        if module is None and name == "image_encoder" and not self.ip_unet.has_ip_adapter:
            raise RuntimeError(
                "this model has no IP-Adapter and so no image encoder (model.use_ip_adapter=false): it is conditioned "
                "on text only"
            )
        if module is None:
            raise RuntimeError(
                f"the {name} was released (PatchDPOModels.release_encoders: the input cache serves every input); "
                "build the models again to encode"
            )
        return module

    # ------------------------------------------------------------------ encoders (no gradients)
    @torch.no_grad()
    def encode_images(
        self, pixels: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> torch.Tensor:
        """VAE-encode images in ``[-1, 1]``, ``(B, 3, H, W)`` -> scaled latents ``(B, 4, H/8, W/8)`` (fp32).

        The VAE runs in fp32. ``sample`` draws from the posterior (as SDXL training does); ``False`` takes its mode.
        """
        vae = self._encoder("vae")
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        latents = dist.sample(generator) if sample else dist.mode()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode_images`: scaled latents -> images in ``[-1, 1]`` (fp32)."""
        vae = self._encoder("vae")
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift
        return vae.decode(latents).sample.float()

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text conditioning for a list of prompts, as the UNet's family was trained with it.

        Returns:
            SDXL-class: ``prompt_embeds`` ``(B, 77, C1 + C2)``, the penultimate hidden states of both text encoders
            concatenated, and ``pooled_prompt_embeds`` ``(B, P)``, the projected pooled output of ``text_encoder_2``.
            SD1.5-class: ``prompt_embeds`` ``(B, 77, C)``, the text encoder's last hidden state (after its final
            layer norm, as ``StableDiffusionPipeline`` and IP-Adapter's SD1.5 training use it), and ``None``.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if self.text_encoder_2 is None and not self.encoders_released:
            encoder = self._encoder("text_encoder")
            ids = self.tokenizer(
                list(prompts),
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(encoder.device)
            return encoder(ids)[0], None
        for name in ("text_encoder", "text_encoder_2"):
            self._encoder(name)  # raises if released
        hidden: list[torch.Tensor] = []
        pooled = None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(
                list(prompts),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(encoder.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # text_embeds of CLIPTextModelWithProjection (the last encoder)
        return torch.cat(hidden, dim=-1), pooled

    def add_time_ids(
        self,
        batch: int,
        resolution: int | tuple[int, int],
        original_size: tuple[int, int] | None = None,
        crop_top_left: tuple[int, int] = (0, 0),
    ) -> torch.Tensor | None:
        """SDXL micro-conditioning ``(batch, 6)``: ``original_size + crop_top_left + target_size`` (fp32).

        ``None`` for an SD1.5-class UNet (no added conditioning).
        """
        if not self.added_conditioning:
            return None
        target = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        original = target if original_size is None else tuple(original_size)
        ids = torch.tensor([*original, *crop_top_left, *target], dtype=torch.float32, device=self.device)
        return ids.unsqueeze(0).repeat(batch, 1)

    @torch.no_grad()
    def encode_reference_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP image features of reference images in ``[0, 1]`` ``(B, 3, H, W)``, as IP-Adapter-Plus uses them.

        Resizes the shorter side to the encoder's image size (bicubic, antialiased), center-crops, normalizes with
        the CLIP mean/std and returns the penultimate hidden states ``(B, 1 + patches, hidden)``.
        """
        size = self.image_size  # raises if the image encoder was released
        param = self.image_encoder.vision_model.embeddings.patch_embedding.weight
        x = pixels.to(param.device, torch.float32)
        h, w = x.shape[-2:]
        if (h, w) != (size, size):
            scale = size / min(h, w)
            new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
            top, left = (new_h - size) // 2, (new_w - size) // 2
            x = x[..., top : top + size, left : left + size]
        mean = torch.tensor(self.image_mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=x.device).view(1, 3, 1, 1)
        x = ((x.clamp(0, 1) - mean) / std).to(param.dtype)
        return self.image_encoder(pixel_values=x, output_hidden_states=True).hidden_states[-2]

    @torch.no_grad()
    def null_image_features(self, batch: int = 1) -> torch.Tensor:
        """Image features of the dropped image prompt: the encoder on an all-zero (already normalized) input.

        This is IP-Adapter(-Plus)'s convention for image-prompt dropout in training and for the unconditional branch
        of classifier-free guidance; training and generation both use it.
        """
        size = self.image_size
        param = self.image_encoder.vision_model.embeddings.patch_embedding.weight
        zeros = torch.zeros(batch, 3, size, size, device=param.device, dtype=param.dtype)
        return self.image_encoder(pixel_values=zeros, output_hidden_states=True).hidden_states[-2]

    # ------------------------------------------------------------------ denoiser
    def predict_noise(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor | None,
        time_ids: torch.Tensor | None,
        image_features: torch.Tensor,
        use_reference: bool | None = None,
    ) -> torch.Tensor:
        """Noise prediction of the policy adapter, or of the frozen reference adapter (no gradients).

        ``use_reference=None`` follows :meth:`reference_mode` (policy outside it). See :meth:`IPAdapterUNet.forward`
        for shapes.
        """
        return self.ip_unet(
            noisy_latents,
            timesteps,
            prompt_embeds,
            pooled_prompt_embeds,
            time_ids,
            image_features,
            use_reference=use_reference,
        )

    # ------------------------------------------------------------------ training helpers
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters to optimize (IP K/V projections, plus the resampler if it trains)."""
        return self.ip_unet.trainable_parameters()

    def enable_gradient_checkpointing(self) -> None:
        """Activation checkpointing in the UNet."""
        self.ip_unet.enable_gradient_checkpointing()

    def reference_mode(self, enabled: bool = True) -> contextlib.AbstractContextManager[None]:
        """Context manager switching every forward to the frozen reference adapter."""
        return self.ip_unet.reference_mode(enabled)

    def sync_reference(self) -> None:
        """Copy the current policy adapter into the reference adapter."""
        self.ip_unet.sync_reference()

    def set_attention_backend(self, backend: str, xformers_fallback: bool = True) -> str:
        """Switch the UNet's attention backend (``sdpa``/``xformers``/``eager``); returns the backend in use."""
        return self.ip_unet.set_attention_backend(backend, xformers_fallback)

    def export_ip_adapter(self, path: str | os.PathLike, dtype: torch.dtype | None = torch.float16) -> Path:
        """Write the policy adapter as a stock-diffusers-loadable IP-Adapter-Plus safetensors file (fp16 by default;
        see :meth:`IPAdapterUNet.export_ip_adapter`)."""
        return self.ip_unet.export_ip_adapter(path, dtype=dtype)

    def load_ip_adapter_weights(self, path: str | os.PathLike, update_reference: bool = True) -> None:
        """Load an IP-Adapter-Plus file (``.safetensors`` or official ``.bin``) into the adapter."""
        self.ip_unet.load_ip_adapter_weights(path, update_reference=update_reference)

    def export_unet(self, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write the UNet (without the IP processors) as a stock diffusers ``unet/`` folder."""
        return self.ip_unet.export_unet(folder, dtype=dtype)

    def adapter_state_dict(self, include_reference: bool = False) -> dict[str, torch.Tensor]:
        """Adapter training checkpoint (policy tensors; see :meth:`IPAdapterUNet.adapter_state_dict`)."""
        return self.ip_unet.adapter_state_dict(include_reference=include_reference)

    def load_adapter_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> bool:
        """Load :meth:`adapter_state_dict` output; returns whether reference weights were in it (and loaded)."""
        return self.ip_unet.load_adapter_state_dict(state_dict, strict=strict)

    def to(self, device: str | torch.device) -> PatchDPOModels:
        """Move every module to ``device`` (dtypes unchanged); returns ``self``."""
        for module in (self.ip_unet, self.vae, self.text_encoder, self.text_encoder_2, self.image_encoder):
            if module is not None:
                module.to(device)
        return self


# ---------------------------------------------------------------------- construction helpers
def _transformers_dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56.0") else "torch_dtype"
    return {key: dtype}


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path} (nothing is downloaded; pass a local folder)")
    return path


def _pretrained_components(
    pretrained_model_path: str | os.PathLike,
    image_encoder_path: str | os.PathLike,
    weight_dtype: torch.dtype,
    variant: str | None,
    vae_path: str | os.PathLike | None,
    prediction_type: str | None = None,
    use_ip_adapter: bool = True,
):
    """Load the frozen components from local folders; the UNet's config decides whether the base model is SDXL-class
    (``text_encoder_2`` / ``tokenizer_2`` loaded too) or SD1.5-class (one text encoder; a second one is ignored)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

    root = _require_dir(Path(pretrained_model_path), "base model folder (pretrained_path)")
    _require_dir(root / "unet", "base model subfolder 'unet'")
    image_dir = None
    if use_ip_adapter:
        image_dir = _require_dir(Path(image_encoder_path), "CLIP image-encoder folder (image_encoder_path)")
    tf_dtype = _transformers_dtype_kwargs(weight_dtype)
    common = {"local_files_only": True}

    unet = UNet2DConditionModel.from_pretrained(
        root, subfolder="unet", torch_dtype=weight_dtype, variant=variant, **common
    )
    sdxl = unet_added_conditioning(unet)
    for sub in PRETRAINED_SUBFOLDERS:
        if (sub == "vae" and vae_path is not None) or (sub in SDXL_ONLY_SUBFOLDERS and not sdxl):
            continue
        what = "SDXL-class (UNet addition_embed_type text_time) " if sub in SDXL_ONLY_SUBFOLDERS else ""
        _require_dir(root / sub, f"{what}base model subfolder '{sub}'")
    vae_dir = _require_dir(Path(vae_path), "VAE folder (vae_path)") if vae_path is not None else root / "vae"
    if is_pixel_space_folder(vae_dir):
        vae = PixelSpaceAutoencoder.from_config(PixelSpaceAutoencoder.load_config(vae_dir))
    elif vae_path is not None:
        vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32, **common)
    else:
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=torch.float32, variant=variant, **common)
    text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", variant=variant, **tf_dtype, **common)
    tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", **common)
    text_encoder_2 = tokenizer_2 = None
    if sdxl:
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            root, subfolder="text_encoder_2", variant=variant, **tf_dtype, **common
        )
        tokenizer_2 = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer_2", **common)
    overrides = {"prediction_type": prediction_type} if prediction_type else {}
    scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler", **overrides, **common)
    image_encoder = None
    if image_dir is not None:
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(image_dir, **tf_dtype, **common)
    return unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, image_encoder, scheduler


def _check_text_width(unet: Any, text_encoder: Any, text_encoder_2: Any | None) -> None:
    """The text tokens' width (one encoder, or both concatenated) must be the UNet's cross-attention width."""
    widths = [int(e.config.hidden_size) for e in (text_encoder, text_encoder_2) if e is not None]
    cross_dim = int(unet.config.cross_attention_dim)
    if sum(widths) != cross_dim:
        raise ValueError(
            f"the text encoder(s) produce tokens of width {' + '.join(map(str, widths))} = {sum(widths)}, but the "
            f"UNet's cross_attention_dim is {cross_dim}: the text encoders do not belong to this UNet"
        )


def _image_norm_stats(image_encoder_path: str | os.PathLike | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if image_encoder_path is not None:
        cfg_file = Path(image_encoder_path) / "preprocessor_config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            if "image_mean" in cfg and "image_std" in cfg:
                return tuple(float(v) for v in cfg["image_mean"]), tuple(float(v) for v in cfg["image_std"])
    return CLIP_IMAGE_MEAN, CLIP_IMAGE_STD


def build_models(
    *,
    tiny: bool = False,
    seed: int = 0,
    pretrained_model_path: str | os.PathLike | None = None,
    image_encoder_path: str | os.PathLike | None = None,
    ip_adapter_path: str | os.PathLike | None = None,
    vae_path: str | os.PathLike | None = None,
    variant: str | None = None,
    weight_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    train_resampler: bool = False,
    attention_backend: str = "sdpa",
    xformers_fallback: bool = True,
    ip_scale: float = 1.0,
    num_ip_tokens: int = 16,
    resampler_dim: int | None = None,
    resampler_heads: int | None = None,
    resampler_depth: int = 4,
    gradient_checkpointing: bool = False,
    train_unet: bool = False,
    reference: bool = True,
    train_adapter: bool = True,
    tiny_architecture: str = "sdxl",
    prediction_type: str | None = None,
    use_ip_adapter: bool = True,
) -> PatchDPOModels:
    """Build IP-Adapter-Plus on an SDXL- or SD1.5-class base model for PatchDPO training.

    The base model's family comes from its UNet's config (see the module docstring), so the same call builds either.

    Args:
        tiny: build tiny randomly initialized components (CPU tests / demos) instead of loading.
        seed: seed of every random initialization (tiny components, resampler, IP K/V when not loaded).
        pretrained_model_path: local diffusers folder of the base model: ``unet/``, ``vae/``, ``text_encoder/``,
            ``tokenizer/``, ``scheduler/`` and, for an SDXL-class UNet, ``text_encoder_2/``, ``tokenizer_2/``;
            required unless ``tiny``.
        image_encoder_path: local CLIP vision folder (``CLIPVisionModelWithProjection``); required unless ``tiny``.
        ip_adapter_path: optional IP-Adapter-Plus checkpoint (``.safetensors`` or official ``.bin``, read with
            ``weights_only=True``); the resampler shape is read from it, and policy and reference both start from it.
        vae_path: optional separate VAE folder (e.g. an fp16-safe SDXL VAE) replacing ``pretrained_model_path/vae``.
        variant: weight-file variant of the pretrained folder (e.g. ``"fp16"``).
        weight_dtype: dtype of the frozen UNet, text encoders and image encoder. The VAE stays fp32, the adapter
            (trainable and reference) is fp32.
        device: device to place everything on.
        train_resampler: also train the resampler (paper default: only the IP K/V projections train).
        attention_backend: ``"sdpa"`` (default), ``"xformers"`` or ``"eager"``.
        xformers_fallback: if xformers is unusable, warn and use sdpa (True) or raise (False).
        ip_scale: weight of the image branch of every IP cross-attention.
        num_ip_tokens, resampler_dim, resampler_heads, resampler_depth: resampler shape when no ``ip_adapter_path``
            is given (defaults: 16 tokens, depth 4 and :func:`default_resampler_config`'s width and heads: 1280 / 20
            for SDXL-class, 768 / 12 for SD1.5, 32 / 2 tiny).
        gradient_checkpointing: enable activation checkpointing in the UNet.
        train_unet: also train the UNet's own weights (full finetuning; the UNet is kept in fp32 then, whatever
            ``weight_dtype``, as trainable master weights are).
        reference: build the frozen reference adapter (a copy of the initial adapter) that the DPO losses need;
            the trainer passes ``False`` for the other losses and whenever the adapter does not train.
        train_adapter: train the IP-Adapter (``False``: only the UNet, or a LoRA on it, trains; see
            :mod:`patchdpo_fast.training.trainable`).
        tiny_architecture: with ``tiny``, ``"sdxl"`` (default) or ``"sd15"`` (see :mod:`~patchdpo_fast.models.tiny`).
        prediction_type: override the noise scheduler's ``prediction_type`` (``"epsilon"`` or ``"v_prediction"``);
            ``None`` keeps the scheduler config's (the training target follows it).
        use_ip_adapter: ``False`` builds the base model without an IP-Adapter: no resampler, no IP processors, no
            image encoder (``image_encoder_path`` may be None), text-only conditioning; for training the UNet (or a
            LoRA on it) on plain preference pairs. Needs ``train_adapter=False`` and no ``ip_adapter_path``.

    Raises:
        FileNotFoundError: a given folder or file does not exist (the message names it).
        ValueError: inconsistent arguments (e.g. ``tiny`` together with pretrained paths).
    """
    if tiny:
        if pretrained_model_path is not None or image_encoder_path is not None or vae_path is not None:
            raise ValueError("tiny=True builds random components; do not pass pretrained_model_path/image_encoder_path")
    elif pretrained_model_path is None or (image_encoder_path is None and use_ip_adapter):
        raise ValueError("pass tiny=True, or both pretrained_model_path and image_encoder_path (local folders)")
    if not use_ip_adapter and (train_adapter or ip_adapter_path is not None or train_resampler):
        raise ValueError("use_ip_adapter=False builds no IP-Adapter: pass train_adapter=False and no ip_adapter_path")
    if tiny_architecture not in TINY_ARCHITECTURES:
        raise ValueError(f"tiny_architecture must be one of {TINY_ARCHITECTURES}, got {tiny_architecture!r}")
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be None, 'epsilon' or 'v_prediction', got {prediction_type!r}")

    adapter_groups = None
    if ip_adapter_path is not None:
        adapter_groups = read_ip_adapter_file(ip_adapter_path)  # raises FileNotFoundError naming the path

    with torch.random.fork_rng(devices=[]):
        if tiny:
            c = build_tiny_components(seed, tiny_architecture, prediction_type)
            parts = tuple(
                c.get(k) for k in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
            )
            parts += (c["image_encoder"], c["scheduler"])
        else:
            parts = _pretrained_components(
                pretrained_model_path, image_encoder_path, weight_dtype, variant, vae_path, prediction_type,
                use_ip_adapter,
            )  # fmt: skip
        unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, image_encoder, scheduler = parts
        if not use_ip_adapter:
            image_encoder = None  # text-only conditioning
        _check_text_width(unet, text_encoder, text_encoder_2)

        frozen = [m for m in (unet, vae, text_encoder, text_encoder_2, image_encoder) if m is not None]
        if tiny and weight_dtype != torch.float32:
            for module in (unet, text_encoder, text_encoder_2, image_encoder):
                if module is not None:
                    module.to(weight_dtype)
        if train_unet and unet.dtype != torch.float32:
            unet.to(torch.float32)
        for module in frozen:
            module.requires_grad_(False)
            module.eval()

        embed_dim = int(image_encoder.config.hidden_size) if image_encoder is not None else 0
        if adapter_groups is not None:
            check_adapter_fits(adapter_groups, unet, ip_adapter_path)
            cfg = resampler_config_from_state_dict(adapter_groups["image_proj"])
            if cfg["embedding_dim"] != embed_dim:
                raise ValueError(
                    f"IP-Adapter {ip_adapter_path} expects image features of width {cfg['embedding_dim']}, but the "
                    f"image encoder produces {embed_dim}"
                )
        else:
            cfg = default_resampler_config(unet, embed_dim, num_ip_tokens, tiny=tiny, depth=resampler_depth)
            cfg["dim"] = resampler_dim or cfg["dim"]
            cfg["heads"] = resampler_heads or cfg["heads"]
        torch.manual_seed(seed + 5)
        resampler = Resampler(**cfg).float() if use_ip_adapter else None

        ip_unet = IPAdapterUNet(
            unet,
            resampler,
            train_resampler=train_resampler,
            attention_backend=attention_backend,
            xformers_fallback=xformers_fallback,
            ip_scale=ip_scale,
            train_unet=train_unet,
            reference=reference,
            train_adapter=train_adapter,
        )
    if adapter_groups is not None:
        ip_unet.load_ip_adapter_weights(adapter_groups, update_reference=True)
    ip_unet.eval()
    if gradient_checkpointing:
        ip_unet.enable_gradient_checkpointing()

    mean, std = _image_norm_stats(image_encoder_path)
    models = PatchDPOModels(
        ip_unet=ip_unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        image_encoder=image_encoder,
        noise_scheduler=scheduler,
        image_mean=mean,
        image_std=std,
        weight_dtype=weight_dtype,
    )
    return models.to(device)
