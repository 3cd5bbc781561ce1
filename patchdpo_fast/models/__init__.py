"""IP-Adapter-Plus on SDXL for PatchDPO: models, tiny (CPU) or from local pretrained folders.

Public API:

* :func:`build_models` -> :class:`PatchDPOModels` – frozen SDXL encoders, noise scheduler and an
  :class:`IPAdapterUNet` (frozen UNet + trainable IP adapter + frozen reference adapter for DPO).
* :class:`Resampler` – the IP-Adapter-Plus Perceiver Resampler (original checkpoint key layout).
* :class:`IPAttnProcessor`, :class:`AttnProcessor` – diffusers attention processors with selectable backends
  (``sdpa`` / ``xformers`` / ``eager``, see :func:`resolve_backend`).
* :func:`read_ip_adapter_file`, :func:`write_ip_adapter_file` – the stock IP-Adapter file format.
* :func:`build_sdxl_models` – a randomly initialized SDXL-shaped stack from the configs in
  :mod:`~patchdpo_fast.models.sdxl_config` (benchmarks at the real scale without weights; meta-device counts).
"""

from .attention import (
    ATTENTION_BACKENDS,
    AttnProcessor,
    IPAttnProcessor,
    XFormersUnavailableError,
    attention,
    resolve_backend,
    xformers_status,
)
from .build import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD, PatchDPOModels, build_models
from .ip_adapter import IPAdapterUNet, cross_attention_processor_names, read_ip_adapter_file, write_ip_adapter_file
from .resampler import PerceiverAttention, Resampler, resampler_config_from_state_dict
from .sdxl_config import build_sdxl_components, build_sdxl_models

__all__ = [
    "ATTENTION_BACKENDS",
    "CLIP_IMAGE_MEAN",
    "CLIP_IMAGE_STD",
    "AttnProcessor",
    "IPAdapterUNet",
    "IPAttnProcessor",
    "PatchDPOModels",
    "PerceiverAttention",
    "Resampler",
    "XFormersUnavailableError",
    "attention",
    "build_models",
    "build_sdxl_components",
    "build_sdxl_models",
    "cross_attention_processor_names",
    "read_ip_adapter_file",
    "resampler_config_from_state_dict",
    "resolve_backend",
    "write_ip_adapter_file",
    "xformers_status",
]
