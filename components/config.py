"""The one typed configuration for training and tuning: dataclass defaults, overridden by a YAML
file, overridden by command-line flags. The resolved config is saved with every run.

Every field is declared once, here, with ``setting(...)``: its default, its help text, its
allowed values and (only where the field name alone would be ambiguous) its flag name.
``components.flags`` generates the command-line flags from these declarations, so adding a
field adds its flag. YAML mirrors the sections below, e.g.::

    model: {name: resnet18, in_chans: 1}
    loss: {name: ral, params: {lamb: 2.0, gamma_neg: 3}}
    train: {epochs: 20, batch_size: 32, num_workers: 4, use_gpu: true}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError


def setting(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None, choices=None, factory=None):
    """A config field with what its flag needs: ``help``, ``choices`` (also checked on load) and
    ``flag`` (default: ``--field-name``)."""
    meta = {"help": help, "flag": flag, "choices": tuple(choices) if choices else None}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


from .calibration import CALIBRATIONS, THRESHOLDS  # noqa: E402 - the choices live with their code
from .data.sampling import SAMPLINGS  # noqa: E402
from .models import HEADS  # noqa: E402

AMP_MODES = ("auto", "off", "bf16", "fp16")
DECODE_ON = ("cpu", "gpu")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class ModelConfig:
    name: str = setting("resnet18", flag="--model", help="timm model name")
    in_chans: int = setting(1, help="input channels (chest films are grayscale)")
    pretrained: bool = setting(False, help="start from timm's pretrained weights (Hugging Face Hub or its cache)")
    pretrained_path: str | None = setting(None, help="local weights file to start from (safetensors or torch)")
    pretrained_min_loaded: float = setting(
        0.9, help="stop when less than this share of the backbone's tensors came from the weights"
    )
    drop_rate: float = setting(0.0, help="dropout before the classifier")
    head: str = setting(
        "csra",
        choices=HEADS,
        help="classifier head: csra (class-specific attention; the ablation's pick) or linear (timm's)",
    )
    head_lambda: float = setting(0.1, help="csra: weight of the attention scores beside the average-pooled ones")


@dataclass
class DataConfig:
    path: str = setting(
        "", flag="--data", help="prepared dataset (manifest.json): a folder, or a URI such as s3://bucket/data"
    )
    image_size: int | None = setting(None, help="training image side in px (default: the prepared size)")
    crop_scale_min: float = setting(0.75, help="random resized crop: smallest area fraction")
    rotation_degrees: float = setting(7.0, help="random rotation range in degrees")
    hflip: bool = setting(False, help="random horizontal flip (off: chest films are not mirror-symmetric)")
    brightness: float = setting(0.2, help="brightness jitter")
    contrast: float = setting(0.2, help="contrast jitter")
    map_cpus: float = setting(0.5, help="CPUs per Ray Data decode/augment task")
    decode_on: str = setting(
        "cpu", choices=DECODE_ON, help="decode + augment in Ray Data tasks (cpu) or in the worker, on its device (gpu)"
    )
    sampling: str | None = setting(
        None,
        choices=SAMPLINGS,
        help="re-balanced sampling per epoch (default: class-aware for a head-only stage, else repeat-factor)",
    )
    repeat_threshold: float = setting(0.1, help="repeat-factor sampling: classes rarer than this share repeat")
    prefetch_batches: int = setting(
        1,
        help="batches each worker makes ready ahead: Ray Data's prefetch, and in a thread the copy to the "
        "device (or the GPU decode) of the next batches while the model trains",
    )
    prestart_workers: bool = setting(
        True,
        help="start the first epoch's decode processes (torch imported) while Ray Train starts its workers; "
        "off: Ray Data starts them when the first epoch asks for data",
    )
    shuffle_buffer: int = setting(
        0,
        help="training rows each worker mixes across row groups before batching (Ray Data's local shuffle "
        "buffer, seeded by train.seed, the epoch and the rank); 0: off",
    )


@dataclass
class LossConfig:
    name: str = setting("ral", flag="--loss", help="loss name, see `ralflow losses`")
    params: dict = setting(factory=dict, flag="--loss-param", help="loss parameter K=V (repeatable)")


@dataclass
class OptimConfig:
    lr: float = setting(1e-3, help="peak learning rate (AdamW)")
    weight_decay: float = setting(1e-4, help="AdamW weight decay")
    warmup_epochs: float = setting(1.0, help="linear warmup length in epochs")
    min_lr_ratio: float = setting(0.01, help="cosine decays to lr * this")


@dataclass
class TrainConfig:
    epochs: int = setting(10, help="training epochs")
    batch_size: int = setting(32, help="per-worker batch size")
    num_workers: int = setting(2, help="Ray Train workers (0 = local mode, in the driver)")
    use_gpu: bool = setting(False, help="one GPU per worker")
    cpus_per_worker: float = setting(0.5, help="CPUs per Ray Train worker (leave some to Ray Data)")
    placement_strategy: str = setting(
        "PACK", choices=PLACEMENT_STRATEGIES, help="PACK, or SPREAD for one worker per node"
    )
    amp: str = setting("auto", choices=AMP_MODES, help="autocast on GPU (the loss stays float32)")
    seed: int = setting(0, help="random seed")
    keep_checkpoints: int = setting(2, help="keep the best N checkpoints by val mAP")
    max_failures: int = setting(2, help="worker-group restarts from the latest checkpoint")
    fail_at_epoch: int | None = setting(None, help="fault drill: one worker exits once at this epoch")
    stall_warn_s: float = setting(120.0, help="say what training waits for when no batch came for this long")
    channels_last: bool | None = setting(None, help="channels-last memory format (default: on for CUDA)")
    compile: bool = setting(False, help="torch.compile the model (worth it on GPUs for long runs)")
    grad_checkpointing: bool = setting(False, help="recompute activations in backward (timm): less memory")
    accumulate_steps: int = setting(1, help="batches per optimiser step (gradient accumulation)")
    ema: bool = setting(False, help="keep an exponential moving average of the weights (timm ModelEmaV3)")
    ema_decay: float = setting(0.9998, help="EMA decay per step")
    ema_warmup: bool = setting(True, help="EMA decay warms up over the first steps (timm's schedule)")
    calibration: str = setting(
        "temperature", choices=CALIBRATIONS, help="calibration fitted on validation, stored with the model"
    )
    thresholds: str = setting(
        "max-f1", choices=THRESHOLDS, help="per-class decision thresholds fitted on validation, stored with the model"
    )
    logit_adjust: bool = setting(
        False, help="post-hoc logit adjustment (logit - tau log prior), tau chosen on validation, kept with the model"
    )
    logit_adjust_tau: float | None = setting(None, help="logit adjustment with this tau instead of choosing it")
    init_from: str | None = setting(
        None, help="MLflow run id: start from its logged model's weights (a second stage, linked to that run)"
    )
    head_only: bool = setting(
        False,
        flag="--train-head-only",
        help="classifier re-training (cRT): freeze the backbone, re-initialise and train the head only",
    )


TRACKING_URI_DEFAULT = "(default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)"


# Set by `ralflow submit` in its jobs, whose working directory is a copy of the code that Ray
# deletes in time: no default may put runs, checkpoints or the registry there.
SUBMITTED_ENV = "RALFLOW_SUBMITTED_JOB"


def working_folder(field: str, what: str, instead: str) -> Path:
    """The current directory, where ``field`` defaults to keeping ``what``; refused in a
    submitted job, naming the setting to give ``instead``."""
    if os.environ.get(SUBMITTED_ENV):
        raise UserError(
            f"{field} is required in a job sent by `ralflow submit`: by default {what} would go to the job's "
            f"working directory, a temporary copy of the code; give {instead}",
            field=field,
        )
    return Path(os.getcwd()).resolve()


def default_tracking_uri(field: str = "tracking_uri") -> str:
    """MLflow's own convention first: MLFLOW_TRACKING_URI, which the KubeRay manifests, the
    launcher YAML's head and cluster/local.sh set for their jobs; else a SQLite store here."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI", "").strip():
        return uri
    here = working_folder(field, "MLflow's runs and registry", "an MLflow server (or set MLFLOW_TRACKING_URI)")
    return f"sqlite:///{here / 'mlflow.db'}"


@dataclass
class TrackingConfig:
    tracking_uri: str | None = setting(None, help=f"MLflow tracking URI {TRACKING_URI_DEFAULT}")
    experiment: str = setting("ralflow", help="MLflow experiment")
    run_name: str | None = setting(
        None, help="Ray Train / MLflow run name (default: from the config; stable => resumable)"
    )
    storage_path: str | None = setting(
        None, help="Ray Train storage: a folder or a URI (default <cwd>/ralflow-runs; shared on multi-node)"
    )


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

    def run_key(self, dataset_sha256: str = "") -> str:
        """Stable short hash of what defines a training run: the config (not where it is tracked or
        stored) and the dataset's content, so a dataset rebuilt in the same folder is a new run."""
        d = self.to_dict()
        d.pop("tracking")
        for how_not_what in ("fail_at_epoch", "stall_warn_s"):  # how a run is watched, not what it trains
            d["train"].pop(how_not_what)
        for how_fast in ("prefetch_batches", "prestart_workers"):  # how fast the data comes, not which
            d["data"].pop(how_fast)
        d["dataset_sha256"] = dataset_sha256
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]

    def default_run_name(self, dataset_sha256: str) -> str:
        return f"{self.loss.name}-{self.model.name}-{self.run_key(dataset_sha256)}"


def sections(cfg_type=Config) -> dict[str, type]:
    """Section name -> its dataclass, in declaration order."""
    hints = typing.get_type_hints(cfg_type)
    return {f.name: hints[f.name] for f in dataclasses.fields(cfg_type)}


def field_type(section_type: type, name: str):
    """The declared type of a field, with ``X | None`` reduced to ``(X, optional)``."""
    t = typing.get_type_hints(section_type)[name]
    args = typing.get_args(t)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return t, False


def check_value(origin: str, section: str, section_type: type, name: str, value: Any) -> Any:
    """``value`` as the field's type (an int is a valid float), or a UserError naming the field."""
    t, optional = field_type(section_type, name)
    if value is None:
        if optional:
            return None
    elif t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif t is bool and isinstance(value, bool):
        return value
    elif t is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif t in (str, dict) and isinstance(value, t):
        return value
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}[t]
    raise UserError(f"{origin}: {section}.{name}={value!r} is not {kind}", field=f"{section}.{name}")


def closest(name: str, known, prefix: str = "") -> str:
    """`` (did you mean 'train.epochs'?; known: ...)``: the nearest known name first, then all, sorted."""
    import difflib

    names = sorted(known)
    near = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
    hint = f"did you mean '{prefix}{near[0]}'?; " if near else ""
    return f" ({hint}known: {', '.join(names)})"


def changed_options(before: dict, wanted: dict) -> dict:
    """``{name: (old, new)}`` for each option in ``wanted`` that ``before`` (what a folder was
    written with) does not hold the same: what a refusal to reuse that folder names."""
    return {k: (before.get(k), v) for k, v in wanted.items() if before.get(k) != v}


def merge(cfg: Config, overrides: dict, origin: str) -> Config:
    """Apply a nested dict (from YAML or flags); unknown sections/keys and values of the wrong
    type are errors naming them."""
    known_sections = sections()
    for section, values in (overrides or {}).items():
        if section not in known_sections:
            raise UserError(f"{origin}: unknown section '{section}'{closest(section, known_sections)}")
        if not isinstance(values, dict):
            raise UserError(f"{origin}: section '{section}' must be a mapping")
        target = getattr(cfg, section)
        known = {f.name for f in dataclasses.fields(target)}
        for key, value in values.items():
            if key not in known:
                raise UserError(f"{origin}: unknown key '{section}.{key}'{closest(key, known, f'{section}.')}")
            value = check_value(origin, section, type(target), key, value)
            if key == "params":
                target.params = {**target.params, **value}
            else:
                setattr(target, key, value)
    return cfg


RECIPES = Path(__file__).resolve().parent / "recipes"


def recipes() -> list[str]:
    """Names of the configs shipped in the package (``components/recipes/NAME.yaml``)."""
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def recipe_path(name_or_path: str) -> Path:
    """A config file: the path as given, or the packaged recipe of that name."""
    path = Path(name_or_path)
    if not path.is_file() and (RECIPES / f"{name_or_path}.yaml").is_file():
        return RECIPES / f"{name_or_path}.yaml"
    return path


def load_config(yaml_path: str | None = None, overrides: dict | None = None) -> Config:
    """Typed defaults, then the YAML file (a path, or a packaged recipe's name), then
    ``overrides`` (from flags); defaults resolved."""
    import yaml

    cfg = Config()
    if yaml_path:
        path = recipe_path(yaml_path)
        if not path.is_file():
            raise UserError(
                f"config {yaml_path}: file not found (packaged recipes: {', '.join(recipes())})", field="config"
            )
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"config {yaml_path}: invalid YAML: {str(exc).splitlines()[0]}", field="config") from None
        if not isinstance(data, dict):
            raise UserError(f"config {yaml_path}: expected a mapping of sections", field="config")
        merge(cfg, data, yaml_path)
    merge(cfg, overrides or {}, "command line")
    return resolve_defaults(cfg)


def resolve_defaults(cfg: Config) -> Config:
    """Fill the machine-dependent defaults (paths under the working directory) and check values
    against their declared choices and ranges. Done once, on the driver; the run name, which
    depends on the dataset, is set when the dataset is loaded."""
    from .paths import canonical, local_path

    t = cfg.tracking
    t.tracking_uri = t.tracking_uri or default_tracking_uri("tracking.tracking_uri")
    if not t.storage_path:
        here = working_folder("tracking.storage_path", "the checkpoints", "a folder every node sees, or s3://...")
        t.storage_path = str(here / "ralflow-runs")
    t.storage_path = canonical(t.storage_path)
    if cfg.data.sampling is None:  # re-sampling beat the seed spread in bench/ablation.py (README)
        cfg.data.sampling = "class-aware" if cfg.train.head_only else "repeat-factor"
    if cfg.data.path:
        cfg.data.path = canonical(cfg.data.path)
    if cfg.model.pretrained_path:  # read by each worker, whose working directory is not this one
        where = local_path(cfg.model.pretrained_path, "model.pretrained_path", "; use a file every node can read")
        cfg.model.pretrained_path = str(where.resolve())
    for section, section_type in sections().items():
        for f in dataclasses.fields(section_type):
            value, choices = getattr(getattr(cfg, section), f.name), f.metadata.get("choices")
            if choices and value not in choices:
                raise UserError(
                    f"{section}.{f.name}={value!r} is invalid; allowed: {' | '.join(choices)}",
                    field=f"{section}.{f.name}",
                )
    tr, size = cfg.train, cfg.data.image_size
    for name, value, ok, allowed in (
        ("train.epochs", tr.epochs, tr.epochs >= 1, ">= 1"),
        ("train.batch_size", tr.batch_size, tr.batch_size >= 1, ">= 1"),
        ("train.num_workers", tr.num_workers, tr.num_workers >= 0, ">= 0 (0: local mode)"),
        ("train.cpus_per_worker", tr.cpus_per_worker, tr.cpus_per_worker > 0, "> 0"),
        ("train.keep_checkpoints", tr.keep_checkpoints, tr.keep_checkpoints >= 1, ">= 1"),
        ("train.max_failures", tr.max_failures, tr.max_failures >= -1, ">= 0, or -1 for no limit"),
        ("train.accumulate_steps", tr.accumulate_steps, tr.accumulate_steps >= 1, ">= 1"),
        ("data.image_size", size, size is None or 16 <= size <= 4096, "16..4096, or unset for the prepared size"),
        ("data.map_cpus", cfg.data.map_cpus, cfg.data.map_cpus > 0, "> 0"),
        ("data.repeat_threshold", cfg.data.repeat_threshold, 0 < cfg.data.repeat_threshold <= 1, "in (0, 1]"),
        ("data.prefetch_batches", cfg.data.prefetch_batches, cfg.data.prefetch_batches >= 1, ">= 1"),
        ("data.shuffle_buffer", cfg.data.shuffle_buffer, cfg.data.shuffle_buffer >= 0, ">= 0 (0: off)"),
        ("optim.lr", cfg.optim.lr, cfg.optim.lr > 0, "> 0"),
    ):
        if not ok:
            raise UserError(f"{name}={value!r} is invalid; allowed: {allowed}", field=name)
    return cfg


def save_yaml(cfg: Config, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
