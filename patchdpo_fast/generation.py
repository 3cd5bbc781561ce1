"""Image generation with our IP-Adapter-Plus: a stock diffusers pipeline around the training model.

:func:`build_pipeline` wraps a :class:`~patchdpo_fast.models.PatchDPOModels` (tiny or pretrained, the same code)
into a stock ``diffusers.StableDiffusionXLPipeline`` (SDXL-class UNet) or ``StableDiffusionPipeline`` (SD1.5-class
UNet: no added conditioning, one text encoder; chosen from the UNet's config) that *shares* the model's modules:
the UNet keeps our IP attention processors, so the pipeline's denoiser is exactly the training model's (same numbers,
no weight copy). The image prompt enters the way our processors read it: the IP tokens (the resampler's output) are
appended to the text embeddings, and the pipeline is called with ``prompt_embeds`` / ``negative_prompt_embeds``.

:func:`generate` turns reference images + prompts into images, with one ``torch.Generator`` per output image so
that every image depends only on its own seed (not on batch composition or order). Per prompt it takes one
reference image or several (a subject's references): with ``reference_mode="all"`` the IP tokens are averaged over
them, with ``"single"`` only the first is used.

Classifier-free guidance follows IP-Adapter's inference: the unconditional branch gets the negative prompt (the
empty prompt gives SDXL's zero text embedding) and the IP tokens of an all-zero CLIP input (``uncond_image="zeros"``,
as IP-Adapter-Plus was trained and as stock diffusers does) or of a black image (``"black"``).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from patchdpo_fast.data.files import to_pil

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    from patchdpo_fast.models import PatchDPOModels

__all__ = [
    "SCHEDULERS",
    "add_model_arguments",
    "build_pipeline",
    "generate",
    "image_prompt_tokens",
    "make_scheduler",
    "model_identity",
    "models_from_args",
    "pipeline_models",
    "resolved_dtype",
]

#: Sampler names accepted by :func:`make_scheduler`.
SCHEDULERS: tuple[str, ...] = ("euler", "ddim", "dpm", "ddpm")

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: The negative prompt of IP-Adapter's SDXL examples, used by build-pairs and DreamBench generation.
DEFAULT_NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"


def make_scheduler(name: str, config: Any) -> Any:
    """A diffusers sampler built from the training noise scheduler's ``config``.

    ``euler`` (SDXL's default, ``EulerDiscreteScheduler``), ``ddim``, ``dpm`` (``DPMSolverMultistepScheduler``) or
    ``ddpm``.
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    classes = {
        "euler": EulerDiscreteScheduler,
        "ddim": DDIMScheduler,
        "dpm": DPMSolverMultistepScheduler,
        "ddpm": DDPMScheduler,
    }
    if name not in classes:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {SCHEDULERS}")
    return classes[name].from_config(config)


def build_pipeline(models: PatchDPOModels, *, scheduler: str = "euler") -> StableDiffusionXLPipeline:
    """A stock ``StableDiffusionXLPipeline`` sharing ``models``' modules, with our IP-Adapter-Plus in its UNet.

    For an SD1.5-class UNet (``models.added_conditioning`` False) it is a ``StableDiffusionPipeline`` instead (no
    safety checker: it would need weights that are not part of the model).

    The pipeline runs where the models are (move them with ``models.to(device)`` first). Use :func:`generate` to
    run it with reference images; ``pipe.patchdpo_models`` holds ``models``.

    Args:
        models: the bundle from :func:`~patchdpo_fast.models.build_models` (tiny or pretrained).
        scheduler: sampler name, see :func:`make_scheduler`.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if not models.added_conditioning:
        pipe = StableDiffusionPipeline(
            vae=models.vae,
            text_encoder=models.text_encoder,
            tokenizer=models.tokenizer,
            unet=models.unet,
            scheduler=make_scheduler(scheduler, models.noise_scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            image_encoder=models.image_encoder,
            requires_safety_checker=False,
        )
        pipe.patchdpo_models = models
        pipe.set_progress_bar_config(disable=True)
        return pipe
    pipe = StableDiffusionXLPipeline(
        vae=models.vae,
        text_encoder=models.text_encoder,
        text_encoder_2=models.text_encoder_2,
        tokenizer=models.tokenizer,
        tokenizer_2=models.tokenizer_2,
        unet=models.unet,
        scheduler=make_scheduler(scheduler, models.noise_scheduler.config),
        image_encoder=models.image_encoder,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.patchdpo_models = models
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_models(pipe: Any) -> PatchDPOModels:
    """The :class:`PatchDPOModels` behind a pipeline from :func:`build_pipeline`."""
    models = getattr(pipe, "patchdpo_models", None)
    if models is None:
        raise ValueError("this pipeline was not built by patchdpo_fast.generation.build_pipeline")
    return models


def _to_tensor(image: Any) -> torch.Tensor:
    if isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3 and image.is_floating_point():
        return image.detach().float().clamp(0, 1)
    array = np.asarray(to_pil(image), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _is_single_image(x: Any) -> bool:
    if isinstance(x, (str, os.PathLike)):
        return True
    if isinstance(x, torch.Tensor):
        return x.ndim == 3
    if isinstance(x, np.ndarray):
        return x.ndim == 3
    return not isinstance(x, (list, tuple))


@torch.no_grad()
def image_prompt_tokens(
    models: PatchDPOModels,
    references: Sequence[Any],
    *,
    reference_mode: Literal["all", "single"] = "all",
    uncond_image: Literal["zeros", "black"] = "zeros",
) -> tuple[torch.Tensor, torch.Tensor]:
    """IP tokens per prompt, and the unconditional tokens.

    Args:
        models: the model bundle.
        references: one entry per prompt: an image (PIL, path, ``(3, H, W)`` tensor in [0, 1], ``(H, W, 3)`` array)
            or a sequence of images of one subject.
        reference_mode: ``"all"`` averages the IP tokens over an entry's images, ``"single"`` uses its first image.
        uncond_image: ``"zeros"`` (all-zero CLIP input, IP-Adapter's convention) or ``"black"`` (a black image).

    Returns:
        ``(tokens (P, N, C), uncond (1, N, C))`` on the resampler's device, fp32.
    """
    if reference_mode not in ("all", "single"):
        raise ValueError(f"reference_mode must be 'all' or 'single', got {reference_mode!r}")
    out = []
    for entry in references:
        images = [entry] if _is_single_image(entry) else list(entry)
        if not images:
            raise ValueError("a prompt has an empty list of reference images")
        if reference_mode == "single":
            images = images[:1]
        tokens = [models.ip_unet.ip_tokens(models.encode_reference_images(_to_tensor(im)[None])) for im in images]
        out.append(torch.cat(tokens).float().mean(0, keepdim=True))
    size = models.image_size
    device = models.image_encoder.device
    if uncond_image == "zeros":
        feats = models.null_image_features()
    elif uncond_image == "black":
        feats = models.encode_reference_images(torch.zeros(1, 3, size, size, device=device))
    else:
        raise ValueError(f"uncond_image must be 'zeros' or 'black', got {uncond_image!r}")
    uncond = models.ip_unet.ip_tokens(feats).float()
    return torch.cat(out), uncond


@torch.no_grad()
def generate(
    pipe: StableDiffusionXLPipeline,
    reference_images: Sequence[Any],
    prompts: Sequence[str],
    *,
    ip_scale: float = 1.0,
    steps: int = 30,
    guidance: float = 5.0,
    seed: int | Sequence[int] = 0,
    resolution: int = 1024,
    num_images_per_prompt: int = 1,
    negative_prompt: str = "",
    reference_mode: Literal["all", "single"] = "all",
    uncond_image: Literal["zeros", "black"] = "zeros",
    generators: Sequence[torch.Generator] | None = None,
    output_type: Literal["pil", "pt", "latent"] = "pil",
) -> list[Image.Image] | torch.Tensor:
    """Generate ``num_images_per_prompt`` images per (reference(s), prompt) with the IP-Adapter-Plus pipeline.

    Args:
        pipe: from :func:`build_pipeline`.
        reference_images: one entry per prompt (an image or a list of a subject's images, see
            :func:`image_prompt_tokens`); a single entry is used for every prompt.
        prompts: text prompts.
        ip_scale: weight of the image branch (restored afterwards).
        steps: sampler steps.
        guidance: classifier-free guidance scale (<= 1 disables guidance).
        seed: image ``i`` (prompt-major order: ``i = prompt * num_images_per_prompt + k``) is drawn with seed
            ``seed + i``, or ``seed[i]`` when a sequence is given. Generators are CPU generators, so results do not
            depend on the GPU model's random number generator.
        resolution: square output side in pixels (a multiple of 8).
        num_images_per_prompt: images per prompt.
        negative_prompt: negative text prompt for guidance.
        reference_mode: ``"all"`` (IP tokens averaged over an entry's images) or ``"single"`` (first image).
        uncond_image: unconditional image prompt, see :func:`image_prompt_tokens`.
        generators: explicit generators, one per output image (overrides ``seed``).
        output_type: ``"pil"`` (list of images), ``"pt"`` (``(N, 3, H, W)`` float tensor in [0, 1]) or ``"latent"``.
    """
    models = pipeline_models(pipe)
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts")
    refs = list(reference_images)
    if _is_single_image(reference_images):
        refs = [reference_images] * len(prompts)
    elif len(refs) == 1 and len(prompts) > 1:
        refs = refs * len(prompts)
    if len(refs) != len(prompts):
        raise ValueError(f"{len(refs)} reference entries for {len(prompts)} prompts")
    if resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8, got {resolution}")
    total = len(prompts) * num_images_per_prompt
    if generators is None:
        seeds = [seed + i for i in range(total)] if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != total:
            raise ValueError(f"{len(seeds)} seeds for {total} images")
        generators = [torch.Generator().manual_seed(s) for s in seeds]
    elif len(generators) != total:
        raise ValueError(f"{len(generators)} generators for {total} images")

    cfg = guidance > 1.0
    device = pipe._execution_device
    tokens, uncond = image_prompt_tokens(models, refs, reference_mode=reference_mode, uncond_image=uncond_image)
    encoded = pipe.encode_prompt(
        prompt=prompts,
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=cfg,
        negative_prompt=[negative_prompt] * len(prompts) if cfg else None,
    )
    if models.added_conditioning:
        embeds, neg_embeds, pooled, neg_pooled = encoded
    else:  # StableDiffusionPipeline: text tokens only
        (embeds, neg_embeds), pooled, neg_pooled = encoded, None, None
    dtype = embeds.dtype
    prompt_embeds = torch.cat([embeds, tokens.to(device, dtype)], dim=1)
    kwargs: dict[str, Any] = {}
    if cfg:
        kwargs["negative_prompt_embeds"] = torch.cat(
            [neg_embeds, uncond.to(device, dtype).expand(len(prompts), -1, -1)], dim=1
        )
        if neg_pooled is not None:
            kwargs["negative_pooled_prompt_embeds"] = neg_pooled
    if pooled is not None:
        kwargs["pooled_prompt_embeds"] = pooled

    previous = [proc.scale for proc in models.ip_unet.ip_processors.values()]
    models.ip_unet.set_ip_scale(ip_scale)
    try:
        result = pipe(
            prompt_embeds=prompt_embeds,
            num_images_per_prompt=num_images_per_prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=resolution,
            width=resolution,
            generator=list(generators),
            output_type="latent",
            **kwargs,
        )
    finally:
        for proc, scale in zip(models.ip_unet.ip_processors.values(), previous, strict=True):
            proc.scale = scale
    latents = result.images
    if output_type == "latent":
        return latents
    if output_type not in ("pil", "pt"):
        raise ValueError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
    # Decode with the model's fp32 VAE one image at a time: the pipeline would feed it half-precision latents (it
    # casts only for an fp16 VAE) and decode the whole batch at once.
    decoded = torch.cat([models.decode_latents(latents[i : i + 1]) for i in range(latents.shape[0])])
    if output_type == "pt":
        return (decoded / 2 + 0.5).clamp(0, 1).cpu()
    return pipe.image_processor.postprocess(decoded, output_type="pil")


# ----------------------------------------------------------------------------------------------------------------
# Command-line helpers shared by the generating commands (build-pairs, DreamBench generate)
# ----------------------------------------------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the model options: ``--tiny`` or ``--pretrained/--image-encoder[/--ip-adapter]``, dtype, device."""
    group = parser.add_argument_group("model (tiny, or local pretrained folders; nothing is downloaded)")
    group.add_argument("--tiny", action="store_true", help="use the tiny random-initialized model (CPU tests/demos)")
    group.add_argument("--tiny-seed", type=int, default=0, help="initialization seed of the tiny model (default 0)")
    group.add_argument("--pretrained", type=Path,
                       help="local diffusers base model folder, SDXL or SD1.5 class (e.g. RealVisXL_V1.0)")  # fmt: skip
    group.add_argument("--image-encoder", type=Path, help="local CLIP vision encoder folder")
    group.add_argument("--ip-adapter", type=Path, help="IP-Adapter-Plus weights (.safetensors or official .bin)")
    group.add_argument("--vae", type=Path, help="optional separate VAE folder")
    group.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="UNet/encoder dtype (default: fp16 on "
                       "GPU, fp32 on CPU)")  # fmt: skip
    group.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    group.add_argument("--scheduler", choices=SCHEDULERS, default="euler", help="sampler (default euler)")


def check_model_arguments(args: argparse.Namespace) -> None:
    """Check the :func:`add_model_arguments` options and the sampling options before any model loads.

    Raises:
        UserError: naming the option and what is expected.
    """
    from patchdpo_fast.errors import UserError
    from patchdpo_fast.models.checks import check_ip_adapter_file
    from patchdpo_fast.utils import resolve_device

    folders = (("--pretrained", args.pretrained), ("--image-encoder", args.image_encoder), ("--vae", args.vae))
    for flag, value in folders:
        if value is not None and not Path(value).is_dir():
            raise UserError(f"{flag} {value}: expected a local model folder")
    if args.ip_adapter is not None:
        check_ip_adapter_file(args.ip_adapter)
    if args.device is not None:
        resolve_device(args.device)
    for flag, minimum in (("steps", 1), ("batch_size", 1), ("num_images", 1), ("resolution", 8)):
        value = getattr(args, flag, None)
        if value is not None and value < minimum:
            raise UserError(f"--{flag.replace('_', '-')} must be >= {minimum}, got {value}")
    resolution = getattr(args, "resolution", None)
    if resolution is not None and resolution % 8:
        raise UserError(f"--resolution must be a multiple of 8 (the VAE factor), got {resolution}")
    for flag in ("guidance", "ip_scale"):
        value = getattr(args, flag, None)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UserError(f"--{flag.replace('_', '-')} must be a finite number >= 0, got {value}")


def _default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return "cpu"


def models_from_args(args: argparse.Namespace) -> PatchDPOModels:
    """Build the models named by :func:`add_model_arguments` options (on ``args.device``).

    Raises:
        ValueError: neither ``--tiny`` nor both ``--pretrained`` and ``--image-encoder``.
    """
    from patchdpo_fast.models import build_models

    if args.tiny == bool(args.pretrained or args.image_encoder):
        raise ValueError("pass --tiny, or --pretrained and --image-encoder (local folders)")
    if not args.tiny and not (args.pretrained and args.image_encoder):
        raise ValueError("--pretrained and --image-encoder are both required without --tiny")
    device = args.device or _default_device()
    return build_models(
        tiny=args.tiny,
        seed=args.tiny_seed,
        pretrained_model_path=None if args.tiny else args.pretrained,
        image_encoder_path=None if args.tiny else args.image_encoder,
        ip_adapter_path=args.ip_adapter,
        vae_path=args.vae,
        weight_dtype=_DTYPES[resolved_dtype(args)],
        device=device,
    )


def resolved_dtype(args: argparse.Namespace) -> str:
    """``--dtype``, or its default: ``fp16`` when the device is a GPU, ``fp32`` otherwise."""
    if args.dtype:
        return args.dtype
    return "fp16" if str(args.device or _default_device()).startswith("cuda") else "fp32"


def model_identity(args: argparse.Namespace) -> dict[str, Any]:
    """What identifies the generator of a run (for output provenance and resume checks)."""

    def file_id(path: Path | None) -> Any:
        if path is None:
            return None
        p = Path(path)
        return {"path": str(p), "bytes": p.stat().st_size if p.is_file() else None}

    if args.tiny:
        model: dict[str, Any] = {"tiny": True, "tiny_seed": args.tiny_seed}
    else:
        model = {"tiny": False, "pretrained": str(args.pretrained), "image_encoder": str(args.image_encoder)}
        if args.vae:
            model["vae"] = str(args.vae)
    model["ip_adapter"] = file_id(args.ip_adapter)
    model["dtype"] = resolved_dtype(args)
    model["scheduler"] = args.scheduler
    return model
