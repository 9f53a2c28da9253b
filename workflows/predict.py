"""Batch prediction with Ray Data: a pool of actors holding the model (`models:/<name>@champion`
or any MLflow model URI) scores a prepared dataset, or a CXR-LT-format CSV + image root, and
writes the CXR-LT submission CSV (dicom_id + one probability column per class, in label order).
Several --model-uri make an ensemble, --tta adds flipped/zoomed views, --aggregate scores each
image with its study's probabilities, all in one pass; --findings writes 0/1 decisions too.
When labels are present the metrics are printed and logged. Unreadable images are reported in
<out>.rejects.csv, not fatal."""

from __future__ import annotations

import sys

from workflows.cli import add_address_flag, main_for

DESCRIPTION = "Batch inference with Ray Data using a registered model; writes the CXR-LT submission CSV."


def add_arguments(parser) -> None:
    from components.flags import add_dataclass_flags
    from components.predict import PredictOptions

    add_dataclass_flags(parser, PredictOptions)
    add_address_flag(parser)


def run(args) -> int:
    from components.flags import dataclass_values
    from components.metrics import fmt
    from components.predict import PredictOptions, predict

    out = predict(PredictOptions(**dataclass_values(args, PredictOptions)), address=args.address)
    print(f"predict: wrote {out['rows']} rows x {out['classes']} classes to {out['out']}")
    if out["findings_file"]:
        print(f"predict: wrote 0/1 findings at the model's thresholds to {out['findings_file']}")
    if out["rejects"]:
        print(f"predict: {out['rejects']} image(s) could not be read; listed in {out['rejects_file']}", file=sys.stderr)
    if out["metrics"]:
        print("predict: " + ", ".join(f"{k} {fmt(v)}" for k, v in out["metrics"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main_for(__name__))
