"""Poly-1 loss (Leng et al., ICLR 2022), sigmoid form."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import MultiLabelLoss, check_finite_number, check_param
from .registry import register_loss


@register_loss
class Poly1Loss(MultiLabelLoss):
    """Poly-1: BCE + epsilon * (1 - pt)."""

    name = "poly1"

    def __init__(self, epsilon: float = 1.0, reduction: str = "mean") -> None:
        super().__init__(reduction)
        e = check_finite_number(self.name, "epsilon", epsilon)
        check_param(self.name, "epsilon", epsilon, e >= -1, "epsilon >= -1 (below -1 the loss can go negative)")
        self.epsilon = e

    def elementwise(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(x)
        pt = y * p + (1 - y) * (1 - p)
        return F.binary_cross_entropy_with_logits(x, y, reduction="none") + self.epsilon * (1 - pt)
