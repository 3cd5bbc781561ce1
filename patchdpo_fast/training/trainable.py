"""What trains (``model.trainable``), how the DPO reference model is obtained, and what a checkpoint holds for it.

=========================  =========================  ===========================================================
``model.trainable``        trains                     DPO reference (``loss.type`` patch_dpo / diffusion_dpo)
=========================  =========================  ===========================================================
``ip_adapter``             IP K/V (+ resampler)       frozen copy of the initial adapter on the same frozen UNet
``unet_lora``              a LoRA on the UNet         the same UNet with the LoRA switched off (no copy)
``unet``                   the whole UNet             a frozen copy of the initial UNet + adapter, ``reference_dtype``
``ip_adapter+unet_lora``   adapter and UNet LoRA      initial adapter on the LoRA-off UNet
``ip_adapter+unet``        adapter and whole UNet     frozen copy of the initial UNet + adapter
=========================  =========================  ===========================================================

The non-DPO losses (mse, patch_weighted_mse, reconstruction) build no reference at all. Under DeepSpeed ZeRO-3 the
frozen reference UNet is handed to ``deepspeed.initialize`` without an optimizer, as an inference engine whose
parameters are sharded across the ranks like the policy's (ZeRO-1/2 shard no parameters, so below stage 3 the
reference stays a plain frozen module on every rank), the way LLM preference trainers initialise their frozen
reference model.

:class:`TrainableSetup` is what the trainer holds: it puts the LoRA on, builds the reference, and names the weight
files a checkpoint keeps for the mode (the adapter file is always written by the trainer).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["TrainableMode", "TrainableSetup", "reference_dtype", "setup_trainable"]

logger = logging.getLogger("patchdpo_fast.train")

_DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: Checkpoint files of the UNet side of a run, by mode.
UNET_FILE = "unet.safetensors"
LORA_FILE = "unet_lora.safetensors"


@dataclass(frozen=True)
class TrainableMode:
    """``model.trainable`` resolved: whether the adapter trains and how the UNet does."""

    adapter: bool
    unet: Literal["frozen", "lora", "full"]

    @classmethod
    def from_config(cls, model_cfg: Any) -> TrainableMode:
        """From a :class:`~patchdpo_fast.config.ModelConfig` (``train_unet: true`` reads as ``ip_adapter+unet``)."""
        return cls(bool(model_cfg.trains_adapter), model_cfg.unet_training)

    @property
    def name(self) -> str:
        """The ``model.trainable`` value of this mode."""
        parts = (["ip_adapter"] if self.adapter else []) + (
            [] if self.unet == "frozen" else ["unet_lora" if self.unet == "lora" else "unet"]
        )
        return "+".join(parts)

    def reference_kind(self, uses_reference: bool) -> str:
        """How the DPO reference is obtained (``none`` for the non-DPO losses)."""
        if not uses_reference:
            return "none"
        if self.unet == "full":
            return "frozen unet copy"
        if self.unet == "lora":
            return "lora disabled" + (" + initial adapter" if self.adapter else "")
        return "initial adapter"

    def build_kwargs(self, uses_reference: bool) -> dict[str, bool]:
        """Arguments of :func:`patchdpo_fast.models.build_models` for this mode.

        The in-module reference adapter is only needed when the adapter trains on a UNet that does not train in
        full (a fully trained UNet gets a separate frozen copy that holds the initial adapter too).
        """
        return {
            "train_unet": self.unet == "full",
            "train_adapter": self.adapter,
            "reference": uses_reference and self.adapter and self.unet != "full",
        }


def reference_dtype(cfg: Any) -> torch.dtype:
    """dtype of the frozen reference UNet: ``model.reference_dtype``, ``auto`` being the training precision."""
    name = cfg.model.reference_dtype
    return _DTYPES[cfg.train.mixed_precision if name == "auto" else name]


class TrainableSetup:
    """The trainable side of a run: the mode, the LoRA put on the UNet, and the frozen reference UNet if any.

    Build it with :func:`setup_trainable` after the models and before the policy's engine (the reference copy must
    be taken before DeepSpeed partitions the policy), then call :meth:`wrap_reference` once the engine exists.
    """

    def __init__(self, mode: TrainableMode, uses_reference: bool, reference: nn.Module | None) -> None:
        self.mode = mode
        self.uses_reference = uses_reference
        #: the separate frozen reference model (``unet`` modes with a DPO loss), else None
        self.reference: nn.Module | None = reference

    # ------------------------------------------------------------------ reference
    def wrap_reference(self, ds_config: dict[str, Any] | None) -> nn.Module | None:
        """The reference model as the engine calls it: under ZeRO-3 a parameter-sharded DeepSpeed inference engine.

        ``ds_config`` is the policy's resolved DeepSpeed config (None without DeepSpeed). The reference gets a copy
        without optimizer and scheduler: ZeRO-3 partitions its parameters like the policy's and gathers them layer by
        layer in its forward; below stage 3 the plain frozen module is returned.
        """
        if self.reference is None:
            return None
        stage = int((ds_config or {}).get("zero_optimization", {}).get("stage", 0))
        if ds_config is None or stage != 3:
            return self.reference
        import deepspeed

        ref_config = copy.deepcopy(ds_config)
        for key in ("optimizer", "scheduler"):
            ref_config.pop(key, None)
        zero = ref_config["zero_optimization"]
        for key in ("offload_optimizer",):  # an inference engine has no optimizer to offload
            zero.pop(key, None)
        # DeepSpeed casts an engine's module to the config's precision: the reference keeps model.reference_dtype
        ref_dtype = next(p.dtype for p in self.reference.parameters() if p.is_floating_point())
        ref_config["bf16"] = {"enabled": ref_dtype == torch.bfloat16}
        ref_config["fp16"] = {**ref_config.get("fp16", {}), "enabled": ref_dtype == torch.float16}
        engine, *_ = deepspeed.initialize(model=self.reference, config=ref_config, dist_init_required=False)
        engine.eval()
        self.reference = engine.module
        return engine

    def reference_fingerprint(self) -> str | None:
        """SHA-256 of the separate frozen reference model (the initial UNet and adapter in the reference dtype), or
        None without one. Checkpoints record it; a resumed run rebuilds the reference and must get the same hash.
        Call it before :meth:`wrap_reference` (ZeRO-3 partitions the reference there)."""
        if self.reference is None:
            return None
        from patchdpo_fast.utils import tensors_sha256

        return tensors_sha256(self.reference.state_dict())

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_tensors(self, ip_unet: Any) -> dict[str, dict[str, torch.Tensor]]:
        """The UNet-side weight files a checkpoint keeps (file name -> tensors; detached, not copied)."""
        if self.mode.unet == "full":
            return {UNET_FILE: ip_unet.unet_state_dict()}
        if self.mode.unet == "lora":
            return {LORA_FILE: ip_unet.unet_lora_state_dict()}
        return {}

    def load_checkpoint(self, path: Path, ip_unet: Any) -> None:
        """Load the UNet-side weights of checkpoint ``path`` into the policy (the reference stays as built)."""
        from safetensors.torch import load_file

        for name in self.checkpoint_tensors(ip_unet):
            file = path / name
            if not file.is_file():
                raise FileNotFoundError(
                    f"checkpoint {path} has no {name}, but model.trainable={self.mode.name} trains the UNet"
                )
            tensors = load_file(str(file))
            if name == UNET_FILE:
                ip_unet.load_unet_state_dict(tensors)
            else:
                ip_unet.load_unet_lora_state_dict(tensors)

    def describe(self, ip_unet: Any) -> str:
        """One line for the log: what trains, how many parameters, and the reference."""
        n_train = sum(p.numel() for p in ip_unet.parameters() if p.requires_grad)
        n_lora = sum(p.numel() for _, p in ip_unet.unet_lora_parameters())
        ref = self.mode.reference_kind(self.uses_reference)
        if self.reference is not None:
            dtype = next(self.reference.parameters()).dtype
            ref += f" ({sum(p.numel() for p in self.reference.parameters()) / 1e6:.2f} M params, {dtype})"
        lora = f", LoRA {n_lora / 1e6:.3f} M" if n_lora else ""
        return f"model.trainable={self.mode.name}: {n_train / 1e6:.3f} M trainable parameters{lora}; reference: {ref}"


def _frozen_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A frozen, eval-mode copy of ``module`` in ``dtype`` (floating-point tensors), converted tensor by tensor."""
    memo: dict[int, Any] = {}
    for tensor in list(module.parameters()) + list(module.buffers()):  # copy each tensor straight into ``dtype``
        if tensor.is_floating_point() and tensor.dtype != dtype:
            clone = tensor.detach().to(dtype=dtype, copy=True)
            memo[id(tensor)] = nn.Parameter(clone, requires_grad=False) if isinstance(tensor, nn.Parameter) else clone
    ref = copy.deepcopy(module, memo)
    ref.requires_grad_(False)
    ref.eval()
    return ref


def setup_trainable(cfg: Any, models: Any) -> TrainableSetup:
    """Make ``models.ip_unet`` train what ``cfg.model.trainable`` says and build the DPO reference it needs.

    ``models`` must have been built with :meth:`TrainableMode.build_kwargs`. Puts the LoRA on the UNet
    (``unet_lora`` modes); for ``unet`` modes with a DPO loss takes the frozen reference copy of the initial UNet and
    adapter in :func:`reference_dtype` (on the policy's device; no gradients, eval mode).
    """
    mode = TrainableMode.from_config(cfg.model)
    uses_reference = bool(cfg.loss.uses_reference_model)
    ip_unet = models.ip_unet
    if mode.unet == "lora":
        lora = cfg.model.lora
        ip_unet.add_unet_lora(lora.rank, lora.effective_alpha, list(lora.target_modules), lora.dropout)
    reference = None
    if mode.unet == "full" and uses_reference:
        reference = _frozen_copy(ip_unet, reference_dtype(cfg))
        reference.train_unet = False  # a frozen model: its own adapter is the reference adapter
        reference.train_adapter = False
    setup = TrainableSetup(mode, uses_reference, reference)
    logger.info("%s", setup.describe(ip_unet))
    return setup
