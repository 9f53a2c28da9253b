"""Search spaces: the defaults per loss (``components/search_spaces.yaml``), a user's override
file, their conversion to Ray Tune distributions, and applying a sample to a config."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import Config, merge, resolve_defaults
from ..errors import UserError

DEFAULT_SPACES = Path(__file__).resolve().parents[1] / "search_spaces.yaml"
DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "randint", "choice")
ARGUMENTS = {  # what each distribution takes, as the error says it
    "uniform": "[low, high] with low < high",
    "loguniform": "[low, high] with 0 < low < high",
    "quniform": "[low, high, q] with low < high",
    "randint": "[low, high) with low < high",
    "choice": "a non-empty list of values",
}


def load_search_space(loss: str, override_file: str | None = None) -> dict:
    """``{"loss.lamb": {"uniform": [1, 3]}, ...}`` for ``loss``: defaults, then the override file."""
    import yaml

    spaces = yaml.safe_load(DEFAULT_SPACES.read_text())
    space = dict(spaces.get(loss, {}))
    if override_file:
        path = Path(override_file)
        if not path.is_file():
            raise UserError(f"search_space {override_file}: file not found", field="search_space")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            raise UserError(
                f"search_space {override_file}: not valid YAML{at} ({getattr(exc, 'problem', None) or exc})",
                field="search_space",
            ) from None
        if not isinstance(data, dict):
            raise UserError(
                f"search_space {override_file}: expected a mapping of loss name -> parameters", field="search_space"
            )
        space.update(data.get(loss, {}))
    if not space:
        raise UserError(f"no search space for loss '{loss}' (add one with a search_space file)", field="search_space")
    for key, spec in space.items():
        if "." not in key:
            raise UserError(
                f"search space key '{key}': expected section.key, e.g. loss.lamb or optim.lr", field="search_space"
            )
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise UserError(
                f"search space '{key}': expected one of {', '.join(DISTRIBUTIONS)} with its arguments "
                f"(e.g. {{loguniform: [1.0e-4, 1.0e-2]}}), got {spec!r}",
                field="search_space",
            )
        ((kind, args),) = spec.items()
        if not arguments_fit(kind, args):
            raise UserError(f"search space '{key}': {kind} takes {ARGUMENTS[kind]}, got {args!r}", field="search_space")
    return space


def arguments_fit(kind: str, args) -> bool:
    if not isinstance(args, list) or not args:
        return False
    if kind == "choice":
        return True
    if len(args) != (3 if kind == "quniform" else 2):
        return False
    if not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args):
        return False
    return args[0] < args[1] and (kind != "loguniform" or args[0] > 0)


def candidates(kind: str, args: list) -> list:
    """The values that stand for a distribution when a space is checked: every choice, or both ends."""
    if kind == "choice":
        return list(args)
    return [args[0], args[1] - 1 if kind == "randint" else args[1]]  # randint's high is excluded


def check_search_space(space: dict, cfg: Config, check=lambda cfg: None) -> None:
    """Refuse a space the trials would refuse, before the sweep starts rather than in every
    trial: each of its values (``candidates``), alone, is put into a copy of ``cfg`` (an unknown
    key or a value of the wrong type fails there, named), checked against the config's declared
    choices and ranges, and handed to ``check`` (e.g. building the loss, which refuses a
    parameter it does not have)."""
    import copy

    for key, spec in space.items():
        for value in candidates(*next(iter(spec.items()))):
            probe = apply_sample(copy.deepcopy(cfg), {key: value})
            try:
                check(resolve_defaults(probe))  # declared choices and ranges
            except UserError as exc:
                raise UserError(f"search space '{key}' = {value!r}: {exc}", field="search_space") from None


def to_tune(space: dict) -> dict:
    from ray import tune

    out = {}
    for key, spec in space.items():
        ((kind, args),) = spec.items()
        out[key] = getattr(tune, kind)(args) if kind == "choice" else getattr(tune, kind)(*args)
    return out


def apply_sample(cfg: Config, sample: dict) -> Config:
    """Put sampled values into the config: ``loss.x`` -> loss params, ``section.key`` -> field."""
    nested: dict = {}
    for key, value in sample.items():
        section, _, name = key.partition(".")
        value = value.item() if isinstance(value, np.generic) else value
        if section == "loss" and name not in ("name", "params"):
            nested.setdefault("loss", {}).setdefault("params", {})[name] = value
        else:
            nested.setdefault(section, {})[name] = value
    return merge(cfg, nested, "search space")
