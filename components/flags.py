"""Command-line flags generated from dataclass fields, so a setting is declared once.

A field's flag is ``--field-name`` unless its metadata names another (``setting(flag=...)`` in
``components.config``); its help and allowed values come from the metadata too. Flags default to
"not given" (``argparse.SUPPRESS``), so only what the user typed overrides the YAML file and
the typed defaults. Booleans get ``--x/--no-x``; a ``dict`` field takes repeatable ``K=V``; a
``list`` field is a repeatable flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from .config import Config, field_type, sections


def key_value(text: str) -> tuple[str, object]:
    """``"gamma_neg=4"`` -> ``("gamma_neg", 4)``: the value typed as YAML reads it."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected K=V, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not valid YAML") from None


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_dataclass_flags(parser, dc_type: type, dest_prefix: str = "", exclude=()) -> None:
    """One flag per field of ``dc_type`` (skipping ``exclude``, given as destinations). The
    destination is ``dest_prefix + field name``; a field without a default is a required flag."""
    for f in dataclasses.fields(dc_type):
        dest = dest_prefix + f.name
        if dest in exclude:
            continue
        t, _ = field_type(dc_type, f.name)
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        help_text = f.metadata.get("help", "")
        if has_default and f.default is not dataclasses.MISSING and f.default not in (None, ""):
            help_text += f" (default: {f.default})"
        kwargs = {"dest": dest, "help": help_text, "default": argparse.SUPPRESS}
        if t is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif t is dict:
            kwargs.update(action="append", type=key_value, metavar="K=V")
        elif typing.get_origin(t) is list:  # a repeatable flag
            item = typing.get_args(t)[0]
            kwargs.update(action="append", type=item, metavar={int: "N", float: "X"}.get(item, "TEXT"))
        else:
            kwargs["type"] = t
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            else:
                kwargs["metavar"] = {int: "N", float: "X", str: "TEXT"}.get(t, "VALUE")
        if not has_default:
            kwargs["required"] = True
        parser.add_argument(flag_name(f), **kwargs)


def dataclass_values(args: argparse.Namespace, dc_type: type, dest_prefix: str = "") -> dict:
    """The fields of ``dc_type`` given on the command line (``K=V`` lists become dicts)."""
    out = {}
    for f in dataclasses.fields(dc_type):
        if hasattr(args, dest_prefix + f.name):
            value = getattr(args, dest_prefix + f.name)
            out[f.name] = dict(value) if field_type(dc_type, f.name)[0] is dict else value
    return out


def add_config_flags(parser, exclude=(), cfg_type: type = Config) -> None:
    """``--config FILE.yaml`` plus a flag for every field of the training config; ``exclude``
    holds ``section.key`` names a workflow sets itself."""
    parser.add_argument(
        "--config",
        help="YAML file, or a packaged recipe's name (e.g. cxr-lt-2023-gpu), overriding the typed defaults "
        "(flags override it)",
    )
    for section, section_type in sections(cfg_type).items():
        add_dataclass_flags(parser, section_type, f"{section}.", exclude)


def config_overrides(args: argparse.Namespace, cfg_type: type = Config) -> dict:
    """The nested ``{section: {key: value}}`` of what the flags set (for ``load_config``)."""
    out = {}
    for section, section_type in sections(cfg_type).items():
        if values := dataclass_values(args, section_type, f"{section}."):
            out[section] = values
    return out


def flags_by_dest(parser) -> dict[str, str]:
    """Destination (a config field or parameter name) -> its flag, for error messages."""
    return {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
