"""What every workflow driver shares: argument parsing, error reporting, exit codes.

A workflow module defines ``DESCRIPTION``, ``add_arguments(parser)`` and ``run(args) -> int``,
keeps heavy imports (torch, ray, mlflow) inside ``run`` so ``--help`` stays fast, and ends with
``if __name__ == "__main__": sys.exit(main_for(__name__))`` so it is a Ray Jobs entrypoint.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from components.errors import UserError


def build_parser(module, prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=module.DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    module.add_arguments(parser)
    return parser


def quiet_libraries() -> None:
    """Keep stderr for what the user must read: MLflow's store set-up chatter and its
    advice on pyfunc type hints are not that."""
    import logging
    import warnings

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*python_model.*CloudPickle.*")


def execute(module, args: argparse.Namespace, prog: str) -> int:
    """Run a workflow; user mistakes become a one-line message on stderr and exit code 2."""
    quiet_libraries()
    try:
        return int(module.run(args) or 0)
    except (UserError, FileNotFoundError, PermissionError) as exc:
        _fail(prog, exc)
    except ValueError as exc:  # bad flag values surface as ValueError from the library
        _fail(prog, exc)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 2


def _fail(prog: str, exc: BaseException) -> None:
    if os.environ.get("RALFLOW_DEBUG"):
        traceback.print_exc()
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"{prog}: error: {msg}", file=sys.stderr)


def main_for(module_name: str, argv: list[str] | None = None) -> int:
    if module_name == "__main__":  # run as `python -m workflows.X`: use its real name
        module = sys.modules["__main__"]
        module_name = module.__spec__.name if module.__spec__ else module_name
    else:
        module = importlib.import_module(module_name)
    prog = f"python -m {module_name}"
    args = build_parser(module, prog).parse_args(argv)
    return execute(module, args, prog)


def parse_key_values(items: list[str] | None, flag: str) -> dict:
    """``["k=v", ...]`` -> dict with YAML-typed values (``gamma_neg=4`` gives an int)."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} expects key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out
