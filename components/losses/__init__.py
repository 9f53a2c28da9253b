"""The loss library: every loss is ``forward(logits, targets, mask=None)``.

``build_loss(name, **params)`` builds one by name; ``describe_losses()`` lists them with
their parameters and defaults. The math is specified in ``shared/specs/losses.md``.

The API below loads on first use (PEP 562), not on import: importing a torch-free part of the
package (the demo's options, which ``ralflow --help`` builds flags from) then costs no torch.
"""

from __future__ import annotations

import importlib

# Importing each family registers it (order = the order `ralflow losses` lists them in).
FAMILIES = ("bce", "focal", "asl", "hill", "apl", "ral", "poly", "cb", "db")
_API = {
    "REDUCTIONS": "base",
    "MultiLabelLoss": "base",
    "reduce_loss": "base",
    "build_loss": "registry",
    "describe_losses": "registry",
    "get_loss_class": "registry",
    "loss_names": "registry",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for family in FAMILIES:
        importlib.import_module(f".{family}", __name__)
    value = globals()[name] = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    return value
