"""Model construction through timm (any timm model name); never downloads weights."""

from __future__ import annotations

from ..errors import UserError

# The heads ``model.head`` names (built in ``components.models.heads``). Kept here, free of torch,
# so the config schema can offer them as choices without importing torch (`ralflow --help`).
HEADS = ("linear", "csra")


def build_model(
    name: str,
    num_classes: int,
    in_chans: int = 1,
    pretrained_path: str | None = None,
    drop_rate: float = 0.0,
    pretrained: bool = False,
    min_loaded: float = 0.9,
    head: str = "linear",
    head_lambda: float = 0.1,
):
    """A timm model; with ``pretrained_path`` (a local file) or ``pretrained`` (timm's weights from
    the Hugging Face Hub or its cache) it starts from those weights, its stem adapted to
    ``in_chans`` (``components.models.pretrained``); the load's report is ``model.load_report``.
    ``head`` other than ``linear`` puts that head (``components.models.heads``) on the backbone's
    unpooled features."""
    import dataclasses

    import timm

    from .heads import HeadedModel, make_head

    if name not in timm.list_models() and not timm.is_model(name):
        raise UserError(
            f"model.name: unknown timm model '{name}' "
            "(see timm.list_models(); e.g. resnet18, convnext_tiny, efficientnet_b0)",
            field="model.name",
        )
    if head not in HEADS:
        raise UserError(f"model.head {head!r} is invalid; allowed: {' | '.join(HEADS)}", field="model.head")
    kwargs = {"num_classes": num_classes if head == "linear" else 0, "in_chans": in_chans}
    if drop_rate:
        kwargs["drop_rate"] = drop_rate
    model = timm.create_model(name, pretrained=False, **kwargs)
    report = None
    if pretrained_path or pretrained:
        from .pretrained import load_adapted, read_state_dict, timm_pretrained_state

        if pretrained_path:
            state, source = read_state_dict(pretrained_path), pretrained_path
            if any(k.startswith("backbone.") for k in state):  # saved from a model with another head
                state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        else:
            state, source = timm_pretrained_state(name), f"timm ({name})"
        report = load_adapted(model, state, source, min_loaded)
    if head != "linear":
        classifier = make_head(head, model.num_features, num_classes, head_lambda)
        model = HeadedModel(model, classifier, drop_rate)
        if report is not None:  # the head starts fresh too: count its tensors with the new ones
            report = dataclasses.replace(report, new=report.new + len(classifier.state_dict()))
    model.load_report = report
    return model


def unwrap(model):
    """The plain module inside DistributedDataParallel and ``torch.compile`` wrappers (in either
    order): its state dict has the model's own keys, whatever the flags."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None or not hasattr(inner, "state_dict"):
            return model
        model = inner
