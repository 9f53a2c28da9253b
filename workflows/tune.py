"""Tune the loss (and learning rate) with Ray Tune: Optuna TPE search, ASHA early stopping on
per-epoch validation macro mAP, one MLflow parent run per sweep with a child run per trial.
An interrupted sweep resumes with --resume (finished trials are not run again).
Prints the parent run id and the best trial."""

from __future__ import annotations

import sys

from workflows.cli import add_address_flag, main_for

DESCRIPTION = "Hyperparameter sweep over a loss with Ray Tune (Optuna + ASHA), tracked in MLflow."


def add_arguments(parser) -> None:
    from components.flags import add_config_flags, add_dataclass_flags
    from components.tune import SweepOptions

    # --max-epochs sets train.epochs; each trial names its own run.
    add_config_flags(parser, exclude=("train.epochs", "tracking.run_name"))
    add_dataclass_flags(parser, SweepOptions)
    add_address_flag(parser)


def run(args) -> int:
    from components.config import load_config
    from components.flags import config_overrides, dataclass_values
    from components.tune import SweepOptions, run_sweep

    cfg = load_config(args.config, config_overrides(args))
    out = run_sweep(cfg, SweepOptions(**dataclass_values(args, SweepOptions)), address=args.address)
    print(f"parent run id: {out['parent_run_id']}")
    print(
        f"best trial: {out['best_trial']} val mAP {out['best_val_mAP']:.4f} run {out['best_run_id']} "
        f"params {out['best_params']}"
    )
    print("  (ranked by each trial's best epoch, whose model is logged; Tune's table above shows last epochs)")
    return 0


if __name__ == "__main__":
    sys.exit(main_for(__name__))
