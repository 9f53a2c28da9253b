"""Class-balanced BCE (Cui et al., CVPR 2019): weights from the effective number of samples."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import MultiLabelLoss, as_count_buffer, check_finite_number, check_num_classes, check_param
from .registry import register_loss


@register_loss
class ClassBalancedLoss(MultiLabelLoss):
    """Class-balanced BCE: w_c = (1 - beta) / (1 - beta^n_c), normalised to sum to C."""

    name = "cb"

    def __init__(self, class_counts, beta: float = 0.9999, reduction: str = "sum") -> None:
        super().__init__(reduction)
        b = check_finite_number(self.name, "beta", beta)
        check_param(self.name, "beta", beta, 0 <= b < 1, "0 <= beta < 1")
        counts = as_count_buffer(self.name, "class_counts", class_counts)
        self.beta = b
        self.register_buffer("class_counts", counts)
        # A class absent from the training set would get an infinite weight; it is weighted
        # as if seen once instead.
        n = counts.double().clamp(min=1)
        w = (1 - b) / (1 - torch.pow(torch.tensor(b, dtype=torch.float64), n))
        w = w / w.sum() * n.numel()
        self.register_buffer("class_weights", w.float())

    def elementwise(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_num_classes(self.name, self.class_weights, x, "class_counts")
        return self.class_weights * F.binary_cross_entropy_with_logits(x, y, reduction="none")
