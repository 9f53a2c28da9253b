"""``ralflow``: the one command users learn, and what every workflow driver shares (argument
parsing, error reporting, exit codes).

Each subcommand is a driver module in ``workflows/`` that is also runnable as
``python -m workflows.<name>`` with the same flags (the Ray Jobs entrypoint). A driver defines
``DESCRIPTION``, ``add_arguments(parser)`` and ``run(args) -> int`` (parse -> one library call ->
print), keeps heavy imports (torch, ray, mlflow) inside ``run`` so ``--help`` stays fast, and ends
with ``if __name__ == "__main__": sys.exit(main_for(__name__))``. Drivers import nothing from
``workflows`` but this module; this module loads them by name.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import traceback

from components.errors import UserError
from components.flags import flags_by_dest
from components.runtime import Terminated, raise_terminated, redeliver_dropped_interrupts, use_token_for_cluster

# subcommand -> module (order = order in --help)
COMMANDS = {
    "losses": "workflows.losses",
    "demo": "workflows.demo",
    "synth": "workflows.synth",
    "prepare": "workflows.prepare",
    "verify": "workflows.verify",
    "train": "workflows.train",
    "tune": "workflows.tune",
    "promote": "workflows.promote",
    "predict": "workflows.predict",
    "serve": "workflows.serve",
    "run": "workflows.run",
    "submit": "workflows.submit",
}


def build_parser(module, prog: str, parser=None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog=prog, description=module.DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    module.add_arguments(parser)
    parser.set_defaults(_flags=flags_by_dest(parser))
    return parser


def add_address_flag(parser) -> None:
    """The Ray cluster a driver joins (``ralflow submit`` takes the Jobs URL instead)."""
    parser.add_argument(
        "--address", help="Ray cluster to join: its GCS address HEAD:6379 (default: RAY_ADDRESS, else a local Ray)"
    )


def quiet_libraries() -> None:
    """Keep stderr for what the user must read: MLflow's store set-up chatter and its advice on
    pyfunc type hints are not that."""
    import logging
    import warnings

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*python_model.*CloudPickle.*")


def execute(module, args: argparse.Namespace, prog: str) -> int:
    """Run a workflow; user mistakes become a one-line message on stderr and exit code 2; Ctrl-C
    and SIGTERM end it saying so, with 130 and 143."""
    quiet_libraries()
    use_token_for_cluster(getattr(args, "address", None))
    signal.signal(signal.SIGTERM, raise_terminated)
    redeliver_dropped_interrupts()
    try:
        return int(module.run(args) or 0)
    except (UserError, FileNotFoundError, PermissionError, ValueError) as exc:  # ValueError: bad values
        print(f"{prog}: error: {one_line(exc, getattr(args, '_flags', {}))}", file=sys.stderr)
        if os.environ.get("RALFLOW_DEBUG"):
            traceback.print_exc()
        return 2
    except Terminated:
        print(f"{prog}: terminated", file=sys.stderr)
        return exit_now_if_ray(143)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return exit_now_if_ray(130)


def exit_now_if_ray(code: int) -> int:
    """After Ctrl-C or SIGTERM every run is already closed, but a Ray Train fit may still be running
    in its daemon thread; at interpreter exit Ray's shutdown races it ("the core worker has already
    been shutdown"), and the process then ends with 1 instead of ``code``. So a process connected
    to Ray exits at once with ``code``: the Ray processes it started share its fate, and a cluster
    cleans up the job's actors when its driver is gone."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def one_line(exc: BaseException, flags: dict[str, str]) -> str:
    """The error's first line, speaking of the flag where the library named the setting: a message
    that starts with the setting's name starts with its flag instead; otherwise the flag follows."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    field = getattr(exc, "field", None)
    flag = flags.get(field) if field else None
    if flag is None:
        return msg
    if msg.startswith(field):
        return flag + msg[len(field) :]
    return f"{msg} (flag {flag})"


def main_for(module_name: str, argv: list[str] | None = None) -> int:
    if module_name == "__main__":  # run as `python -m workflows.X`: use its real name
        module = sys.modules["__main__"]
        module_name = module.__spec__.name if module.__spec__ else module_name
    else:
        module = importlib.import_module(module_name)
    prog = f"python -m {module_name}"
    parser = build_parser(module, prog)
    args = parse_or_explain(parser, lambda _: parser, argv)
    return execute(module, args, prog)


def parse_or_explain(parser, subparser_of, argv):
    """``parser.parse_args(argv)``, except that arguments the workflow does not know are refused by
    the workflow's own parser (its usage, ``ralflow train: error: ...``, not the top level's), with
    the closest flag it has when one is close (``--epoch`` -> ``--epochs``)."""
    import difflib

    args, unknown = parser.parse_known_args(argv)
    if not unknown:
        return args
    own = subparser_of(args)
    flags = [o for a in own._actions for o in a.option_strings if o.startswith("--")]
    hints = []
    for arg in unknown:
        name = arg.split("=", 1)[0]
        if name.startswith("--") and (close := difflib.get_close_matches(name, flags, n=1, cutoff=0.75)):
            hints.append(f"{name} -> {close[0]}")
    hint = f" (did you mean: {', '.join(hints)}?)" if hints else ""
    own.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")


def build_cli_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ralflow",
        description="Train multi-label long-tailed chest X-ray classifiers on Ray with the "
        "Robust Asymmetric Loss; track and promote them in MLflow.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=module.DESCRIPTION.splitlines()[0],
            description=module.DESCRIPTION,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        build_parser(module, f"ralflow {name}", p)
        p.set_defaults(_module=module, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_or_explain(build_cli_parser(), lambda a: a._parser, argv)
    return execute(args._module, args, f"ralflow {args.command}")


if __name__ == "__main__":
    sys.exit(main())
