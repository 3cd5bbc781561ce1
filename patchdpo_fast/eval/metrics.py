"""DreamBench metrics: DINO, CLIP-I and CLIP-T, computed as the official evaluation computes them.

* **DINO**: DINO ViT-S/16 (transformers ``ViTModel``), the CLS token of the last layer after the final layer norm.
  Images: resize the shorter side to 256 (bicubic), center-crop 224, ImageNet mean/std.
* **CLIP-I**: CLIP ViT-B/32 image embeddings (``CLIPModel`` vision tower + visual projection). Images: resize the
  shorter side to 224 (bicubic), center-crop 224, CLIP mean/std.
* **CLIP-T**: the CLIP text embedding (text tower + text projection) of the image's prompt, 77 tokens, truncated.

Resize and crop follow torchvision's ``Resize(int)`` / ``CenterCrop`` on PIL images exactly (same output size
rounding, same crop offsets, PIL's bicubic filter), so features match the official scripts' preprocessing.

Scores: L2-normalized embeddings; for a subject with generated images ``G`` and reference images ``R``
(all of the subject's photos, or the one selected photo) the DINO / CLIP-I score is the mean of the ``|G| x |R|``
cosine-similarity matrix; CLIP-T is the mean over ``G`` of the image-prompt cosine similarity. The benchmark
score is the unweighted mean of the subject scores. Embeddings are computed in batches, in fp16 on GPUs; the
similarities are computed in fp32 (fp64 accumulation for the means).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EvalModels",
    "build_eval_models",
    "center_crop",
    "embed_clip_images",
    "embed_clip_texts",
    "embed_dino",
    "load_rgb",
    "preprocess",
    "resize_shorter",
    "similarity_matrix",
    "subject_scores",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

#: DINO preprocessing of the protocol: shorter side -> 256, center crop 224.
DINO_RESIZE, DINO_CROP = 256, 224

ImageLike = Image.Image | str | os.PathLike


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing (torchvision semantics on PIL images)
# ----------------------------------------------------------------------------------------------------------------


def load_rgb(image: ImageLike) -> Image.Image:
    """A PIL RGB image from a PIL image or a path.

    Raises:
        FileNotFoundError / ValueError: a missing or unreadable file (the message names it).
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    from patchdpo_fast.data.files import load_pil

    return load_pil(image)


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (bicubic); the longer side is ``int(size * long / short)``.

    Same as torchvision ``Resize(size, interpolation=BICUBIC)`` on a PIL image (no-op when already that size).
    """
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return image
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision ``CenterCrop(size)``: zero-pads images smaller than ``size``, offsets ``round((dim - size) / 2)``."""
    w, h = image.size
    if w < size or h < size:
        pad_l, pad_t = (size - w) // 2 if size > w else 0, (size - h) // 2 if size > h else 0
        pad_r, pad_b = (size - w + 1) // 2 if size > w else 0, (size - h + 1) // 2 if size > h else 0
        canvas = Image.new("RGB", (w + pad_l + pad_r, h + pad_t + pad_b), (0, 0, 0))
        canvas.paste(image, (pad_l, pad_t))
        image, (w, h) = canvas, canvas.size
        if (w, h) == (size, size):
            return image
    top, left = round((h - size) / 2.0), round((w - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


def preprocess(image: ImageLike, resize: int, crop: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Resize (shorter side), center-crop, scale to [0, 1] and normalize -> ``(3, crop, crop)`` float32."""
    img = center_crop(resize_shorter(load_rgb(image), resize), crop)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class EvalModels:
    """The DINO and CLIP models of the metrics, with their preprocessing constants."""

    dino: Any  # transformers ViTModel
    clip: Any  # transformers CLIPModel
    tokenizer: Any  # CLIP tokenizer
    clip_size: int = 224
    clip_mean: tuple[float, float, float] = CLIP_MEAN
    clip_std: tuple[float, float, float] = CLIP_STD
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    identity: dict[str, Any] | None = None

    @property
    def max_text_length(self) -> int:
        """Token budget of CLIP-T (77 for CLIP)."""
        return int(self.clip.config.text_config.max_position_embeddings)


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56.0") else "torch_dtype": dtype}


def _clip_norm_stats(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg_path = folder / "preprocessor_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if "image_mean" in cfg and "image_std" in cfg:
            return tuple(float(v) for v in cfg["image_mean"]), tuple(float(v) for v in cfg["image_std"])
    return CLIP_MEAN, CLIP_STD


def _tiny_models(seed: int) -> tuple[Any, Any, Any]:
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from patchdpo_fast.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    text = {
        "vocab_size": 1000,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "image_size": 224,
        "patch_size": 32,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dino = ViTModel(
            ViTConfig(
                image_size=DINO_CROP,
                patch_size=32,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=37,
                layer_norm_eps=1e-6,
            ),
            add_pooling_layer=False,
        )
        torch.manual_seed(seed + 1)
        clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    return dino, clip, tokenizer


def build_eval_models(
    *,
    tiny: bool = False,
    dino_model: str | os.PathLike | None = None,
    clip_model: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> EvalModels:
    """DINO ViT-S/16 and CLIP ViT-B/32 from local folders, or tiny random models built from configs (``tiny``).

    Args:
        tiny: build tiny random DINO / CLIP models and a tiny CLIP tokenizer in code (CPU tests; nothing loads).
        dino_model: local folder of a transformers ``ViTModel`` checkpoint (e.g. a copy of ``facebook/dino-vits16``).
        clip_model: local folder of a transformers ``CLIPModel`` with its tokenizer (e.g. a copy of
            ``openai/clip-vit-base-patch32``); ``preprocessor_config.json`` there gives the CLIP mean/std.
        device: default ``cuda`` when available, else ``cpu``.
        dtype: default fp16 on CUDA, fp32 elsewhere.
        seed: initialization seed of the tiny models.

    Raises:
        ValueError: neither ``tiny`` nor both folders, or both.
        FileNotFoundError: a folder does not exist.
    """
    if tiny == bool(dino_model or clip_model):
        raise ValueError("pass tiny=True, or both dino_model and clip_model (local folders)")
    if not tiny and not (dino_model and clip_model):
        raise ValueError("dino_model and clip_model are both required without tiny")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    if tiny:
        dino, clip, tokenizer = _tiny_models(seed)
        mean, std = CLIP_MEAN, CLIP_STD
        identity: dict[str, Any] = {"tiny": True, "seed": seed}
    else:
        from transformers import AutoTokenizer, CLIPModel, ViTModel

        dino_dir, clip_dir = Path(dino_model), Path(clip_model)
        for folder, what in ((dino_dir, "DINO model folder"), (clip_dir, "CLIP model folder")):
            if not folder.is_dir():
                raise FileNotFoundError(f"{what} not found: {folder} (nothing is downloaded; pass a local folder)")
        kw = {"local_files_only": True, **_dtype_kwargs(dtype)}
        dino = ViTModel.from_pretrained(dino_dir, add_pooling_layer=False, **kw)
        clip = CLIPModel.from_pretrained(clip_dir, **kw)
        tokenizer = AutoTokenizer.from_pretrained(clip_dir, local_files_only=True)
        mean, std = _clip_norm_stats(clip_dir)
        identity = {"tiny": False, "dino_model": str(dino_dir), "clip_model": str(clip_dir)}
    dino = dino.to(device, dtype).eval().requires_grad_(False)
    clip = clip.to(device, dtype).eval().requires_grad_(False)
    identity["dtype"] = str(dtype).replace("torch.", "")
    return EvalModels(
        dino=dino,
        clip=clip,
        tokenizer=tokenizer,
        clip_size=int(clip.config.vision_config.image_size),
        clip_mean=tuple(mean),
        clip_std=tuple(std),
        dtype=dtype,
        device=device,
        identity=identity,
    )


# ----------------------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------------------


def _normalize(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def _embed_images(images: Sequence[ImageLike], prep, forward, batch_size: int) -> torch.Tensor:
    feats = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([prep(im) for im in images[start : start + batch_size]])
        feats.append(_normalize(forward(batch)).cpu())
    if not feats:
        raise ValueError("no images to embed")
    return torch.cat(feats)


def embed_dino(models: EvalModels, images: Sequence[ImageLike], batch_size: int = 32) -> torch.Tensor:
    """L2-normalized DINO CLS embeddings ``(N, D)`` (fp32, CPU) of images (PIL or paths)."""
    dino = models.dino
    size = int(dino.config.image_size)

    def forward(batch: torch.Tensor) -> torch.Tensor:
        out = dino(pixel_values=batch.to(models.device, models.dtype), interpolate_pos_encoding=size != DINO_CROP)
        return out.last_hidden_state[:, 0]

    return _embed_images(
        list(images),
        lambda im: preprocess(im, DINO_RESIZE, DINO_CROP, IMAGENET_MEAN, IMAGENET_STD),
        forward,
        batch_size,
    )


def embed_clip_images(models: EvalModels, images: Sequence[ImageLike], batch_size: int = 32) -> torch.Tensor:
    """L2-normalized CLIP image embeddings ``(N, P)`` (fp32, CPU)."""
    clip = models.clip

    def forward(batch: torch.Tensor) -> torch.Tensor:
        pooled = clip.vision_model(pixel_values=batch.to(models.device, models.dtype)).pooler_output
        return clip.visual_projection(pooled)

    size = models.clip_size
    return _embed_images(
        list(images), lambda im: preprocess(im, size, size, models.clip_mean, models.clip_std), forward, batch_size
    )


@torch.no_grad()
def embed_clip_texts(models: EvalModels, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """L2-normalized CLIP text embeddings ``(N, P)`` (fp32, CPU); texts are truncated to the context length."""
    clip = models.clip
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to embed")
    feats = []
    for start in range(0, len(texts), batch_size):
        tok = models.tokenizer(
            texts[start : start + batch_size],
            padding="max_length",
            max_length=models.max_text_length,
            truncation=True,
            return_tensors="pt",
        )
        pooled = clip.text_model(
            input_ids=tok.input_ids.to(models.device), attention_mask=tok.attention_mask.to(models.device)
        ).pooler_output
        feats.append(_normalize(clip.text_projection(pooled)).cpu())
    return torch.cat(feats)


# ----------------------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------------------


def similarity_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``(len(a), len(b))`` of two embedding sets (normalized here again, fp32)."""
    return _normalize(a) @ _normalize(b).T


def subject_scores(
    gen_dino: torch.Tensor,
    ref_dino: torch.Tensor,
    gen_clip: torch.Tensor,
    ref_clip: torch.Tensor,
    text_clip: torch.Tensor,
) -> dict[str, Any]:
    """One subject's DINO, CLIP-I (means of the generated x reference similarity matrices) and CLIP-T.

    Returns:
        ``{"dino", "clip_i", "clip_t"}`` (floats) and per generated image (row means / its CLIP-T):
        ``"per_image": {"dino": [...], "clip_i": [...], "clip_t": [...]}``.
    """
    if len(text_clip) != len(gen_clip):
        raise ValueError(f"{len(text_clip)} prompts for {len(gen_clip)} generated images")
    dino = similarity_matrix(gen_dino, ref_dino).double()
    clip_i = similarity_matrix(gen_clip, ref_clip).double()
    clip_t = (_normalize(gen_clip) * _normalize(text_clip)).sum(-1).double()
    return {
        "dino": float(dino.mean()),
        "clip_i": float(clip_i.mean()),
        "clip_t": float(clip_t.mean()),
        "per_image": {
            "dino": [float(v) for v in dino.mean(1)],
            "clip_i": [float(v) for v in clip_i.mean(1)],
            "clip_t": [float(v) for v in clip_t],
        },
    }
