"""Model construction through timm (any timm model name); never downloads weights."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError


def build_model(
    name: str, num_classes: int, in_chans: int = 1, pretrained_path: str | None = None, drop_rate: float = 0.0
):
    import timm
    import torch

    if name not in timm.list_models() and not timm.is_model(name):
        raise UserError(
            f"model.name: unknown timm model '{name}' "
            "(see timm.list_models(); e.g. resnet18, convnext_tiny, efficientnet_b0)",
            field="model.name",
        )
    kwargs = {"num_classes": num_classes, "in_chans": in_chans}
    if drop_rate:
        kwargs["drop_rate"] = drop_rate
    model = timm.create_model(name, pretrained=False, **kwargs)
    if pretrained_path:
        path = Path(pretrained_path)
        if not path.is_file():
            raise UserError(
                f"model.pretrained_path {pretrained_path}: file not found (weights are never downloaded)",
                field="model.pretrained_path",
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        # Different class count / input channels: keep the backbone, let the head start fresh.
        own = model.state_dict()
        compatible = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(compatible, strict=False)
    return model


def unwrap(model):
    """The plain module inside a DistributedDataParallel (or compiled) wrapper."""
    return getattr(model, "module", model)
