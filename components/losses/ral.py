"""Robust Asymmetric Loss (Park et al., ICCV 2023 CVAMD workshop, arXiv 2308.05542).

RAL is the asymmetric polynomial loss whose negative branch is multiplied by Hill-loss
factors, which down-weights negatives the model is confident about being positive
(likely missing or mislabelled positives in long-tailed chest X-ray data).
"""

from __future__ import annotations

from .apl import AsymmetricPolynomialBase
from .base import check_param
from .hill import check_lamb
from .registry import register_loss

HILL_FORMS = ("code", "paper")


@register_loss
class RobustAsymmetricLoss(AsymmetricPolynomialBase):
    """Robust asymmetric loss: APL with a Hill-regularised negative branch."""

    name = "ral"

    def __init__(
        self,
        gamma_neg: float = 4,
        gamma_pos: float = 0,
        clip: float = 0.05,
        eps: float = 1e-8,
        lamb: float = 1.5,
        epsilon_pos: float = 1.0,
        epsilon_neg: float = 0.0,
        epsilon_pos_pow: float = -2.5,
        detach_focal_weight: bool = False,
        hill_form: str = "code",
        reduction: str = "sum",
    ) -> None:
        super().__init__(
            gamma_neg, gamma_pos, clip, eps, epsilon_pos, epsilon_neg, epsilon_pos_pow, detach_focal_weight, reduction
        )
        self.lamb = check_lamb(self.name, lamb)
        check_param(self.name, "hill_form", hill_form, hill_form in HILL_FORMS, " | ".join(HILL_FORMS))
        self.hill_form = hill_form
        # "code" (the authors' released implementation): H = (lamb - p) p^2 (lamb - (1 - q));
        # "paper" (Eq. 6 as printed, psi(p) = lamb - p): H = lamb - p.
        self.config = self.asymmetric_config(hill=hill_form, lamb=self.lamb)
