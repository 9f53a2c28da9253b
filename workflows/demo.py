"""Loss demo: train a linear multi-label classifier on random long-tailed data with several
losses under the same budget and print a comparison table (macro and head/medium/tail mAP).
It runs on CPU in seconds and shows how the losses treat the long tail."""

from __future__ import annotations

import sys

from workflows.cli import main_for

DESCRIPTION = "Loss demo: a linear multi-label classifier on random long-tailed data, losses compared."


def add_arguments(parser) -> None:
    from components.flags import add_dataclass_flags
    from components.losses.demo import DemoOptions

    add_dataclass_flags(parser, DemoOptions)


def run(args) -> int:
    from components.flags import dataclass_values
    from components.losses.demo import DemoOptions, compare_losses

    rows = compare_losses(DemoOptions(**dataclass_values(args, DemoOptions)))
    columns = ("mAP", "mAP_head", "mAP_medium", "mAP_tail", "AUROC")
    print()
    print(f"{'loss':<8}{'mAP':>8}{'head':>8}{'medium':>8}{'tail':>8}{'AUROC':>8}{'time s':>8}")
    for row in rows:
        print(f"{row['loss']:<8}" + "".join(f"{row[c]:>8.4f}" for c in columns) + f"{row['seconds']:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main_for(__name__))
