"""Hill loss (Zhang et al. 2021, "Simple and robust loss design for multi-label learning
with missing labels")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import MultiLabelLoss, check_finite_number, check_param, power
from .registry import register_loss


def hill_negative(p: torch.Tensor, lamb: float) -> torch.Tensor:
    """Hill's negative term ``(lamb - p) * p^2`` (also a factor of RAL's negative branch)."""
    return (lamb - p) * (p * p)


def check_lamb(loss: str, lamb) -> float:
    v = check_finite_number(loss, "lamb", lamb)
    check_param(loss, "lamb", lamb, v >= 1, "lamb >= 1 (below 1 the negative loss changes sign)")
    return v


@register_loss
class HillLoss(MultiLabelLoss):
    """Hill loss: focal-margin positives, (lamb - p) * p^2 negatives."""

    name = "hill"

    def __init__(self, lamb: float = 1.5, margin: float = 1.0, gamma: float = 2.0, reduction: str = "sum") -> None:
        super().__init__(reduction)
        self.lamb = check_lamb(self.name, lamb)
        self.margin = check_finite_number(self.name, "margin", margin)
        check_param(self.name, "gamma", gamma, check_finite_number(self.name, "gamma", gamma) >= 0, ">= 0")
        self.gamma = float(gamma)

    def elementwise(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shifted = x - self.margin
        log_s = F.logsigmoid(shifted)
        one_minus_s = torch.sigmoid(-shifted)
        loss_pos = -power(one_minus_s, self.gamma) * log_s
        loss_neg = hill_negative(torch.sigmoid(x), self.lamb)
        return y * loss_pos + (1 - y) * loss_neg
