"""The whole pipeline on the embedded default (a local Ray started for the run, a SQLite MLflow
store in --workdir): synthetic CXR-LT data (or --source) -> prepare -> tune -> promote ->
predict. Re-running resumes where it stopped."""

from __future__ import annotations

import sys

from workflows.cli import add_address_flag, main_for

DESCRIPTION = "End to end: synth -> prepare -> tune -> promote -> predict on the embedded default."


def add_arguments(parser) -> None:
    from components.flags import add_dataclass_flags
    from components.pipeline import PipelineOptions

    add_dataclass_flags(parser, PipelineOptions)
    add_address_flag(parser)


def run(args) -> int:
    from components.flags import dataclass_values
    from components.metrics import fmt
    from components.pipeline import PipelineOptions, run_pipeline

    out = run_pipeline(PipelineOptions(**dataclass_values(args, PipelineOptions)), address=args.address)
    sweep, promoted, m, nan = out["sweep"], out["promoted"], out["best_metrics"], float("nan")
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sweep["best_params"].items())
    print("\n" + "=" * 72)
    print(f"ralflow run finished in {out['seconds']:.0f}s")
    print(
        f"  best trial   {sweep['best_trial']}  val mAP {sweep['best_val_mAP']:.4f}  "
        f"(MLflow run {sweep['best_run_id']})"
    )
    print(f"  best params  {params}")
    print(
        "  mAP by group " + "  ".join(f"{g} {fmt(m.get(f'best_val_mAP_{g}', nan))}" for g in ("head", "medium", "tail"))
    )
    print(f"  registry     {out['model_name']} v{promoted['version']} @{promoted['alias']}")
    print(f"  submission   {out['submission']}")
    print(f"  MLflow UI    mlflow ui --backend-store-uri {out['tracking_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main_for(__name__))
