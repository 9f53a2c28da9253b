"""Classifier heads on any timm backbone (``model.head``), and the classifier-only helpers that
decoupled classifier re-training (cRT) uses.

- ``linear``: the backbone's own classifier (timm's pooling + fully connected layer).
- ``csra``: class-specific residual attention (Zhu & Wu, ICCV 2021), as used by CXR-LT entries.
  Every spatial position (or token) gets per-class scores ``s``; a class's logit is the average
  of its scores plus ``lambda`` times an attention-pooled score, ``sum(softmax(T s) s)``. Two heads,
  T = 1 and T -> infinity (max pooling, the paper's T = 99), are summed (CSRA's multi-head form).
"""

from __future__ import annotations

import torch
from torch import nn

from . import HEADS

CSRA_TEMPERATURES = (1.0, 99.0)  # T >= 99 is max pooling, as in CSRA's code


class CSRAHead(nn.Module):
    def __init__(self, in_features: int, num_classes: int, lam: float = 0.1, temperatures=CSRA_TEMPERATURES) -> None:
        super().__init__()
        self.lam, self.temperatures = lam, tuple(temperatures)
        self.classifiers = nn.ModuleList(nn.Linear(in_features, num_classes) for _ in self.temperatures)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, classes)
        out = 0
        for t, fc in zip(self.temperatures, self.classifiers):
            s = fc(tokens)  # (B, L, classes)
            att = s.amax(dim=1) if t >= 99 else (torch.softmax(s * t, dim=1) * s).sum(dim=1)
            out = out + s.mean(dim=1) + self.lam * att
        return out

    def reset_parameters(self) -> None:
        for fc in self.classifiers:
            fc.reset_parameters()


class HeadedModel(nn.Module):
    """A timm backbone (built without its classifier) and a head over its unpooled features:
    (B, C, H, W) maps of CNNs and (B, N, C) tokens of transformers both become (B, L, C).
    ``drop_rate``: dropout on those features, where timm's own classifier would drop its pooled ones
    (``model.drop_rate``)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.drop = nn.Dropout(drop_rate)
        self.pretrained_cfg = getattr(backbone, "pretrained_cfg", {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone.forward_features(x)
        tokens = f.flatten(2).transpose(1, 2) if f.ndim == 4 else f
        return self.head(self.drop(tokens))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int | None = None) -> None:
        self.head.reset_parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    @property
    def grad_checkpointing(self) -> bool:  # timm models say whether it is on
        return bool(getattr(self.backbone, "grad_checkpointing", False))


def make_head(kind: str, in_features: int, num_classes: int, lam: float = 0.1) -> nn.Module:
    if kind == "csra":
        return CSRAHead(in_features, num_classes, lam)
    raise ValueError(f"model.head {kind!r} is invalid; allowed: {' | '.join(HEADS)}")


def classifier_parameter_names(model) -> set[str]:
    """Names of the classifier's parameters (timm's ``get_classifier()``, or the attention head)."""
    ids = {id(p) for p in model.get_classifier().parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def freeze_backbone(model) -> None:
    """Only the classifier trains: every other parameter stops needing gradients."""
    keep = classifier_parameter_names(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)


def set_training(model, head_only: bool) -> None:
    """Training mode; with ``head_only`` the backbone stays in eval mode, so its batch-norm
    statistics stay those it was trained with (cRT freezes the whole representation)."""
    model.train()
    if head_only:
        head = set(model.get_classifier().modules())
        for m in model.modules():
            m.training = m in head
