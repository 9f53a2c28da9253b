"""Asymmetric polynomial loss (Huang et al., ICASSP 2023)."""

from __future__ import annotations

import torch

from .asymmetric import AsymmetricConfig, asymmetric_elementwise
from .base import MultiLabelLoss, check_asymmetric_params, check_finite_number
from .registry import register_loss


class AsymmetricPolynomialBase(MultiLabelLoss):
    """Parameters shared by APL and RAL (both computed by the fused asymmetric kernel)."""

    def __init__(
        self, gamma_neg, gamma_pos, clip, eps, epsilon_pos, epsilon_neg, epsilon_pos_pow, detach_focal_weight, reduction
    ) -> None:
        super().__init__(reduction)
        check_asymmetric_params(self.name, gamma_neg, gamma_pos, clip, eps)
        self.gamma_neg, self.gamma_pos = float(gamma_neg), float(gamma_pos)
        self.clip, self.eps = float(clip), float(eps)
        self.epsilon_pos = check_finite_number(self.name, "epsilon_pos", epsilon_pos)
        self.epsilon_neg = check_finite_number(self.name, "epsilon_neg", epsilon_neg)
        self.epsilon_pos_pow = check_finite_number(self.name, "epsilon_pos_pow", epsilon_pos_pow)
        self.detach_focal_weight = bool(detach_focal_weight)

    def asymmetric_config(self, **hill) -> AsymmetricConfig:
        return AsymmetricConfig(
            self.gamma_neg,
            self.gamma_pos,
            self.clip,
            self.eps,
            self.epsilon_pos,
            self.epsilon_pos_pow,
            self.epsilon_neg,
            detach_focal_weight=self.detach_focal_weight,
            **hill,
        )

    def elementwise(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return asymmetric_elementwise(x, y, self.config)


@register_loss
class AsymmetricPolynomialLoss(AsymmetricPolynomialBase):
    """Asymmetric polynomial loss: ASL with Taylor-coefficient (epsilon) adjustments."""

    name = "apl"

    def __init__(
        self,
        gamma_neg: float = 4,
        gamma_pos: float = 0,
        clip: float = 0.05,
        eps: float = 1e-8,
        epsilon_pos: float = 1.0,
        epsilon_neg: float = 0.0,
        epsilon_pos_pow: float = -2.5,
        detach_focal_weight: bool = True,
        reduction: str = "sum",
    ) -> None:
        super().__init__(
            gamma_neg, gamma_pos, clip, eps, epsilon_pos, epsilon_neg, epsilon_pos_pow, detach_focal_weight, reduction
        )
        self.config = self.asymmetric_config()
