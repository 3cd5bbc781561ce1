"""IP-Adapter-Plus on SDXL- or SD1.5-class UNets for PatchDPO: models, tiny (CPU) or from local pretrained folders.

Public API:

* :func:`build_models` -> :class:`PatchDPOModels` – frozen encoders, noise scheduler and an
  :class:`IPAdapterUNet` (frozen UNet + trainable IP adapter + frozen reference adapter for DPO). The base model's
  family (SDXL-class or SD1.5-class) is read from the UNet's config; :func:`default_resampler_config` picks the
  matching IP-Adapter-Plus Resampler, :func:`check_adapter_fits` refuses an adapter made for the other family.
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
from .build import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD, PatchDPOModels, build_models, default_resampler_config
from .ip_adapter import (
    IPAdapterUNet,
    check_adapter_fits,
    cross_attention_processor_names,
    read_ip_adapter_file,
    unet_added_conditioning,
    write_ip_adapter_file,
)
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
    "check_adapter_fits",
    "cross_attention_processor_names",
    "default_resampler_config",
    "read_ip_adapter_file",
    "resampler_config_from_state_dict",
    "resolve_backend",
    "unet_added_conditioning",
    "write_ip_adapter_file",
    "xformers_status",
]
