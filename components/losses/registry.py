"""Name -> loss class registry and ``build_loss``."""

from __future__ import annotations

import inspect
from typing import Any

from .base import MultiLabelLoss

_REGISTRY: dict[str, type[MultiLabelLoss]] = {}


def register_loss(cls: type[MultiLabelLoss]) -> type[MultiLabelLoss]:
    if not cls.name or cls.name in _REGISTRY:
        raise RuntimeError(f"loss class {cls.__name__} needs a unique name, got {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def loss_names() -> list[str]:
    return list(_REGISTRY)


def get_loss_class(name: str) -> type[MultiLabelLoss]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown loss '{name}'; registered losses: {', '.join(_REGISTRY)}") from None


def build_loss(name: str, **params: Any) -> MultiLabelLoss:
    """Build a registered loss by name; unknown names or parameters raise ValueError."""
    cls = get_loss_class(name)
    accepted = cls.defaults()
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"loss '{name}' has no parameter(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}")
    missing = [k for k, v in accepted.items() if v is inspect.Parameter.empty and k not in params]
    if missing:
        raise ValueError(f"loss '{name}' requires parameter(s): {', '.join(missing)}")
    return cls(**params)


def describe_losses() -> list[dict[str, Any]]:
    """One entry per registered loss: name, one-line summary, parameters with defaults."""
    out = []
    for name, cls in _REGISTRY.items():
        params = {k: ("<required>" if v is inspect.Parameter.empty else v) for k, v in cls.defaults().items()}
        summary = (inspect.getdoc(cls) or "").splitlines()[0] if cls.__doc__ else ""
        out.append({"name": name, "summary": summary, "params": params})
    return out
