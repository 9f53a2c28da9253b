"""Train a timm model on a prepared chest X-ray dataset with Ray Train (data-parallel
TorchTrainer, Ray Data streaming), tracked in MLflow. Prints the MLflow run id.

Re-running the same command resumes an interrupted run: the Ray Train run name and the MLflow
run are derived from the configuration (override with --run-name). Every setting of the
training config is a flag (see components/config.py); a YAML file given with --config sets
them too, and flags override it."""

from __future__ import annotations

import sys

from workflows.cli import add_address_flag, main_for

DESCRIPTION = "Train on a prepared dataset with Ray Train; track in MLflow; print the run id."


def add_arguments(parser) -> None:
    from components.flags import add_config_flags

    add_config_flags(parser)
    add_address_flag(parser)


def run(args) -> int:
    from components.config import load_config
    from components.flags import config_overrides
    from components.train import run_training

    result = run_training(load_config(args.config, config_overrides(args)), address=args.address)
    print(f"run id: {result['run_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main_for(__name__))
