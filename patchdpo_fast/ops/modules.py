"""``nn.Module`` wrappers of the functional losses, for trainers that compose losses as modules."""

from __future__ import annotations

import torch
from torch import nn

from patchdpo_fast.ops.functional import diffusion_dpo_loss, patch_dpo_loss, patch_weighted_mse
from patchdpo_fast.ops.types import PatchLossOutput

__all__ = ["DiffusionDPOLoss", "PatchDPOLoss", "PatchWeightedMSELoss"]


class PatchWeightedMSELoss(nn.Module):
    """Module form of :func:`patch_weighted_mse` (the official PatchDPO loss)."""

    def __init__(self, backend: str = "auto", check_finite: bool = False) -> None:
        super().__init__()
        self.backend = backend
        self.check_finite = check_finite

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> PatchLossOutput:
        return patch_weighted_mse(pred, target, weight, backend=self.backend, check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class DiffusionDPOLoss(nn.Module):
    """Module form of :func:`diffusion_dpo_loss`."""

    def __init__(self, beta: float = 5000.0, backend: str = "auto", check_finite: bool = False) -> None:
        super().__init__()
        self.beta = beta
        self.backend = backend
        self.check_finite = check_finite

    def forward(self, pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor) -> PatchLossOutput:
        return diffusion_dpo_loss(
            pred, ref_pred, target, self.beta, backend=self.backend, check_finite=self.check_finite
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, backend={self.backend!r}"


class PatchDPOLoss(nn.Module):
    """Module form of :func:`patch_dpo_loss`."""

    def __init__(self, beta: float = 5000.0, backend: str = "auto", check_finite: bool = False) -> None:
        super().__init__()
        self.beta = beta
        self.backend = backend
        self.check_finite = check_finite

    def forward(
        self, pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
    ) -> PatchLossOutput:
        return patch_dpo_loss(
            pred, ref_pred, target, weight, self.beta, backend=self.backend, check_finite=self.check_finite
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, backend={self.backend!r}"
