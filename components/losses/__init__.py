"""The loss library: every loss is ``forward(logits, targets, mask=None)``.

``build_loss(name, **params)`` builds one by name; ``describe_losses()`` lists them with
their parameters and defaults. The math is specified in ``shared/specs/losses.md``.
"""

from .base import REDUCTIONS, MultiLabelLoss, reduce_loss
from .registry import build_loss, describe_losses, get_loss_class, loss_names

# Importing each family registers it (order = the order `ralflow losses` lists them in).
from . import bce, focal, asl, hill, apl, ral, poly, cb, db  # noqa: E402,F401  isort:skip

__all__ = [
    "REDUCTIONS",
    "MultiLabelLoss",
    "build_loss",
    "describe_losses",
    "get_loss_class",
    "loss_names",
    "reduce_loss",
]
