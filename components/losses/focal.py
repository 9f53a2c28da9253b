"""Sigmoid focal loss (Lin et al., ICCV 2017), multi-label form."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import MultiLabelLoss, check_finite_number, check_param, power
from .registry import register_loss


@register_loss
class FocalLoss(MultiLabelLoss):
    """Sigmoid focal loss: alpha_t * (1 - pt)^gamma * BCE; alpha < 0 disables alpha_t."""

    name = "focal"

    def __init__(self, gamma: float = 2.0, alpha: float = 0.25, reduction: str = "mean") -> None:
        super().__init__(reduction)
        check_param(self.name, "gamma", gamma, check_finite_number(self.name, "gamma", gamma) >= 0, ">= 0")
        a = check_finite_number(self.name, "alpha", alpha)
        check_param(self.name, "alpha", alpha, a < 0 or a <= 1, "0 <= alpha <= 1, or < 0 to disable")
        self.gamma, self.alpha = float(gamma), float(alpha)

    def elementwise(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(x)
        ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        pt = y * p + (1 - y) * (1 - p)
        loss = power(1 - pt, self.gamma) * ce
        if self.alpha >= 0:
            loss = (self.alpha * y + (1 - self.alpha) * (1 - y)) * loss
        return loss
