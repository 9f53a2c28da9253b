"""Distribution-balanced loss (Wu et al., ECCV 2020): re-balancing weights, negative-tolerant
regularisation and a focal term."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import MultiLabelLoss, as_count_buffer, check_finite_number, check_num_classes, check_param, power
from .registry import register_loss


@register_loss
class DistributionBalancedLoss(MultiLabelLoss):
    """Distribution-balanced loss: re-balanced weights, negative-tolerant bias, focal term."""

    name = "db"

    def __init__(
        self,
        class_counts,
        num_samples: int,
        alpha: float = 0.1,
        beta: float = 10.0,
        mu: float = 0.2,
        init_bias: float = 0.05,
        neg_scale: float = 2.0,
        gamma: float = 2.0,
        balance_param: float = 2.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction)
        n = self.name
        ok = isinstance(num_samples, int) and not isinstance(num_samples, bool) and num_samples >= 2
        check_param(n, "num_samples", num_samples, ok, "an integer >= 2 (training images)")
        counts = as_count_buffer(n, "class_counts", class_counts)
        check_param(
            n,
            "class_counts",
            f"max {counts.max().item():g}",
            bool((counts <= num_samples).all()),
            f"every count <= num_samples ({num_samples})",
        )
        self.alpha = check_finite_number(n, "alpha", alpha)
        check_param(n, "alpha", alpha, self.alpha >= 0, ">= 0")
        self.beta = check_finite_number(n, "beta", beta)
        check_param(n, "beta", beta, self.beta > 0, "> 0")
        self.mu = check_finite_number(n, "mu", mu)
        self.init_bias = check_finite_number(n, "init_bias", init_bias)
        self.neg_scale = check_finite_number(n, "neg_scale", neg_scale)
        check_param(n, "neg_scale", neg_scale, self.neg_scale > 0, "> 0")
        self.gamma = check_finite_number(n, "gamma", gamma)
        check_param(n, "gamma", gamma, self.gamma >= 0, ">= 0")
        self.balance_param = check_finite_number(n, "balance_param", balance_param)
        check_param(n, "balance_param", balance_param, self.balance_param > 0, "> 0")
        self.num_samples = num_samples
        self.register_buffer("class_counts", counts)
        # Classes never seen, or seen in every image, would give an infinite bias: the count
        # is clamped into [1, N - 1] for the bias and re-balancing terms.
        c = counts.double().clamp(min=1, max=num_samples - 1)
        self.register_buffer("inv_freq", (1.0 / c).float())
        self.register_buffer("logit_bias", (-torch.log(num_samples / c - 1) * self.init_bias).float())

    def elementwise(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_num_classes(self.name, self.inv_freq, x, "class_counts")
        # 1. Re-balancing weight; an image with no positive has r = inf and weight alpha + 1.
        repeat = (y * self.inv_freq).sum(dim=1, keepdim=True)
        r = self.inv_freq / repeat.clamp(min=torch.finfo(torch.float32).tiny)
        w = self.alpha + torch.sigmoid(self.beta * (r - self.mu))
        w = torch.where(repeat > 0, w, torch.full_like(w, self.alpha + 1))
        # 2. Negative-tolerant regularisation.
        z = x + self.logit_bias
        z = y * z + (1 - y) * self.neg_scale * z
        w = y * w + (1 - y) * w / self.neg_scale
        # 3. Focal term.
        ce = F.binary_cross_entropy_with_logits(z, y, reduction="none")
        pt = torch.exp(-ce)
        return self.balance_param * power(1 - pt, self.gamma) * w * ce
