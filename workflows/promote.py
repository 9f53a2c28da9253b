"""Register a trained model and promote it: it gets the `champion` alias only if its validation
mAP beats the current champion's on the same validation data (same dataset checksum) by
--margin; otherwise `challenger`. --force --reason overrides and records why."""
from __future__ import annotations

import sys

from workflows.common import main_for

DESCRIPTION = "Register a model version; move the champion alias if it beats the current champion."


def add_arguments(parser) -> None:
    parser.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default sqlite:///<cwd>/mlflow.db)")
    parser.add_argument("--model-name", required=True, help="registered model name")
    parser.add_argument("--run-id", help="run whose model to register (default: best run by validation mAP)")
    parser.add_argument("--experiment", default="ralflow", help="where to look for the best run")
    parser.add_argument("--margin", type=float, default=0.0, help="required mAP improvement over the champion")
    parser.add_argument("--force", action="store_true", help="make it champion regardless (needs --reason)")
    parser.add_argument("--reason", help="why --force; recorded on the version")


def run(args) -> int:
    from components.config import resolve_defaults, Config
    from components.registry import promote

    uri = args.tracking_uri or resolve_defaults(Config()).tracking.tracking_uri
    out = promote(uri, args.model_name, args.run_id, args.experiment, args.margin, args.force, args.reason)
    print(f"registered {args.model_name} version {out['version']} from run {out['run_id']} (val mAP {out['val_mAP']:.4f})")
    print(f"alias: {out['alias']} ({out['reason']})")
    return 0


if __name__ == "__main__":
    sys.exit(main_for(__name__))
