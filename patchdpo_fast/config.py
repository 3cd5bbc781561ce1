"""Typed configuration of a PatchDPO training job.

A job is described by one YAML file (``configs/*.yaml``) plus optional ``a.b=c`` command-line overrides::

    deepspeed patchdpo_fast/train.py --config configs/sdxl_ipadapter_plus.yaml optim.lr=1e-5 train.max_steps=100

:func:`load_config` reads the YAML, applies the overrides to the raw mapping, validates everything with pydantic
(unknown keys are errors) and, unless told otherwise, checks that every configured local path exists. Any problem
raises :class:`ConfigError`, whose message names the dotted key (``train.max_steps``, ``model.pretrained_path``),
so a typo or a missing checkpoint is reported before any model is loaded.

Relative paths are resolved against the current working directory (jobs are launched from the repository root).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "TRAINABLE_MODES",
    "CacheConfig",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "LoraSettings",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ProceduralDataConfig",
    "SamplesConfig",
    "TrainConfig",
    "TrainLoopConfig",
    "apply_overrides",
    "config_to_dict",
    "dump_config",
    "load_config",
    "resolve_deepspeed_config",
    "verify_paths",
]


class ConfigError(ValueError):
    """An invalid training configuration.

    Attributes:
        problems: ``(dotted_key, message)`` pairs, one per problem found (``""`` as key for file-level problems).
    """

    def __init__(self, problems: list[tuple[str, str]] | str, source: str | os.PathLike[str] | None = None):
        if isinstance(problems, str):
            problems = [("", problems)]
        self.problems: list[tuple[str, str]] = list(problems)
        self.source = str(source) if source is not None else None
        lines = [f"{key}: {msg}" if key else msg for key, msg in self.problems]
        head = f"invalid config ({self.source})" if self.source else "invalid config"
        many = head + ":\n" + "\n".join(f"  - {line}" for line in lines)
        super().__init__(f"{head}: {lines[0]}" if len(lines) == 1 else many)

    @property
    def keys(self) -> list[str]:
        """The dotted keys that have problems."""
        return [key for key, _ in self.problems]


class _SubKeyError(ValueError):
    """Raised inside validators to attach a problem to a sub-key of the section being validated."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(message)


Probability = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class _Section(BaseModel):
    # allow_inf_nan=False: every float setting must be finite (``.inf`` / ``.nan`` are refused, naming the key)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------


#: Values of ``model.trainable``: what the optimizer updates (see :class:`ModelConfig`).
TRAINABLE_MODES = ("ip_adapter", "unet_lora", "unet", "ip_adapter+unet_lora", "ip_adapter+unet")


class LoraSettings(_Section):
    """The LoRA put on the UNet by ``model.trainable: unet_lora`` (peft, as diffusers' ``unet.add_adapter`` uses it).

    The default targets are the attention projections of every UNet attention layer (self- and cross-attention),
    as diffusers' Diffusion-DPO example trains them. The LoRA's B matrices start at zero, so at step 0 the LoRA
    model is exactly the base UNet.
    """

    rank: PositiveInt = Field(8, description="LoRA rank r.")
    alpha: Annotated[float, Field(gt=0.0)] | None = Field(
        None, description="LoRA alpha (the update is scaled by alpha / rank); null means alpha = rank."
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        description="UNet module names (suffixes) that get a LoRA, as peft matches them.",
    )
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(0.0, description="Dropout on the LoRA branch's input.")

    @property
    def effective_alpha(self) -> float:
        """``alpha`` with ``null`` resolved to the rank."""
        return float(self.rank if self.alpha is None else self.alpha)

    @model_validator(mode="after")
    def _check(self) -> LoraSettings:
        if not self.target_modules or any(not isinstance(n, str) or not n.strip() for n in self.target_modules):
            raise _SubKeyError("target_modules", "give at least one non-empty module name, e.g. [to_q, to_k]")
        if any(n.endswith(("_ip", "processor")) or ".processor." in n for n in self.target_modules):
            raise _SubKeyError(
                "target_modules", "the IP-Adapter's own projections are trained as the adapter, not through a LoRA"
            )
        return self


class ModelConfig(_Section):
    """The personalized generator: IP-Adapter-Plus on an SDXL UNet (or a tiny random-initialized stand-in).

    ``trainable`` chooses what trains (and so what the DPO reference model is):

    * ``ip_adapter`` (default) – the IP-Adapter's K/V projections (plus the resampler with ``train_resampler``);
      the UNet is frozen; the DPO reference is a frozen copy of the initial adapter on the same UNet.
    * ``unet_lora`` – a LoRA on the UNet (``model.lora``); the adapter is frozen; the DPO reference is the same
      UNet with the LoRA switched off (no second copy).
    * ``unet`` – the whole UNet (full finetuning, fp32 master weights); the adapter is frozen; the DPO losses get a
      frozen reference copy of the initial UNet and adapter in ``reference_dtype`` (sharded by ZeRO-3 like the
      policy under DeepSpeed stage 3). mse, patch_weighted_mse and reconstruction build no reference.
    * ``ip_adapter+unet_lora`` / ``ip_adapter+unet`` – both the adapter and the UNet (LoRA or full) train; the
      reference is the initial adapter on the LoRA-off UNet, or the frozen copy of the initial UNet and adapter.
    """

    tiny: bool = Field(True, description="Build a tiny random-initialized architecture instead of loading SDXL.")
    tiny_seed: int = Field(0, description="Seed of the tiny model's random initialization.")
    tiny_architecture: Literal["sdxl", "sd15"] = Field(
        "sdxl",
        description=(
            "Which tiny model to build (tiny only): 'sdxl' (two text encoders, pooled text + time ids) or 'sd15' (one "
            "text encoder, no added conditioning). A pretrained model's family is read from its UNet's config."
        ),
    )
    pretrained_path: Path | None = Field(
        None,
        description=(
            "Local diffusers folder of the base model, SDXL-class (e.g. RealVisXL_V1.0) or SD1.5-class (e.g. "
            "stable-diffusion-v1-5): the UNet's config decides; required unless tiny."
        ),
    )
    base_architecture: Literal["auto", "sdxl", "sd15"] = Field(
        "auto",
        description=(
            "The base model's family for the memory plan while pretrained_path does not exist yet (planning before "
            "downloading): 'sdxl' or 'sd15' (the built-in SDXL base 1.0 / Stable Diffusion 1.5 architectures). "
            "auto: read it from pretrained_path/unet/config.json, or assume SDXL and say so when the folder is "
            "absent. Once the folder exists its UNet's config decides, and a different value here is an error "
            "(estimate-memory and training). Not for the tiny model (model.tiny_architecture)."
        ),
    )
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None,
        description=(
            "Override the noise scheduler's prediction_type (the training target: the noise, or v for SD2-style "
            "v-prediction models); null keeps the scheduler config's, which is right for a pretrained model."
        ),
    )
    image_encoder_path: Path | None = Field(
        None, description="Local folder of the CLIP vision encoder used by IP-Adapter-Plus; required unless tiny."
    )
    ip_adapter_path: Path | None = Field(
        None, description="Existing IP-Adapter-Plus weights (.bin or .safetensors) to start from; optional."
    )
    num_ip_tokens: PositiveInt = Field(16, description="Image-prompt tokens produced by the Perceiver Resampler.")
    attention_backend: Literal["sdpa", "xformers", "eager"] = "sdpa"
    xformers_fallback: bool = Field(
        True, description="If attention_backend is xformers but it is not installed, fall back to sdpa (else error)."
    )
    train_resampler: bool = Field(
        False, description="Also train the Resampler; the official recipe trains only the IP attention K/V projections."
    )
    trainable: Literal[TRAINABLE_MODES] = Field(  # type: ignore[valid-type]
        "ip_adapter", description="What trains: " + ", ".join(TRAINABLE_MODES) + " (see the class docstring)."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="The UNet LoRA of trainable=unet_lora.")
    reference_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description=(
            "dtype of the frozen reference UNet of trainable=unet with a DPO loss; auto = the training precision "
            "(train.mixed_precision: no -> fp32, bf16 -> bf16, fp16 -> fp16), the cheapest one the config allows."
        ),
    )
    train_unet: bool = Field(
        False,
        description=(
            "Older spelling of trainable=ip_adapter+unet (train the UNet and the adapter, e.g. to pretrain a "
            "personalized model from scratch with loss.type=reconstruction)."
        ),
    )
    gradient_checkpointing: bool = False
    ip_scale: Annotated[float, Field(ge=0.0)] = Field(1.0, description="Scale of the image-prompt attention branch.")
    use_ip_adapter: bool = Field(
        True,
        description=(
            "false: the base model without an IP-Adapter (text-only conditioning, no image encoder needed), for "
            "training the UNet or a LoRA on it (model.trainable unet_lora / unet) on plain preference pairs such as "
            "Pick-a-Pic (manifest records with prompt, winner and loser; see docs/data.md)."
        ),
    )

    @property
    def effective_trainable(self) -> str:
        """``trainable`` with the older ``train_unet: true`` resolved (``ip_adapter+unet``)."""
        return "ip_adapter+unet" if self.train_unet else self.trainable

    @property
    def trains_adapter(self) -> bool:
        """Whether the IP-Adapter (K/V projections, optionally the resampler) trains."""
        return "ip_adapter" in self.effective_trainable.split("+")

    @property
    def unet_training(self) -> Literal["frozen", "lora", "full"]:
        """How the UNet trains: ``frozen``, ``lora`` or ``full``."""
        parts = self.effective_trainable.split("+")
        return "lora" if "unet_lora" in parts else "full" if "unet" in parts else "frozen"

    @model_validator(mode="after")
    def _check_sources(self) -> ModelConfig:
        if self.train_unet and self.trainable != "ip_adapter":
            raise _SubKeyError(
                "train_unet",
                f"is the older spelling of model.trainable=ip_adapter+unet; with model.trainable={self.trainable} "
                "set train_unet: false",
            )
        if not self.use_ip_adapter:
            for name, bad in (
                ("trainable", self.trains_adapter),
                ("ip_adapter_path", self.ip_adapter_path is not None),
            ):
                if bad:
                    raise _SubKeyError(
                        name, "model.use_ip_adapter=false builds no IP-Adapter: train unet_lora or unet, with no "
                        "ip_adapter_path",
                    )  # fmt: skip
        if self.train_resampler and not self.trains_adapter:
            raise _SubKeyError(
                "train_resampler",
                f"model.trainable={self.effective_trainable} keeps the adapter frozen; train_resampler needs "
                "'ip_adapter' in model.trainable",
            )
        if not self.tiny and self.tiny_architecture != "sdxl":
            raise _SubKeyError(
                "tiny_architecture", "applies to the tiny model only; a pretrained model's UNet config decides"
            )
        if self.tiny and self.base_architecture != "auto":
            raise _SubKeyError(
                "base_architecture", "applies to a pretrained model only; the tiny model's is model.tiny_architecture"
            )
        if self.tiny:
            for name in ("pretrained_path", "image_encoder_path"):
                if getattr(self, name) is not None:
                    raise _SubKeyError(
                        name, "must be null when model.tiny is true (the tiny model is built, not loaded)"
                    )
        else:
            for name in ("pretrained_path", "image_encoder_path"):
                if getattr(self, name) is None and (name == "pretrained_path" or self.use_ip_adapter):
                    raise _SubKeyError(name, "required when model.tiny is false")
        return self


class ProceduralDataConfig(_Section):
    """The built-in procedural pair set (see :mod:`patchdpo_fast.data.procedural`).

    Pairs are rendered at ``data.resolution`` with quality maps on the ``data.patch_size`` grid.
    """

    num_pairs: PositiveInt = 64
    seed: int = 0


class DataConfig(_Section):
    """Where training pairs come from and how they are batched."""

    source: Literal["procedural", "manifest"] = "procedural"
    procedural: ProceduralDataConfig = Field(default_factory=ProceduralDataConfig)
    manifest_path: Path | None = Field(
        None, description="patchdpo manifest (JSONL, see docs/data.md) of on-disk pairs; required for 'manifest'."
    )
    resolution: PositiveInt = Field(64, description="Square training resolution in pixels.")
    patch_size: PositiveInt = Field(
        8,
        description=(
            "Pixels per quality-map cell; maps are (resolution/patch_size)^2. With a VAE of factor 8, 8 puts the map "
            "at latent resolution (loss patch stride 1), 16 gives stride 2."
        ),
    )
    pairs_per_batch: PositiveInt = Field(
        2, description="Pairs per device per micro-batch (2x images through the UNet)."
    )
    num_workers: NonNegativeInt = 0
    shuffle_seed: int = 0
    drop_last: bool = True
    drop_image: Probability = Field(0.05, description="Probability of dropping only the image prompt.")
    drop_text: Probability = Field(0.05, description="Probability of dropping only the text prompt.")
    drop_both: Probability = Field(0.05, description="Probability of dropping both prompts.")
    on_bad_record: Literal["error", "skip"] = Field(
        "error", description="What to do with a missing/corrupt image or a wrong-size quality map."
    )
    max_bad_records: NonNegativeInt = Field(
        100, description="With on_bad_record=skip, fail after this many distinct bad pairs (all DataLoader workers)."
    )
    validate_files: Literal["none", "quick", "full"] = Field(
        "quick",
        description=(
            "Manifest check at load: 'quick' = files exist, image and quality-map headers readable, map sizes agree; "
            "'full' also decodes every image and map; 'none' checks the JSON only."
        ),
    )
    missing_maps: Literal["error", "uniform"] = Field(
        "error",
        description=(
            "Manifest pairs without quality maps: 'error' refuses them (for quality-weighted losses); 'uniform' fills "
            "both maps with data.uniform_quality."
        ),
    )
    uniform_quality: Probability = Field(
        0.0,
        description=(
            "Fill value of missing maps. 0: every reference patch weighted fully, every generated patch 'bad' "
            "(patch_weighted_mse trains on references only, patch_dpo equals diffusion_dpo)."
        ),
    )

    @property
    def map_size(self) -> int:
        """Side of the square quality map, in cells."""
        return self.resolution // self.patch_size

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.resolution % self.patch_size:
            raise _SubKeyError(
                "resolution", f"{self.resolution} is not a multiple of data.patch_size={self.patch_size}"
            )
        if self.resolution % 8:
            raise _SubKeyError("resolution", f"{self.resolution} is not a multiple of 8 (the VAE downsampling factor)")
        total = self.drop_image + self.drop_text + self.drop_both
        if total > 1.0 + 1e-9:
            raise _SubKeyError("drop_both", f"drop_image + drop_text + drop_both = {total:g} exceeds 1")
        if self.source == "manifest" and self.manifest_path is None:
            raise _SubKeyError("manifest_path", "required when data.source is 'manifest'")
        return self


class LossConfig(_Section):
    """The training objective (see DESIGN.md section 2).

    ``weight_mode`` chooses the per-patch weights of the patch losses:

    * ``quality`` – the loss's own quality-derived weights: ``W = cat[1 - q_ref, q_gen]`` for patch_weighted_mse;
      ``a = 1 - q_ref``, ``b = 1 - 2 q_gen`` for patch_dpo.
    * ``gen_only`` – quality weights on the generated (loser) side only, 1 on the reference side.
    * ``uniform`` – all weights 1 (patch_weighted_mse becomes plain MSE, patch_dpo becomes diffusion_dpo).
    * ``auto`` (default) – ``quality`` for patch_weighted_mse / patch_dpo, ``uniform`` for the others.

    ``reconstruction`` is the objective of the stage *before* PatchDPO, the plain IP-Adapter training: each record's
    generated image is a ground-truth target that the model learns to denoise from the reference image (image
    prompt) and the prompt; reference images are not denoised and quality maps are not used.

    ``pair_order: generated_wins`` swaps winners and losers (images and maps): a deliberate bug for controls such
    as ``patchdpo minibench``'s semantic-bug detector, never for real training.
    """

    type: Literal["patch_weighted_mse", "patch_dpo", "diffusion_dpo", "mse", "reconstruction"] = "patch_weighted_mse"
    beta: Annotated[float, Field(gt=0.0, le=1e8)] = Field(  # le: patchdpo_fast.ops.validation.MAX_BETA
        5000.0, description="DPO temperature (absorbs T); DPO losses only."
    )
    weight_mode: Literal["auto", "quality", "gen_only", "uniform"] = "auto"
    backend: Literal["auto", "triton", "torch"] = "auto"
    pair_order: Literal["reference_wins", "generated_wins"] = Field(
        "reference_wins", description="Which image of a pair is the winner; 'generated_wins' is a control only."
    )

    @property
    def uses_reference_model(self) -> bool:
        """True for the DPO losses, which need the frozen reference adapter."""
        return self.type in ("patch_dpo", "diffusion_dpo")

    @property
    def effective_weight_mode(self) -> Literal["quality", "gen_only", "uniform"]:
        """``weight_mode`` with ``auto`` resolved for the configured loss type."""
        if self.weight_mode != "auto":
            return self.weight_mode
        return "quality" if self.type in ("patch_weighted_mse", "patch_dpo") else "uniform"

    @model_validator(mode="after")
    def _check(self) -> LossConfig:
        if self.type in ("mse", "diffusion_dpo", "reconstruction") and self.weight_mode not in ("auto", "uniform"):
            raise _SubKeyError("weight_mode", f"loss.type={self.type} takes no patch weights; use 'auto' or 'uniform'")
        return self


class OptimConfig(_Section):
    """Optimizer and learning-rate schedule for the trainable adapter parameters."""

    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    lr: Annotated[float, Field(gt=0.0)] = 1e-4
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.01
    betas: tuple[Probability, Probability] = (0.9, 0.999)
    eps: Annotated[float, Field(gt=0.0)] = 1e-8
    max_grad_norm: Annotated[float, Field(gt=0.0)] | None = Field(1.0, description="Gradient clipping; null disables.")
    warmup_steps: NonNegativeInt = 0
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="After linear warmup: constant, or linear / cosine decay to 0 at train.max_steps."
    )
    use_ema: bool = Field(
        False,
        description=(
            "Keep an fp32 exponential moving average of the trainable weights (checkpointed; the exports are written "
            "from it). One more fp32 copy of what trains; not with DeepSpeed ZeRO-3."
        ),
    )
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(0.9999, description="EMA decay per optimizer step.")


class TrainLoopConfig(_Section):
    """Length, precision, logging, checkpointing and failure handling of the training loop."""

    max_steps: PositiveInt = Field(40, description="Optimizer steps.")
    gradient_accumulation_steps: PositiveInt = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    log_every: PositiveInt = 5
    checkpoint_every: PositiveInt = 20
    keep_checkpoints: PositiveInt | None = Field(2, description="Newest checkpoints to keep; null keeps all.")
    output_dir: Path = Path("runs/tiny_cpu")
    resume_from: str | None = Field(
        None, description="'latest' (newest checkpoint in output_dir, if any) or a checkpoint path; null starts fresh."
    )
    export_dtype: Literal["fp16", "bf16", "fp32"] = Field(
        "fp16",
        description=(
            "Dtype of the exported ip_adapter.safetensors and of the exported UNet LoRA (fp16 like the official "
            "files; fp32 on request)."
        ),
    )
    unet_export_dtype: Literal["fp16", "bf16", "fp32"] = Field(
        "fp32",
        description="Dtype of the exported full UNet (unet/ folder) when the UNet trains in full: fp32 keeps the "
        "master weights as trained, fp16 halves the folder.",
    )
    nan_policy: Literal["skip", "error"] = Field("skip", description="On a non-finite loss: skip the step or fail.")
    max_nan_skips: NonNegativeInt = Field(10, description="With nan_policy=skip, fail after this many skipped steps.")


class CacheConfig(_Section):
    """Offline input cache of VAE latents, text embeddings and CLIP image features (:mod:`patchdpo_fast.data.cache`)."""

    enabled: bool = False
    dir: Path = Path("runs/cache/tiny_cpu")
    shard_size: PositiveInt = Field(256, description="Pairs per safetensors shard.")
    encode_batch_size: PositiveInt = Field(8, description="Pairs per encoder call while building the cache.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Storage dtype of features.")
    on_stale: Literal["error", "rebuild"] = Field(
        "error", description="What to do when the cache was built from other data or encoder settings."
    )


class DeepSpeedConfig(_Section):
    """DeepSpeed settings. With ``config`` and ``zero_stage`` both null the job runs without DeepSpeed."""

    config: Path | None = Field(None, description="DeepSpeed JSON; 'auto' values are filled from this config.")
    zero_stage: Annotated[int, Field(ge=0, le=3)] | None = Field(None, description="Overrides the JSON's ZeRO stage.")
    offload_optimizer: bool | None = Field(None, description="Overrides CPU optimizer offload (null: keep the JSON's).")
    offload_param: bool | None = Field(None, description="Overrides CPU parameter offload (ZeRO-3 only).")

    @property
    def enabled(self) -> bool:
        """Whether the job uses DeepSpeed."""
        return self.config is not None or self.zero_stage is not None

    @model_validator(mode="after")
    def _check(self) -> DeepSpeedConfig:
        if self.offload_param and self.zero_stage is not None and self.zero_stage != 3:
            raise _SubKeyError(
                "offload_param", f"parameter offload needs ZeRO stage 3, got zero_stage={self.zero_stage}"
            )
        return self


class SamplesConfig(_Section):
    """Sample grids written during training: one row per reference image, the reference then one sample per prompt.

    Written before the first step (``samples/step_00000000.png``), every ``every`` steps and at the end, with the
    policy adapter, into ``train.output_dir/samples/``. Off when ``references`` is null.
    """

    references: Path | None = Field(
        None, description="Folder of reference images (one subfolder per subject, or images directly in it)."
    )
    prompts: list[str] = Field(default_factory=list, description="Prompts; each reference is drawn with each.")
    max_references: PositiveInt = Field(8, description="Use at most this many references (sorted by subject).")
    every: NonNegativeInt = Field(0, description="Also write a grid every N steps (0: only at the start and end).")
    steps: PositiveInt = Field(20, description="Sampler steps.")
    guidance: Annotated[float, Field(ge=0.0)] = 3.0
    scheduler: Literal["euler", "ddim", "dpm", "ddpm"] = "ddim"
    negative_prompt: str = ""
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SamplesConfig:
        if self.references is not None and not self.prompts:
            raise _SubKeyError("prompts", "give at least one prompt when samples.references is set")
        return self


class TrainConfig(_Section):
    """A complete PatchDPO training job. Defaults describe the tiny CPU demo."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainLoopConfig = Field(default_factory=TrainLoopConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    samples: SamplesConfig = Field(default_factory=SamplesConfig)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.loss.type == "reconstruction" and self.loss.pair_order != "reference_wins":
            raise _SubKeyError("loss.pair_order", "loss.type=reconstruction has no winners and losers")
        if not self.model.use_ip_adapter and self.samples.references is not None:
            raise _SubKeyError(
                "samples.references", "sample grids draw reference images through the IP-Adapter; with "
                "model.use_ip_adapter=false set samples.references: null",
            )  # fmt: skip
        if self.optim.use_ema and self.deepspeed.zero_stage == 3:
            raise _SubKeyError(
                "optim.use_ema", "the moving average needs whole weights on every rank; ZeRO-3 shards them"
            )
        if self.optim.optimizer == "adamw8bit" and self.deepspeed.offload_optimizer:
            raise _SubKeyError(
                "optim.optimizer", "adamw8bit cannot be combined with DeepSpeed CPU optimizer offload; use adamw"
            )
        return self


# --------------------------------------------------------------------------------------------------------------
# Loading, overrides, errors
# --------------------------------------------------------------------------------------------------------------


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: ``1e-4`` / ``3E5`` are floats (YAML 1.1 needs a dot) and only
    ``true`` / ``false`` are booleans, so documented values such as ``mixed_precision: no`` stay strings
    (YAML 1.1 would read ``no``, ``yes``, ``on``, ``off``, ``y``, ``n`` as booleans)."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _parse_scalar(text: str) -> Any:
    """Parse an override value as a YAML scalar (or a YAML flow list/mapping such as ``[0.9, 0.95]``)."""
    try:
        return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass
    except yaml.YAMLError:
        return text


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel subclass inside a field annotation (``X`` or ``X | None``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _section_model(arg)
            if found is not None:
                return found
    return None


def _check_override_key(key: str) -> None:
    parts = key.split(".")
    model: type[BaseModel] | None = TrainConfig
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if model is None:
            raise ConfigError([(key, f"'{prefix}' is a value, not a section")])
        fields = model.model_fields
        if part not in fields:
            close = difflib.get_close_matches(part, list(fields), n=1)
            hint = f"; did you mean '{'.'.join([*parts[:depth], close[0]])}'?" if close else ""
            where = f"section '{prefix}'" if prefix else "the top level"
            raise ConfigError([(key, f"unknown key '{part}' in {where}{hint}")])
        model = _section_model(fields[part].annotation)


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of the raw config mapping with ``a.b=c`` overrides applied.

    Values are parsed as YAML (``3`` is an int, ``1e-4`` a float, ``null`` None, ``[0.9, 0.95]`` a list,
    ``true`` a bool); keys are checked against the config schema.

    Raises:
        ConfigError: an override without ``=``, or a key that does not exist (with a suggestion when one is close).
    """
    result: dict[str, Any] = json.loads(json.dumps(raw, default=str))
    for item in overrides:
        if "=" not in item:
            raise ConfigError([(item, "override must look like 'section.key=value'")])
        key, _, text = item.partition("=")
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError([(item, "override must look like 'section.key=value'")])
        _check_override_key(key)
        parts = key.split(".")
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError([(".".join(parts[: depth + 1]), f"expected a mapping to set '{key}', got {child!r}")])
            node = child
        node[parts[-1]] = _parse_scalar(text.strip())
    return result


def _format_validation_error(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        error = (err.get("ctx") or {}).get("error")
        if isinstance(error, _SubKeyError):
            loc.append(error.key)
            message = error.message
        elif err["type"] == "extra_forbidden":
            parent = loc[:-1]
            model: type[BaseModel] | None = TrainConfig
            for part in parent:
                model = (
                    _section_model(model.model_fields[part].annotation)
                    if model and part in model.model_fields
                    else None
                )
            close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1) if model else []
            message = "unknown key" + (f"; did you mean '{'.'.join([*parent, close[0]])}'?" if close else "")
        else:
            message = err["msg"]
            if err["type"] not in ("missing",) and "input" in err:
                message += f" (got {err['input']!r})"
        problems.append((".".join(loc), message))
    return problems


def _path_checks(cfg: TrainConfig) -> list[tuple[str, Path | None, str]]:
    checks: list[tuple[str, Path | None, str]] = [
        ("model.pretrained_path", cfg.model.pretrained_path, "dir"),
        ("model.image_encoder_path", cfg.model.image_encoder_path, "dir"),
        ("model.ip_adapter_path", cfg.model.ip_adapter_path, "file"),
        ("deepspeed.config", cfg.deepspeed.config, "file"),
        ("samples.references", cfg.samples.references, "dir"),
    ]
    if cfg.data.source == "manifest":
        checks.append(("data.manifest_path", cfg.data.manifest_path, "file"))
    if cfg.train.resume_from not in (None, "latest"):
        checks.append(("train.resume_from", Path(cfg.train.resume_from), "any"))
    return checks


def verify_paths(cfg: TrainConfig) -> None:
    """Check that every configured local input path exists (and that the DeepSpeed JSON parses).

    Output paths (``train.output_dir``, ``cache.dir``) are created by the trainer and not checked.

    Raises:
        ConfigError: naming each offending key and path.
    """
    problems = []
    for key, path, kind in _path_checks(cfg):
        if path is None:
            continue
        shown = f"{path}" if path.is_absolute() else f"{path} (resolved to {path.resolve()})"
        if not path.exists():
            problems.append((key, f"path does not exist: {shown}"))
        elif kind == "dir" and not path.is_dir():
            problems.append((key, f"expected a directory, got a file: {shown}"))
        elif kind == "file" and not path.is_file():
            problems.append((key, f"expected a file, got a directory: {shown}"))
        elif key == "deepspeed.config":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                problems.append((key, f"cannot read DeepSpeed JSON {path}: {exc}"))
            else:
                if not isinstance(data, dict):
                    problems.append((key, f"DeepSpeed JSON {path} must hold an object"))
    if problems:
        raise ConfigError(problems)


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Iterable[str] = (),
    *,
    check_paths: bool = True,
) -> TrainConfig:
    """Load, override and validate a training config.

    Args:
        path: YAML file; None starts from the built-in defaults (the tiny CPU demo).
        overrides: ``section.key=value`` strings applied to the raw YAML before validation.
        check_paths: verify that configured input paths exist (set False to validate a config without its
            weights, e.g. in tests).

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or value, or missing path; the message names the
            dotted key.
    """
    raw: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file: {exc}", path) from None
        try:
            raw = yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise ConfigError(f"YAML syntax error: {exc}", path) from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"top level must be a mapping of sections, got {type(raw).__name__}", path)
        # A section whose keys are all commented out reads as null: treat it as empty.
        raw = {key: ({} if value is None and key in TrainConfig.model_fields else value) for key, value in raw.items()}
    try:
        raw = apply_overrides(raw, overrides)
        cfg = TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc), path) from None
    except ConfigError as exc:
        raise ConfigError(exc.problems, path) from None
    if check_paths:
        try:
            verify_paths(cfg)
        except ConfigError as exc:
            raise ConfigError(exc.problems, path) from None
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain JSON/YAML-serialisable data (paths as strings, tuples as lists)."""
    return cfg.model_dump(mode="json")


def dump_config(cfg: TrainConfig, path: str | os.PathLike[str] | None = None) -> str:
    """Render the config as YAML; when ``path`` is given also write it there atomically.

    The output loads back with :func:`load_config` into an equal config.
    """
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    if path is not None:
        from patchdpo_fast.utils import atomic_write_text

        atomic_write_text(path, text)  # fsynced, renamed into place, the usual file permissions
    return text


# --------------------------------------------------------------------------------------------------------------
# DeepSpeed JSON resolution
# --------------------------------------------------------------------------------------------------------------


def _fill(node: dict[str, Any], key: str, value: Any, where: str) -> None:
    current = node.get(key, "auto")
    if current == "auto":
        node[key] = value
    elif current != value:
        raise ConfigError(
            [("deepspeed.config", f"{where} is {current!r} in the JSON but the config implies {value!r}")]
        )


def _find_auto(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        found = []
        for key, value in node.items():
            found += _find_auto(value, f"{prefix}.{key}" if prefix else key)
        return found
    return [prefix] if node == "auto" else []


def resolve_deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any] | None:
    """The DeepSpeed config dict for ``deepspeed.initialize``, with every ``"auto"`` filled from ``cfg``.

    Filled: ``train_micro_batch_size_per_gpu`` (data.pairs_per_batch), ``gradient_accumulation_steps``,
    ``train_batch_size`` (their product times ``world_size``), ``gradient_clipping`` (optim.max_grad_norm, 0 when
    null), ``bf16.enabled`` / ``fp16.enabled`` (train.mixed_precision) and, when the JSON has an ``optimizer``
    block, its ``lr`` / ``betas`` / ``eps`` / ``weight_decay``. ``deepspeed.zero_stage``, ``offload_optimizer`` and
    ``offload_param`` override the JSON.

    A JSON with an ``optimizer`` block (the ``*_offload.json`` files: ZeRO-Offload needs DeepSpeed's CPU Adam) means
    DeepSpeed builds the optimizer; otherwise the trainer passes its own (AdamW or 8-bit AdamW).

    Returns:
        None when DeepSpeed is not configured (``deepspeed.config`` and ``deepspeed.zero_stage`` both null).

    Raises:
        ConfigError: unreadable JSON, a concrete JSON value that contradicts the config, or an ``auto`` left over.
    """
    ds = cfg.deepspeed
    if not ds.enabled:
        return None
    if ds.config is not None:
        try:
            conf = json.loads(Path(ds.config).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError([("deepspeed.config", f"cannot read DeepSpeed JSON {ds.config}: {exc}")]) from None
    else:
        conf = {
            "train_batch_size": "auto",
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"},
            "fp16": {"enabled": "auto"},
            "zero_optimization": {},
        }
    micro = cfg.data.pairs_per_batch
    accum = cfg.train.gradient_accumulation_steps
    _fill(conf, "train_micro_batch_size_per_gpu", micro, "train_micro_batch_size_per_gpu")
    _fill(conf, "gradient_accumulation_steps", accum, "gradient_accumulation_steps")
    _fill(conf, "train_batch_size", micro * accum * world_size, "train_batch_size")
    _fill(conf, "gradient_clipping", cfg.optim.max_grad_norm or 0.0, "gradient_clipping")
    for name in ("bf16", "fp16"):
        section = conf.setdefault(name, {})
        _fill(section, "enabled", cfg.train.mixed_precision == name, f"{name}.enabled")

    zero = conf.setdefault("zero_optimization", {})
    if ds.zero_stage is not None:
        zero["stage"] = ds.zero_stage
    zero.setdefault("stage", 0)
    if ds.offload_optimizer is not None:
        if ds.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        else:
            zero.pop("offload_optimizer", None)
    if ds.offload_param is not None:
        if ds.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        else:
            zero.pop("offload_param", None)
    stage = zero["stage"]
    if zero.get("offload_param") and zero["offload_param"].get("device", "none") != "none" and stage != 3:
        raise ConfigError([("deepspeed.offload_param", f"parameter offload needs ZeRO stage 3, got stage {stage}")])
    offloaded = zero.get("offload_optimizer", {}).get("device", "none") != "none"
    if offloaded and cfg.optim.optimizer == "adamw8bit":
        raise ConfigError([("optim.optimizer", "adamw8bit cannot be combined with DeepSpeed CPU optimizer offload")])

    if "optimizer" in conf:
        if cfg.optim.optimizer != "adamw":
            raise ConfigError(
                [
                    (
                        "optim.optimizer",
                        f"the DeepSpeed JSON builds the optimizer; only 'adamw' fits, got {cfg.optim.optimizer!r}",
                    )
                ]
            )
        params = conf["optimizer"].setdefault("params", {})
        _fill(params, "lr", cfg.optim.lr, "optimizer.params.lr")
        _fill(params, "betas", list(cfg.optim.betas), "optimizer.params.betas")
        _fill(params, "eps", cfg.optim.eps, "optimizer.params.eps")
        _fill(params, "weight_decay", cfg.optim.weight_decay, "optimizer.params.weight_decay")

    left = _find_auto(conf)
    if left:
        raise ConfigError([("deepspeed.config", f"unresolved 'auto' values at {', '.join(left)}")])
    return conf
