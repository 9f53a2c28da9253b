"""Asymmetric loss (Ridnik et al., ICCV 2021)."""

from __future__ import annotations

import torch

from .asymmetric import AsymmetricConfig, asymmetric_elementwise
from .base import MultiLabelLoss, check_asymmetric_params
from .registry import register_loss


@register_loss
class AsymmetricLoss(MultiLabelLoss):
    """Asymmetric loss: asymmetric focusing plus a probability margin (clip) on negatives."""

    name = "asl"

    def __init__(
        self,
        gamma_neg: float = 4,
        gamma_pos: float = 0,
        clip: float = 0.05,
        eps: float = 1e-8,
        detach_focal_weight: bool = True,
        reduction: str = "sum",
    ) -> None:
        super().__init__(reduction)
        check_asymmetric_params(self.name, gamma_neg, gamma_pos, clip, eps)
        self.gamma_neg, self.gamma_pos = float(gamma_neg), float(gamma_pos)
        self.clip, self.eps = float(clip), float(eps)
        self.detach_focal_weight = bool(detach_focal_weight)
        self.config = AsymmetricConfig(
            self.gamma_neg, self.gamma_pos, self.clip, self.eps, detach_focal_weight=self.detach_focal_weight
        )

    def elementwise(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return asymmetric_elementwise(x, y, self.config)
