"""What a training run is built from its config and dataset: the model, the loss with the class
statistics it needs, the optimiser, the learning-rate schedule and the autocast policy. Used by
the workers and, to fail early on bad settings, by the driver."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import Config
from ..data.manifest import Manifest
from ..errors import UserError


def loss_params_for(cfg: Config, manifest: Manifest) -> dict:
    """Loss params, with class statistics from the manifest for the losses that need them."""
    params = dict(cfg.loss.params)
    if cfg.loss.name in ("cb", "db"):
        params.setdefault("class_counts", manifest.class_counts("train"))
    if cfg.loss.name == "db":
        params.setdefault("num_samples", manifest.split("train").num_images)
    return params


def build_loss_for(cfg: Config, manifest: Manifest):
    from ..losses import build_loss, get_loss_class

    try:
        get_loss_class(cfg.loss.name)
    except ValueError as exc:
        raise UserError(str(exc), field="loss.name") from None
    try:
        return build_loss(cfg.loss.name, **loss_params_for(cfg, manifest))
    except ValueError as exc:  # the loss names the parameter at fault
        raise UserError(str(exc), field="loss.params") from None


def build_model_for(cfg: Config, num_classes: int):
    """The model ``cfg.model`` describes (the one place a config becomes a model: training, the
    benches' plain loops and ceilings)."""
    from ..models import build_model

    m = cfg.model
    return build_model(
        m.name,
        num_classes,
        m.in_chans,
        m.pretrained_path,
        m.drop_rate,
        pretrained=m.pretrained,
        min_loaded=m.pretrained_min_loaded,
        head=m.head,
        head_lambda=m.head_lambda,
    )


def augment_options(cfg: Config):
    from ..data.ingest import AugmentOptions

    d = cfg.data
    return AugmentOptions(d.crop_scale_min, d.rotation_degrees, d.hflip, d.brightness, d.contrast)


def lr_factor(step: int, steps_per_epoch: int, epochs: int, warmup_epochs: float, min_ratio: float) -> float:
    """Linear warmup then cosine decay to ``min_ratio``, per optimisation step."""
    t = step / max(steps_per_epoch, 1)
    if warmup_epochs > 0 and t < warmup_epochs:
        return max(t / warmup_epochs, 1e-3)
    span = max(epochs - warmup_epochs, 1e-8)
    progress = min(max((t - warmup_epochs) / span, 0.0), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def amp_dtype(amp: str, device_type: str):
    """Autocast dtype, or None for full precision. CPU runs full precision under 'auto'."""
    import torch

    if amp == "off" or (amp == "auto" and device_type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or (device_type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


@dataclass
class TrainingParts:
    """The stateful pieces of one worker's training: what a checkpoint saves and restores."""

    model: object  # as prepared by Ray Train (DDP-wrapped with several workers)
    loss_fn: object
    optimizer: object
    scheduler: object
    scaler: object
    autocast_dtype: object  # torch dtype, or None for full precision
    ema: object = None  # timm ModelEmaV3 of the weights (train.ema), or None
    channels_last: bool = False  # inputs go in channels-last like the model
    accumulate: int = 1  # batches per optimiser step
    head_only: bool = False  # cRT: the backbone is frozen, in eval mode
    num_classes: int = 0

    def train_mode(self) -> None:
        from ..models import unwrap
        from ..models.heads import set_training

        set_training(unwrap(self.model), self.head_only)

    def state_dicts(self) -> dict:
        from ..models import unwrap

        out = {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        if self.ema is not None:
            out["ema"] = self.ema.module.state_dict()
        return out

    def load_state_dicts(self, state: dict) -> None:
        from ..models import unwrap

        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:  # a checkpoint from before EMA was on: the average starts here
            self.ema.module.load_state_dict(state.get("ema") or state["model"])

    def step_done(self) -> None:
        """After each optimiser step: move the EMA weights (timm's warmup counts the steps)."""
        if self.ema is not None:
            from ..models import unwrap

            self.ema.update(unwrap(self.model), step=self.scheduler.last_epoch)


def build_parts(
    cfg: Config,
    manifest: Manifest,
    device,
    world_size: int,
    prepare_model=lambda m: m,
    init=None,
    epoch_images: float | None = None,
) -> TrainingParts:
    """Model (through ``prepare_model``, e.g. Ray Train's; from ``init``, a first stage's weights,
    when given), loss, AdamW over what trains, warmup + cosine schedule per step (epochs of
    ``epoch_images``, default the training split), and the gradient scaler (active for float16
    autocast only)."""
    import torch

    from .stages import apply_init

    t = cfg.train
    # cudnn.benchmark stays off: on an H200 (resnet50, bf16, channels-last, 224 px) it gave the
    # same steady 4,168 img/s as cuDNN's heuristics, and cost 11 s at the first batch and 4-6 s
    # at every new batch shape (README, "GPU training speed").
    model = build_model_for(cfg, len(manifest.label_names))
    apply_init(model, init, t.head_only, len(manifest.label_names))
    if t.grad_checkpointing:
        model.set_grad_checkpointing(True)
    channels_last = use_channels_last(t.channels_last, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = prepare_model(model)
    if t.compile:  # after DDP wrapping, as PyTorch recommends; checkpoints unwrap both
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        fused=device.type == "cuda",
    )
    n_train = epoch_images or manifest.split("train").num_images
    steps_per_epoch = max(1, math.ceil(n_train / (t.batch_size * max(world_size, 1) * t.accumulate_steps)))
    o = cfg.optim
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps_per_epoch, cfg.train.epochs, o.warmup_epochs, o.min_lr_ratio)
    )
    autocast = amp_dtype(cfg.train.amp, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast == torch.float16)
    ema = None
    if cfg.train.ema:
        from timm.utils import ModelEmaV3

        from ..models import unwrap

        ema = ModelEmaV3(unwrap(model), decay=cfg.train.ema_decay, use_warmup=cfg.train.ema_warmup)
    loss = build_loss_for(cfg, manifest).to(device)
    loss.check_targets = False  # prepared labels are 0 or 1 (prepare checked them): no host sync per step
    return TrainingParts(
        model, loss, optimizer, scheduler, scaler, autocast, ema, channels_last, t.accumulate_steps, t.head_only,
        len(manifest.label_names),
    )  # fmt: skip


def use_channels_last(setting: bool | None, device) -> bool:
    """Channels-last on CUDA unless turned off (tensor cores want NHWC); off elsewhere unless asked."""
    return device.type == "cuda" if setting is None else setting
