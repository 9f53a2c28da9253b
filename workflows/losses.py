"""List the registered losses with their parameters and defaults."""

from __future__ import annotations

import json
import sys

from workflows.cli import main_for

DESCRIPTION = "List the registered losses with their parameters and defaults."


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args) -> int:
    from components.losses import describe_losses

    losses = describe_losses()
    if args.json:
        print(json.dumps(losses, indent=2, default=str))
        return 0
    for entry in losses:
        print(f"{entry['name']:<6} {entry['summary']}")
        for key, value in entry["params"].items():
            print(f"         {key} = {value!r}" if value != "<required>" else f"         {key} (required)")
    return 0


if __name__ == "__main__":
    sys.exit(main_for(__name__))
