"""The ralflow command contract: help, losses listing, module entrypoints, one-line errors."""

from __future__ import annotations

import json


def test_help_lists_subcommands(cli):
    r = cli("--help")
    assert r.returncode == 0
    for sub in ("losses", "demo", "synth", "prepare"):
        assert sub in r.stdout


def test_losses_lists_every_loss_with_defaults(cli):
    r = cli("losses")
    assert r.returncode == 0, r.stderr
    assert "ral " in r.stdout and "hill_form = 'code'" in r.stdout and "class_counts (required)" in r.stdout
    listed = json.loads(cli("--json", module="workflows.losses").stdout)
    assert [e["name"] for e in listed] == ["bce", "focal", "asl", "hill", "apl", "ral", "poly1", "cb", "db"]


def test_demo_runs_and_prints_table(cli):
    r = cli("demo", "--num-train", "3000", "--num-test", "2000", "--epochs", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("loss"))
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines[header + 1 :] if line.strip()}
    assert set(rows) == {"bce", "asl", "ral"}
    assert all(0.0 < v[0] <= 1.0 for v in rows.values())  # macro mAP is a probability-like score


def test_user_mistake_is_one_line_error(cli):
    r = cli("demo", "--losses", "bce,nope")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "ralflow demo: error: unknown loss 'nope'; registered losses: bce, focal, asl, hill, apl, ral, poly1, cb, db"
    ]
    r = cli("demo", "--loss-param", "ral.lamb=0.2")
    assert r.returncode == 2 and "lamb >= 1" in r.stderr and "Traceback" not in r.stderr


def test_an_unknown_flag_is_refused_by_its_workflow_with_the_closest_flag(capsys):
    """Not the top level's usage and `ralflow: error:`: the subcommand's, naming it, and the flag
    meant when one is close; `python -m workflows.X` says the same."""
    import pytest

    from workflows.cli import main, main_for

    flags = ["--data", "x", "--ler=3", "--val-every", "0"]
    ways = {
        "ralflow train": lambda: main(["train", *flags]),
        "python -m workflows.train": lambda: main_for("workflows.train", flags),
    }
    for prog, run in ways.items():
        with pytest.raises(SystemExit) as exit_:
            run()
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[0].startswith(f"usage: {prog} ")
        assert err[-1] == f"{prog}: error: unrecognized arguments: --ler=3 --val-every 0 (did you mean: --ler -> --lr?)"
