"""PatchDPO loss ops: reference definitions, fused Triton autograd Functions, dispatch and public wrappers.

Importable with only torch, triton and numpy installed::

    from patchdpo_fast.ops import patch_weighted_mse, diffusion_dpo_loss, patch_dpo_loss, patchdpo_weights
"""

from patchdpo_fast.ops.dispatch import BACKENDS, resolve_backend
from patchdpo_fast.ops.functional import diffusion_dpo_loss, patch_dpo_loss, patch_weighted_mse, patchdpo_weights
from patchdpo_fast.ops.modules import DiffusionDPOLoss, PatchDPOLoss, PatchWeightedMSELoss
from patchdpo_fast.ops.types import PatchLossOutput

__all__ = [
    "BACKENDS",
    "DiffusionDPOLoss",
    "PatchDPOLoss",
    "PatchLossOutput",
    "PatchWeightedMSELoss",
    "diffusion_dpo_loss",
    "patch_dpo_loss",
    "patch_weighted_mse",
    "patchdpo_weights",
    "resolve_backend",
]
