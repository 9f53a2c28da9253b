"""Fused forward + analytic gradient for the asymmetric family (ASL, APL, RAL).

The three losses share one element-wise formula (``shared/specs/losses.md``):

    positive:  Lp = -[log P + a (1-P) + b/2 (1-P)^2] * (1-p)^gamma_pos
    negative:  Ln = -[log Q + e Q] * H(p, r) * q^gamma_neg

with ``p = sigmoid(x)``, ``r = 1 - q = min(1 - p + clip, 1)``, ``P = max(p, eps)``,
``Q = max(r, eps)``; ASL has a = b = e = 0 and H = 1, APL has H = 1, RAL has the Hill factor
``H = (lamb - p) p^2 (lamb - r)`` ("code") or ``H = lamb - p`` ("paper").

Written as ~30 separate autograd ops this costs several times BCE on CPU (each op a pass over memory
plus saved intermediates; bench/losses.py measures it). Here the loss and dL/dx are computed together in one pass with
in-place temporaries, and autograd sees a single node. Targets blend the two branches
(``y*Lp + (1-y)*Ln``), which is the spec's formula for 0/1 targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .base import power


@dataclass(frozen=True)
class AsymmetricConfig:
    gamma_neg: float
    gamma_pos: float
    clip: float
    eps: float
    epsilon_pos: float = 0.0  # a
    epsilon_pos_pow: float = 0.0  # b
    epsilon_neg: float = 0.0  # e
    hill: str | None = None  # None | "code" | "paper"
    lamb: float = 1.5
    detach_focal_weight: bool = True


def asymmetric_loss_and_grad(x: torch.Tensor, y: torch.Tensor, cfg: AsymmetricConfig, need_grad: bool):
    """Element-wise loss and (if ``need_grad``) dLoss/dx, both shaped like ``x``."""
    focusing = cfg.gamma_pos > 0 or cfg.gamma_neg > 0
    p = torch.sigmoid(x)

    # ---- positive branch ---------------------------------------------------------------
    P = p.clamp(min=cfg.eps)
    log_p = torch.log(P)
    if cfg.epsilon_pos or cfg.epsilon_pos_pow:
        u = 1 - P
        lp = (u * (0.5 * cfg.epsilon_pos_pow) + cfg.epsilon_pos).mul_(u).add_(log_p).neg_()
    else:
        lp = -log_p
    if need_grad:
        # dLp/dp = -(1/P - a - b(1-P)), zero where the eps clamp is active
        dlp = P.reciprocal().neg_()
        if cfg.epsilon_pos or cfg.epsilon_pos_pow:
            dlp.add_(u * cfg.epsilon_pos_pow).add_(cfg.epsilon_pos)
        dlp.masked_fill_(p < cfg.eps, 0.0)
    if focusing and cfg.gamma_pos > 0:
        one_minus_p = 1 - p
        wp = power(one_minus_p, cfg.gamma_pos)
        if need_grad:
            dlp.mul_(wp)
            if not cfg.detach_focal_weight:  # + Lp * d(1-p)^g/dp
                dwp = (
                    power(one_minus_p, cfg.gamma_pos - 1).mul_(-cfg.gamma_pos)
                    if cfg.gamma_pos != 1
                    else -torch.ones_like(p)
                )
                if cfg.gamma_pos < 1:  # (1-p)^(g-1) is inf at p = 1
                    dwp.nan_to_num_(posinf=0.0, neginf=0.0)
                dlp.add_(dwp.mul_(lp))
        lp.mul_(wp)

    # ---- negative branch ---------------------------------------------------------------
    clipped = cfg.clip > 0
    r = (1 - p).add_(cfg.clip).clamp_(max=1) if clipped else 1 - p
    # Where the clip saturates (r == 1, p <= clip) dr/dp = 0. With gamma_neg > 1 every gradient
    # term of this branch is scaled by q^g or g q^(g-1), both exactly 0 there: no mask needed.
    shifted = r < 1 if clipped and cfg.gamma_neg <= 1 else None
    floored = cfg.clip < cfg.eps  # r >= clip, so the eps floor can only act when clip < eps
    Q = r.clamp(min=cfg.eps) if floored else r
    ln = torch.log(Q)
    if cfg.epsilon_neg:
        ln.add_(Q * cfg.epsilon_neg)
    ln.neg_()
    if need_grad:
        # dLn0/dp = dLn0/dr * dr/dp = (1/Q + e) where r is shifted and unclamped
        dln = Q.reciprocal()
        if cfg.epsilon_neg:
            dln.add_(cfg.epsilon_neg)
        if floored:
            dln.masked_fill_(r < cfg.eps, 0.0)
        if shifted is not None:
            dln.masked_fill_(~shifted, 0.0)
    if cfg.hill is not None:
        lamb = cfg.lamb
        lamb_minus_p = lamb - p
        if cfg.hill == "paper":
            h = lamb_minus_p
            dh = None  # dH/dp = -1
        else:
            p2 = p * p
            lamb_minus_r = lamb - r
            h = lamb_minus_p * p2
            if need_grad:
                # d/dp[(l-p) p^2 (l-r)] = p (2l - 3p)(l-r) + (l-p) p^2 * [r shifted]
                dh = (p * (2 * lamb) - 3 * p2).mul_(lamb_minus_r).add_(h if shifted is None else h * shifted)
            h = h.mul_(lamb_minus_r)
        if need_grad:
            dln.mul_(h)
            dln.sub_(ln) if dh is None else dln.add_(dh.mul_(ln))
        ln.mul_(h)
    if focusing and cfg.gamma_neg > 0:
        q = 1 - r
        wn = power(q, cfg.gamma_neg)
        if need_grad:
            dln.mul_(wn)
            if not cfg.detach_focal_weight:  # + Ln * d q^g/dp, dq/dp = 1 where r is shifted
                dwn = power(q, cfg.gamma_neg - 1).mul_(cfg.gamma_neg) if cfg.gamma_neg != 1 else torch.ones_like(q)
                if shifted is not None:
                    dwn.masked_fill_(~shifted, 0.0)
                if cfg.gamma_neg < 1:  # q^(g-1) is inf at q = 0
                    dwn.nan_to_num_(posinf=0.0, neginf=0.0)
                dln.add_(dwn.mul_(ln))
        ln.mul_(wn)

    loss = torch.lerp(ln, lp, y)
    if not need_grad:
        return loss, None
    grad = torch.lerp(dln, dlp, y).mul_(p).mul_(1 - p)  # chain rule: dp/dx = p (1 - p)
    return loss, grad


class _AsymmetricFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, cfg):
        loss, grad = asymmetric_loss_and_grad(x, y, cfg, need_grad=ctx.needs_input_grad[0])
        if grad is not None:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad_out * grad, None, None


def asymmetric_elementwise(x: torch.Tensor, y: torch.Tensor, cfg: AsymmetricConfig) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _AsymmetricFunction.apply(x, y, cfg)
    return asymmetric_loss_and_grad(x, y, cfg, need_grad=False)[0]
