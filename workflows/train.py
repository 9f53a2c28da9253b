"""Train a timm model on a prepared chest X-ray dataset with Ray Train (data-parallel
TorchTrainer, Ray Data streaming), tracked in MLflow. Prints the MLflow run id.

Re-running the same command resumes an interrupted run: the Ray Train run name and the MLflow
run are derived from the configuration (override with --run-name)."""
from __future__ import annotations

import sys

from workflows.common import main_for, parse_key_values

DESCRIPTION = "Train on a prepared dataset with Ray Train; track in MLflow; print the run id."


def add_arguments(parser) -> None:
    add_common_training_arguments(parser)
    parser.add_argument("--model", help="timm model name (default resnet18)")
    parser.add_argument("--loss", help="loss name, see `ralflow losses` (default ral)")
    parser.add_argument("--loss-param", action="append", metavar="K=V", help="loss parameter (repeatable)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--run-name", help="Ray Train / MLflow run name (default: from the config)")
    parser.add_argument("--fail-at-epoch", type=int, help="fault drill: one worker exits once at this epoch")


def add_common_training_arguments(parser) -> None:
    """Flags shared by train and tune; every default is None so YAML values are not overridden."""
    parser.add_argument("--data", help="prepared dataset folder (manifest.json)")
    parser.add_argument("--config", help="YAML file overriding the typed defaults")
    parser.add_argument("--batch-size", type=int, help="per-worker batch size")
    parser.add_argument("--num-workers", type=int, help="Ray Train workers (0 = local mode)")
    parser.add_argument("--use-gpu", action="store_true", default=None)
    parser.add_argument("--cpus-per-worker", type=float)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"))
    parser.add_argument("--seed", type=int)
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<cwd>/mlflow.db)")
    parser.add_argument("--experiment", help="MLflow experiment (default ralflow)")
    parser.add_argument("--storage-path", help="Ray Train storage (default <cwd>/ralflow-runs; shared on multi-node)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else local Ray)")


def overrides_from_args(args) -> dict:
    flags = {
        ("data", "path"): getattr(args, "data", None), ("data", "image_size"): getattr(args, "image_size", None),
        ("model", "name"): getattr(args, "model", None), ("loss", "name"): getattr(args, "loss", None),
        ("train", "epochs"): getattr(args, "epochs", None), ("train", "batch_size"): getattr(args, "batch_size", None),
        ("train", "num_workers"): getattr(args, "num_workers", None), ("train", "use_gpu"): getattr(args, "use_gpu", None),
        ("train", "cpus_per_worker"): getattr(args, "cpus_per_worker", None), ("train", "amp"): getattr(args, "amp", None),
        ("train", "seed"): getattr(args, "seed", None), ("train", "fail_at_epoch"): getattr(args, "fail_at_epoch", None),
        ("optim", "lr"): getattr(args, "lr", None),
        ("tracking", "tracking_uri"): getattr(args, "tracking_uri", None), ("tracking", "experiment"): getattr(args, "experiment", None),
        ("tracking", "storage_path"): getattr(args, "storage_path", None), ("tracking", "run_name"): getattr(args, "run_name", None),
    }
    out: dict = {}
    for (section, key), value in flags.items():
        if value is not None:
            out.setdefault(section, {})[key] = value
    params = parse_key_values(getattr(args, "loss_param", None), "--loss-param")
    if params:
        out.setdefault("loss", {})["params"] = params
    return out


def run(args) -> int:
    from components.config import load_config
    from workflows.training import run_training

    cfg = load_config(args.config, overrides_from_args(args))
    result = run_training(cfg, address=args.address)
    print(f"run id: {result['run_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main_for(__name__))
