"""Search spaces: the defaults per loss (``components/search_spaces.yaml``), a user's override
file, their conversion to Ray Tune distributions, and applying a sample to a config."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import Config, merge
from ..errors import UserError

DEFAULT_SPACES = Path(__file__).resolve().parents[1] / "search_spaces.yaml"
DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "randint", "choice")


def load_search_space(loss: str, override_file: str | None = None) -> dict:
    """``{"loss.lamb": {"uniform": [1, 3]}, ...}`` for ``loss``: defaults, then the override file."""
    import yaml

    spaces = yaml.safe_load(DEFAULT_SPACES.read_text())
    space = dict(spaces.get(loss, {}))
    if override_file:
        path = Path(override_file)
        if not path.is_file():
            raise UserError(f"search_space {override_file}: file not found", field="search_space")
        data = yaml.safe_load(path.read_text()) or {}
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
                f"search space '{key}': expected one of {', '.join(DISTRIBUTIONS)} with its arguments, got {spec!r}",
                field="search_space",
            )
    return space


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
