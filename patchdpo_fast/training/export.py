"""The files a finished run exports, in formats stock diffusers loads, each in its configured dtype.

* ``ip_adapter.safetensors`` – the IP-Adapter (unless ``model.use_ip_adapter`` is false;
  ``pipeline.load_ip_adapter``), in ``train.export_dtype`` (fp16 by default, like the official files).
* ``unet_lora/pytorch_lora_weights.safetensors`` – the UNet LoRA (``unet_lora`` modes; ``pipeline.load_lora_weights``
  reads the folder), in ``train.export_dtype``.
* ``unet/`` – the whole UNet as a diffusers model folder, safetensors weights (``unet`` modes;
  ``UNet2DConditionModel.from_pretrained``), in ``train.unet_export_dtype`` (fp32 by default: the master weights).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from patchdpo_fast.utils import atomic_write_dir, set_default_permissions, write_safetensors

__all__ = ["EXPORT_DTYPES", "LORA_WEIGHT_NAME", "export_run", "unet_lora_diffusers_state_dict", "write_unet_lora"]

#: ``train.export_dtype`` / ``train.unet_export_dtype`` / ``--export-dtype`` values.
EXPORT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
#: The file name diffusers' ``load_lora_weights`` looks for in a folder.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def unet_lora_diffusers_state_dict(ip_unet: Any) -> dict[str, torch.Tensor]:
    """The UNet LoRA in diffusers' LoRA file layout: ``unet.<module>.lora_A.weight`` / ``unet.<module>.lora_B.weight``.

    The LoRA scale ``alpha / rank`` is folded into ``lora_B`` so that a loader that assumes ``alpha = rank`` (diffusers,
    for a file without alphas) rebuilds exactly the trained update ``(alpha / rank) * B @ A``. Tensors are new (the
    scaled B) or detached views.
    """
    from peft.tuners.lora import LoraLayer

    out: dict[str, torch.Tensor] = {}
    for name, module in ip_unet.unet.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            scale = float(module.scaling[adapter])
            out[f"unet.{name}.lora_A.weight"] = module.lora_A[adapter].weight.detach()
            out[f"unet.{name}.lora_B.weight"] = module.lora_B[adapter].weight.detach() * scale
    if not out:
        raise ValueError("the UNet has no LoRA to export")
    return out


def write_unet_lora(ip_unet: Any, folder: str | os.PathLike[str], dtype: torch.dtype | None = torch.float16) -> Path:
    """Write the UNet LoRA as a folder that stock diffusers' ``pipeline.load_lora_weights(folder)`` reads.

    The folder holds ``pytorch_lora_weights.safetensors`` (see :func:`unet_lora_diffusers_state_dict`); it is written
    next to its final place and renamed into it, replacing an older export.
    """
    tensors = unet_lora_diffusers_state_dict(ip_unet)

    def write(tmp: Path) -> None:
        write_safetensors(tensors, tmp / LORA_WEIGHT_NAME, metadata={"format": "pt"}, dtype=dtype)
        set_default_permissions(tmp / LORA_WEIGHT_NAME)

    return atomic_write_dir(Path(folder), write)


def export_run(cfg: Any, models: Any, mode: Any, out_dir: Path) -> dict[str, Path]:
    """Write every export of a finished run into ``out_dir``; returns ``{"adapter"|"unet_lora"|"unet": path}`` (no
    ``"adapter"`` for a model without an IP-Adapter).

    ``mode`` is the run's :class:`~patchdpo_fast.training.trainable.TrainableMode`. Call with the full parameters
    available (inside ``engine.gathered()`` under ZeRO-3), on one rank.
    """
    t_cfg = cfg.train
    paths = {}
    if models.ip_unet.has_ip_adapter:  # model.use_ip_adapter=false: no adapter to export
        adapter = out_dir / "ip_adapter.safetensors"
        paths["adapter"] = models.export_ip_adapter(adapter, dtype=EXPORT_DTYPES[t_cfg.export_dtype])
    if mode.unet == "lora":
        paths["unet_lora"] = write_unet_lora(models.ip_unet, out_dir / "unet_lora", EXPORT_DTYPES[t_cfg.export_dtype])
    elif mode.unet == "full":
        paths["unet"] = models.export_unet(out_dir / "unet", dtype=EXPORT_DTYPES[t_cfg.unet_export_dtype])
    return paths
