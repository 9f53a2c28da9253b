"""``ralflow``: the one command users learn. Each subcommand is a workflow module that is also
runnable as ``python -m workflows.<name>`` with the same flags."""
from __future__ import annotations

import argparse
import importlib
import sys

from workflows.common import execute

# subcommand -> module (order = order in --help)
COMMANDS = {
    "losses": "workflows.losses",
    "demo": "workflows.demo",
    "synth": "workflows.synth",
    "prepare": "workflows.prepare",
    "train": "workflows.train",
    "tune": "workflows.tune",
    "promote": "workflows.promote",
    "predict": "workflows.predict",
    "run": "workflows.run",
    "submit": "workflows.submit",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ralflow",
        description="Train multi-label long-tailed chest X-ray classifiers on Ray with the "
        "Robust Asymmetric Loss; track and promote them in MLflow.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name, help=module.DESCRIPTION.splitlines()[0], description=module.DESCRIPTION,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return execute(args._module, args, f"ralflow {args.command}")


if __name__ == "__main__":
    sys.exit(main())
