"""Shared machinery for every multi-label loss: input checks, fp32 computation, masking,
reductions, parameter validation, and the pieces ASL/APL/RAL have in common.

Each concrete loss implements :meth:`MultiLabelLoss.elementwise`, which receives float32
logits and targets of shape (N, C) and returns the (N, C) element-wise loss. Everything
else (dtype handling, mask, reduction, error messages) lives here, in one place.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar

import torch
from torch import nn

REDUCTIONS = ("sum", "mean", "batchmean", "none")


def check_param(loss: str, name: str, value: Any, ok: bool, allowed: str) -> None:
    """Raise a ValueError naming the parameter and its allowed range when ``ok`` is False."""
    if not ok:
        raise ValueError(f"loss '{loss}': parameter {name}={value!r} is invalid; allowed: {allowed}")


def check_finite_number(loss: str, name: str, value: Any) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    check_param(loss, name, value, ok, "a finite number")
    return float(value)


def power(base: torch.Tensor, exponent: float) -> torch.Tensor:
    """``base ** exponent`` as a new tensor; small integer exponents (the usual focusing
    gammas) by multiplication, which on CPU costs a fraction of the general ``pow``."""
    if exponent == int(exponent) and 1 <= exponent <= 8:
        n, out, sq = int(exponent), None, base
        while True:  # exponentiation by squaring
            if n & 1:
                out = sq if out is None else out * sq
            n >>= 1
            if not n:
                return out.clone() if out is base else out
            sq = sq * sq
    return base.pow(exponent)


class MultiLabelLoss(nn.Module):
    """Base class: ``forward(logits, targets, mask=None)`` per the loss specification."""

    name: ClassVar[str] = ""
    # Whether forward checks that targets lie in [0, 1]. The check reads a device value (a host
    # sync after every forward); a caller whose targets are already checked (ralflow's trainer:
    # prepared labels are 0 or 1) turns it off so the host never waits for the device.
    check_targets: bool = True

    def __init__(self, reduction: str) -> None:
        super().__init__()
        check_param(self.name, "reduction", reduction, reduction in REDUCTIONS, " | ".join(REDUCTIONS))
        self.reduction = reduction

    # -- to implement ---------------------------------------------------------------------
    def elementwise(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    # -- public API -----------------------------------------------------------------------
    def forward(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x, y, m = self._check_inputs(logits, targets, mask)
        # Computed in float32 whatever the caller's dtype or autocast state: fp16 turns the
        # reference eps=1e-8 into 0 and log(0) into -inf (NaN gradients) below x ~ -17.
        with torch.autocast(device_type=x.device.type, enabled=False):
            loss = self.elementwise(x, y)
            return reduce_loss(loss, m, self.reduction)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Constructor parameters and their defaults (``inspect.Parameter.empty`` = required)."""
        sig = inspect.signature(cls.__init__)
        return {k: p.default for k, p in sig.parameters.items() if k != "self"}

    def extra_repr(self) -> str:
        parts = []
        for k in self.defaults():
            v = getattr(self, k, None)
            if isinstance(v, torch.Tensor):
                v = f"tensor(shape={tuple(v.shape)})"
            parts.append(f"{k}={v!r}")
        return ", ".join(parts)

    # -- helpers --------------------------------------------------------------------------
    def _check_inputs(self, logits, targets, mask):
        if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise ValueError(f"loss '{self.name}': logits and targets must be torch tensors")
        if logits.dim() != 2 or logits.shape != targets.shape:
            raise ValueError(
                f"loss '{self.name}': logits and targets must both have shape (N, C); "
                f"got logits {tuple(logits.shape)} and targets {tuple(targets.shape)}"
            )
        if not logits.is_floating_point():
            raise ValueError(f"loss '{self.name}': logits must be floating point, got {logits.dtype}")
        # float32 is the floor: half/bfloat16 are upcast, float64 stays float64.
        x = logits if logits.dtype == torch.float64 else logits.float()
        y = targets.to(device=x.device, dtype=x.dtype)
        # One host sync; NaN targets fail the test too.
        if self.check_targets and bool((~((y >= 0) & (y <= 1))).any()):
            raise ValueError(
                f"loss '{self.name}': targets must lie in [0, 1] (got min {y.min().item()}, max {y.max().item()})"
            )
        m = None
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.shape != logits.shape:
                got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(
                    f"loss '{self.name}': mask must have the logits' shape {tuple(logits.shape)}; got {got}"
                )
            m = mask.to(device=x.device) != 0
        return x, y, m


def reduce_loss(loss: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Apply the mask (masked elements give no loss and no gradient) then the reduction."""
    if mask is not None:
        loss = torch.where(mask, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / max(loss.shape[0], 1)
    # mean over the unmasked elements
    count = mask.sum().clamp_min(1).to(total.dtype) if mask is not None else max(loss.numel(), 1)
    return total / count


# -- parameter checks shared by several losses -----------------------------------------------


def check_asymmetric_params(loss: str, gamma_neg, gamma_pos, clip, eps) -> None:
    """Ranges shared by the ASL family (asl, apl, ral)."""
    for name, v in (("gamma_neg", gamma_neg), ("gamma_pos", gamma_pos)):
        check_param(loss, name, v, check_finite_number(loss, name, v) >= 0, ">= 0")
    check_param(loss, "clip", clip, 0 <= check_finite_number(loss, "clip", clip) < 1, "0 <= clip < 1")
    check_param(loss, "eps", eps, 0 < check_finite_number(loss, "eps", eps) < 1, "0 < eps < 1")


def as_count_buffer(loss: str, name: str, values, length: int | None = None) -> torch.Tensor:
    """Validate per-class statistics (1-D, finite, >= 0) and return them as a float32 tensor."""
    try:
        t = torch.as_tensor(values, dtype=torch.float64).flatten().clone()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"loss '{loss}': parameter {name} must be a list of numbers, one per class") from None
    ok = t.numel() > 0 and bool(torch.isfinite(t).all()) and bool((t >= 0).all())
    check_param(
        loss,
        name,
        values if t.numel() <= 8 else f"<{t.numel()} values>",
        ok,
        "a non-empty list of finite numbers >= 0, one per class",
    )
    if length is not None:
        check_param(loss, name, f"<{t.numel()} values>", t.numel() == length, f"{length} values")
    return t.float()


def check_num_classes(loss: str, buffer: torch.Tensor, x: torch.Tensor, what: str) -> None:
    if buffer.numel() != x.shape[1]:
        raise ValueError(f"loss '{loss}': {what} has {buffer.numel()} classes but the logits have {x.shape[1]}")
