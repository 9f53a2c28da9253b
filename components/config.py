"""One typed configuration for training (and tuning): dataclass defaults, overridden by a
YAML file, overridden by command-line flags. The resolved config is saved with every run.

YAML mirrors the sections below, e.g.::

    model: {name: resnet18, in_chans: 1}
    loss: {name: ral, params: {lamb: 2.0, gamma_neg: 3}}
    train: {epochs: 20, batch_size: 32, num_workers: 4, use_gpu: true}
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError


@dataclass
class ModelConfig:
    name: str = "resnet18"           # any timm model name
    in_chans: int = 1                # chest films are grayscale
    pretrained_path: str | None = None  # local weights file (never downloaded at run time)
    drop_rate: float = 0.0


@dataclass
class DataConfig:
    path: str = ""                   # a prepared dataset (folder with manifest.json)
    image_size: int | None = None    # default: the prepared image size
    crop_scale_min: float = 0.75
    rotation_degrees: float = 7.0
    hflip: bool = False
    brightness: float = 0.2
    contrast: float = 0.2
    map_cpus: float = 0.5            # CPUs per Ray Data decode/augment task


@dataclass
class LossConfig:
    name: str = "ral"
    params: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01       # cosine decays to lr * min_lr_ratio


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32             # per worker
    num_workers: int = 2             # Ray Train workers (0 = local mode, in the driver)
    use_gpu: bool = False
    cpus_per_worker: float = 0.5     # leave CPUs to Ray Data on small machines
    placement_strategy: str = "PACK"  # PACK | SPREAD (one worker per node where possible)
    amp: str = "auto"                # auto | off | bf16 | fp16 (autocast on GPU; the loss stays fp32)
    seed: int = 0
    keep_checkpoints: int = 2        # best N by val mAP
    max_failures: int = 2            # worker-group restarts from the latest checkpoint
    fail_at_epoch: int | None = None  # fault drill: one worker exits once at this epoch


@dataclass
class TrackingConfig:
    tracking_uri: str | None = None  # default: sqlite:///<cwd>/mlflow.db
    experiment: str = "ralflow"
    run_name: str | None = None      # default: derived from the config (stable => resumable)
    storage_path: str | None = None  # default: <cwd>/ralflow-runs


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``section.key`` -> value (loss params as ``loss.params.k``), for MLflow params."""
        out = {}
        for section, values in self.to_dict().items():
            for k, v in values.items():
                if isinstance(v, dict):
                    out.update({f"{section}.{k}.{kk}": vv for kk, vv in v.items()})
                else:
                    out[f"{section}.{k}"] = v
        return out

    def run_key(self) -> str:
        """Stable short hash of what defines a training run (not where it is tracked/stored)."""
        d = self.to_dict()
        d.pop("tracking")
        d["train"].pop("fail_at_epoch")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def merge(cfg: Config, overrides: dict, origin: str) -> Config:
    """Apply a nested dict (from YAML or flags); unknown sections/keys are errors naming them."""
    for section, values in (overrides or {}).items():
        if not hasattr(cfg, section):
            raise UserError(f"{origin}: unknown section '{section}' (known: {', '.join(f.name for f in dataclasses.fields(cfg))})")
        if not isinstance(values, dict):
            raise UserError(f"{origin}: section '{section}' must be a mapping")
        target = getattr(cfg, section)
        known = {f.name: f for f in dataclasses.fields(target)}
        for key, value in values.items():
            if key not in known:
                raise UserError(f"{origin}: unknown key '{section}.{key}' (known: {', '.join(known)})")
            if key == "params" and isinstance(value, dict):
                target.params = {**target.params, **value}
            else:
                setattr(target, key, value)
    return cfg


def load_config(yaml_path: str | None = None, overrides: dict | None = None) -> Config:
    import yaml

    cfg = Config()
    if yaml_path:
        path = Path(yaml_path)
        if not path.is_file():
            raise UserError(f"--config {yaml_path}: file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"--config {yaml_path}: invalid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise UserError(f"--config {yaml_path}: expected a mapping of sections")
        merge(cfg, data, yaml_path)
    merge(cfg, overrides or {}, "command line")
    return resolve_defaults(cfg)


def resolve_defaults(cfg: Config) -> Config:
    t = cfg.tracking
    if not t.tracking_uri:
        t.tracking_uri = f"sqlite:///{Path(os.getcwd()).resolve() / 'mlflow.db'}"
    if not t.storage_path:
        t.storage_path = str(Path(os.getcwd()).resolve() / "ralflow-runs")
    elif "://" not in t.storage_path:
        t.storage_path = str(Path(t.storage_path).expanduser().resolve())
    if cfg.data.path and "://" not in cfg.data.path:
        cfg.data.path = str(Path(cfg.data.path).expanduser().resolve())
    if cfg.train.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        raise UserError(f"train.placement_strategy={cfg.train.placement_strategy!r} is invalid; allowed: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD")
    if cfg.train.amp not in ("auto", "off", "bf16", "fp16"):
        raise UserError(f"train.amp={cfg.train.amp!r} is invalid; allowed: auto | off | bf16 | fp16")
    for name, value, ok in (("train.epochs", cfg.train.epochs, cfg.train.epochs >= 1),
                            ("train.batch_size", cfg.train.batch_size, cfg.train.batch_size >= 1),
                            ("train.num_workers", cfg.train.num_workers, cfg.train.num_workers >= 0),
                            ("optim.lr", cfg.optim.lr, cfg.optim.lr > 0)):
        if not ok:
            raise UserError(f"{name}={value!r} is invalid")
    if not t.run_name:
        t.run_name = f"{cfg.loss.name}-{cfg.model.name}-{cfg.run_key()}"
    return cfg


def save_yaml(cfg: Config, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
