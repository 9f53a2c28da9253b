"""Starting from pretrained weights, and saying how much of them was used.

ImageNet weights have a 3-channel stem; chest films are 1 channel. A plain shape-matched load
would silently drop the stem (and train it from scratch), so the stem is adapted the way timm
adapts it (``adapt_input_conv``: a 1-channel stem is the sum of the RGB filters), a classifier
whose class count differs starts fresh, and the load is reported: tensors loaded as they were,
adapted, and new. When less than ``min_loaded`` of the backbone's tensors came from the file, it
stops with an error instead of training a mostly random network under a "pretrained" name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

PREFIXES = ("module.", "model.", "backbone.", "encoder.")  # DDP, Lightning and wrapper prefixes


@dataclass
class LoadReport:
    source: str
    loaded: int  # tensors copied as they were
    adapted: int  # the input stem, re-summed to this model's channels
    new: int  # tensors of this model the file had nothing for (e.g. a classifier for other classes)
    unused: int  # tensors of the file this model has no place for
    backbone_share: float  # (loaded + adapted) / backbone tensors

    def line(self) -> str:
        return (
            f"pretrained weights from {self.source}: {self.loaded} tensors loaded, {self.adapted} adapted "
            f"(input stem), {self.new} new, {self.unused} unused; {self.backbone_share:.0%} of the backbone"
        )

    def params(self) -> dict:
        return {f"pretrained.{k}": getattr(self, k) for k in ("loaded", "adapted", "new", "unused")}


def read_state_dict(path: str) -> dict:
    """A weights file (safetensors or torch; a bare state dict or one under state_dict/model)."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"model.pretrained_path {path}: file not found (weights are never downloaded at run time)",
            field="model.pretrained_path",
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - not a weights file: say so
        raise UserError(
            f"model.pretrained_path {path}: not a safetensors or torch weights file "
            f"({type(exc).__name__}: {str(exc)[:200]})",
            field="model.pretrained_path",
        ) from None
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k: v for k, v in state.items() if hasattr(v, "shape")}
    for prefix in PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def classifier_keys(model) -> set[str]:
    """The state-dict keys of the model's classifier (timm's ``pretrained_cfg['classifier']``)."""
    names = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    names = [names] if isinstance(names, str) else list(names or [])
    return {k for k in model.state_dict() if any(k == n or k.startswith(n + ".") for n in names)}


def load_adapted(model, state: dict, source: str, min_loaded: float) -> LoadReport:
    """Load ``state`` into ``model``: matching tensors as they are, the input stem adapted to the
    model's channels, the rest left as initialised; raises below ``min_loaded`` of the backbone."""
    import torch
    from timm.models import adapt_input_conv

    own = model.state_dict()
    head = classifier_keys(model)
    take, adapted = {}, 0
    for key, target in own.items():
        src = state.get(key)
        if src is None or key in head and src.shape != target.shape:
            continue
        if src.shape == target.shape:
            take[key] = src.to(target.dtype)
        elif src.ndim == 4 and src.shape[0] == target.shape[0] and src.shape[2:] == target.shape[2:]:
            take[key] = adapt_input_conv(target.shape[1], src.float()).to(target.dtype)  # the input stem
            adapted += 1
    with torch.no_grad():
        model.load_state_dict(take, strict=False)
    backbone = [k for k in own if k not in head and not k.endswith("num_batches_tracked")]
    used = sum(1 for k in backbone if k in take)
    report = LoadReport(
        source=source,
        loaded=len(take) - adapted,
        adapted=adapted,
        new=len(own) - len(take),
        unused=len(set(state) - set(take)),
        backbone_share=used / max(len(backbone), 1),
    )
    if report.backbone_share < min_loaded:
        raise UserError(
            f"{report.line()}: below model.pretrained_min_loaded {min_loaded:.0%}. Is it a checkpoint of "
            f"this architecture? (set model.pretrained_min_loaded 0 to start anyway)",
            field="model.pretrained_min_loaded",
        )
    return report


def timm_pretrained_state(name: str) -> dict:
    """timm's pretrained weights for ``name`` (Hugging Face Hub or the local cache), as published
    (3 channels, ImageNet classes); a clear error when neither can be reached."""
    import timm

    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as exc:  # noqa: BLE001 - hub unreachable, no cache, no weights for the name
        published = timm.models.get_pretrained_cfg(name)  # 'resnet50' is timm/resnet50.a1_in1k on the Hub
        hub_id = getattr(published, "hf_hub_id", None) or f"timm/{name}"
        raise UserError(
            f"model.pretrained: cannot get timm's pretrained weights for '{name}' ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}). On a machine without internet, fetch them "
            f"where there is (`huggingface-cli download {hub_id}`) into the Hugging Face cache (HF_HOME) "
            "this machine reads, or save them to a file and use model.pretrained_path",
            field="model.pretrained",
        ) from None
