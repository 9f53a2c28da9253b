"""Write a synthetic chest X-ray dataset in the real CXR-LT 2023 format (train.csv,
development.csv and JPEGs in a MIMIC-CXR-JPG-like folder tree), deterministic given --seed."""

from __future__ import annotations

import sys
import time

from workflows.cli import main_for

DESCRIPTION = "Write a synthetic CXR-LT-2023-format dataset (CSV files + JPEG images)."


def add_arguments(parser) -> None:
    from components.data.synth import SynthOptions
    from components.flags import add_dataclass_flags

    parser.add_argument("--out", required=True, help="output folder (the dataset root)")
    add_dataclass_flags(parser, SynthOptions)


def run(args) -> int:
    from components.data.synth import SynthOptions, write_synthetic_cxr_lt
    from components.flags import dataclass_values

    t0 = time.perf_counter()
    summary = write_synthetic_cxr_lt(args.out, SynthOptions(**dataclass_values(args, SynthOptions)))
    print(
        f"synth: wrote {summary['train']} train + {summary['development']} development images "
        f"in {summary['studies']} studies ({summary['lateral_fraction']:.0%} laterals, "
        f"{summary['labels_per_study']:.2f} labels/study) to {args.out} in {time.perf_counter() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main_for(__name__))
