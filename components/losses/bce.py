"""Binary cross-entropy with logits (the baseline every other loss is compared to)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import MultiLabelLoss, as_count_buffer, check_num_classes, check_param
from .registry import register_loss


@register_loss
class BCELoss(MultiLabelLoss):
    """Binary cross-entropy with logits, optional per-class pos_weight."""

    name = "bce"

    def __init__(self, reduction: str = "mean", pos_weight=None) -> None:
        super().__init__(reduction)
        if pos_weight is not None:
            pw = as_count_buffer(self.name, "pos_weight", pos_weight)
            check_param(self.name, "pos_weight", pos_weight, bool((pw > 0).all()), "> 0 for every class")
            self.register_buffer("pos_weight", pw)
        else:
            self.pos_weight = None

    def elementwise(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.pos_weight is not None:
            check_num_classes(self.name, self.pos_weight, x, "pos_weight")
        return F.binary_cross_entropy_with_logits(x, y, pos_weight=self.pos_weight, reduction="none")
