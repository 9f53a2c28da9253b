"""The layout's rules: flags come from the one config schema, library errors name settings and
the CLI shows their flags, and the drivers only drive the library."""

from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from components.config import Config, TrainConfig, setting
from components.errors import UserError
from components.flags import add_config_flags, config_overrides
from workflows.cli import COMMANDS, one_line

from .conftest import ROOT

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


@dataclass
class TrainWithNewField(TrainConfig):
    mixup_alpha: float = setting(0.0, help="a field added to the schema")
    use_mixup: bool = setting(False, help="another one")


@dataclass
class ConfigWithNewField(Config):
    train: TrainWithNewField = field(default_factory=TrainWithNewField)


def parse(*argv, cfg_type=Config):
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_flags(parser, cfg_type=cfg_type)
    return parser, parser.parse_args(list(argv))


def test_a_new_config_field_gets_its_flag_without_a_flag_table():
    parser, args = parse("--mixup-alpha", "0.2", "--use-mixup", "--epochs", "3", cfg_type=ConfigWithNewField)
    assert config_overrides(args, ConfigWithNewField) == {"train": {"mixup_alpha": 0.2, "use_mixup": True, "epochs": 3}}
    help_text = parser.format_help()
    assert "--mixup-alpha X" in help_text and "a field added to the schema (default: 0.0)" in help_text
    assert "--use-mixup, --no-use-mixup" in help_text
    # without the field, no flag
    with pytest.raises(SystemExit):
        parse("--mixup-alpha", "0.5")


def test_flags_set_only_what_was_typed():
    _, args = parse()
    assert config_overrides(args) == {}  # YAML values and typed defaults stay in force
    _, args = parse(
        "--data",
        "d",
        "--model",
        "resnet10t",
        "--loss",
        "asl",
        "--loss-param",
        "gamma_neg=4",
        "--loss-param",
        "clip=0.1",
        "--lr",
        "0.01",
        "--no-hflip",
        "--amp",
        "bf16",
    )
    assert config_overrides(args) == {
        "model": {"name": "resnet10t"},
        "data": {"path": "d", "hflip": False},
        "loss": {"name": "asl", "params": {"gamma_neg": 4, "clip": 0.1}},
        "optim": {"lr": 0.01},
        "train": {"amp": "bf16"},
    }
    with pytest.raises(SystemExit):  # choices come from the schema too
        parse("--amp", "fp8")


def test_library_errors_name_the_setting_and_the_cli_shows_the_flag():
    flags = {"source": "--source", "train.amp": "--amp"}
    assert one_line(UserError("source /x: not a directory", field="source"), flags) == "--source /x: not a directory"
    err = UserError("cfg.yaml: train.amp='fp8' is invalid", field="train.amp")
    assert one_line(err, flags) == "cfg.yaml: train.amp='fp8' is invalid (flag --amp)"
    assert one_line(UserError("no flag for this", field="nope"), flags) == "no flag for this"
    assert one_line(ValueError("first line\nsecond"), flags) == "first line"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_drivers_only_drive_the_library():
    drivers = {p.stem: p for p in WORKFLOWS.glob("*.py") if p.stem not in ("__init__", "cli")}
    assert set(drivers) == {m.rpartition(".")[2] for m in COMMANDS.values()}
    for name, path in drivers.items():
        workflow_imports = {m for m in imported_modules(path) if m.startswith("workflows")}
        assert workflow_imports <= {"workflows.cli"}, (name, workflow_imports)  # no driver imports another
        assert len(path.read_text().splitlines()) <= 80, f"workflows/{name}.py holds more than parse -> call -> print"
    assert not {m for m in imported_modules(WORKFLOWS / "cli.py") if m.startswith("workflows.")}
    for path in Path(__file__).resolve().parents[1].joinpath("components").rglob("*.py"):
        assert not {m for m in imported_modules(path) if m.startswith("workflows")}, path  # the library stands alone


def test_building_the_cli_imports_no_ray_mlflow_or_torch():
    """Ray reads settings such as RAY_AUTH_MODE when it is imported: `submit` sets them first, so
    no subcommand's flags may import Ray (or MLflow) while the parser is built. Torch neither: it
    alone took 2-7 s of every `ralflow --help` and every flag mistake."""
    import subprocess
    import sys

    heavy = "{'ray', 'mlflow', 'torch', 'timm', 'sklearn'}"
    code = f"import sys, workflows.cli as c; c.build_cli_parser(); print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
