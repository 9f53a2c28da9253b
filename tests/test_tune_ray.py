"""Ray Tune sweep on the shared cluster: ASHA + nested MLflow runs, then a sweep killed mid-way
resumes with --resume without re-running its finished trials."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import mlflow
import pytest

from .conftest import RALFLOW

pytestmark = pytest.mark.ray


def sweep_args(data, tmp_path, address):
    return [
        "tune",
        "--data",
        str(data),
        "--loss",
        "ral",
        "--model",
        "resnet10t",
        "--num-samples",
        "2",
        "--max-epochs",
        "2",
        "--image-size",
        "32",
        "--batch-size",
        "32",
        "--num-workers",  # one worker per trial: the pipeline test runs trials with two
        "1",
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        "--storage-path",
        str(tmp_path / "runs"),
        "--name",
        "sweep-test",
        "--address",
        address,
    ]


def trial_states(tmp_path) -> dict:
    states = {}
    for f in (tmp_path / "runs" / "sweep-test").glob("experiment_state-*.json"):
        try:
            data = json.loads(f.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        for t in data.get("trial_data", []):
            trial = json.loads(t[0]) if isinstance(t[0], str) else t[0]
            states[trial.get("trial_id")] = trial.get("status")
    return states


def test_sweep_killed_then_resumed_keeps_finished_trials(tiny_dataset, tmp_path, ray_address):
    args = sweep_args(tiny_dataset, tmp_path, ray_address)
    log = (
        tmp_path / "first-attempt.log"
    )  # a file, not a pipe: nobody drains a pipe while we wait, and a full one blocks the sweep
    with log.open("w") as out:
        proc = subprocess.Popen(
            [RALFLOW, *args], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and "TERMINATED" not in trial_states(tmp_path).values():
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(2)
    assert "TERMINATED" in trial_states(tmp_path).values(), "no trial finished in time:\n" + log.read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep dies mid-way
    proc.wait()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = mlflow.MlflowClient(uri)
    exp = c.get_experiment_by_name("ralflow").experiment_id
    done_before = {
        r.info.run_id: (r.info.end_time, len(c.get_metric_history(r.info.run_id, "val_mAP")))
        for r in c.search_runs([exp], "attributes.status = 'FINISHED' and tags.`ralflow.trial_id` != ''")
    }
    assert done_before, "a finished trial should have a FINISHED MLflow child run"

    r = subprocess.run([RALFLOW, *args, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    parent_id = re.search(r"parent run id: (\w+)", r.stdout).group(1)
    assert re.search(r"best trial: \w+ val mAP [\d.]+ run \w+", r.stdout)

    runs = c.search_runs([exp])
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent_id]
    assert len(children) == 2 and len({x.data.tags["ralflow.trial_id"] for x in children}) == 2  # nested, no duplicates
    assert [x.info.run_id for x in runs if x.info.run_id not in {parent_id, *(y.info.run_id for y in children)}] == []
    for run_id, (end_time, n_metrics) in done_before.items():  # finished trials were not run again
        run = c.get_run(run_id)
        assert run.info.end_time == end_time and len(c.get_metric_history(run_id, "val_mAP")) == n_metrics
    ends = {x.data.tags["ralflow.trial_id"]: (x.info.status, x.data.tags.get("ralflow.end_reason")) for x in children}
    assert all(status in ("FINISHED", "KILLED") for status, _ in ends.values()), (ends, r.stdout[-4000:])
    assert any(x.info.status == "FINISHED" for x in children)
    parent = c.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.params["best.trial_id"] in {
        x.data.tags["ralflow.trial_id"] for x in children
    }
    assert {a.path for a in c.list_artifacts(parent_id)} == {"search_space.yaml", "trials.csv", "trials.png"}
    best_child = c.get_run(parent.data.params["best.run_id"])
    assert best_child.data.metrics["best_val_mAP"] == pytest.approx(parent.data.metrics["best_val_mAP"], abs=1e-9)
    # the best trial's model is logged, ready for promotion
    mlflow.set_tracking_uri(uri)
    assert mlflow.pyfunc.load_model(f"runs:/{best_child.info.run_id}/model") is not None


def test_a_crashed_trial_ends_failed_and_is_not_called_stopped_early(tiny_dataset, tmp_path, ray_address):
    """A trial whose training raises (a worker dies and no restart is allowed) ends its MLflow run
    FAILED with the reason, never tagged as an ASHA stop; a sweep with no finished trial fails."""
    from components.config import load_config
    from components.errors import UserError
    from components.tune import SweepOptions, run_sweep

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(
        None,
        {
            "data": {"path": str(tiny_dataset), "image_size": 32},
            "model": {"name": "resnet10t"},
            "train": {"batch_size": 32, "num_workers": 1, "max_failures": 0, "fail_at_epoch": 0},
            "tracking": {"tracking_uri": uri, "storage_path": str(tmp_path / "runs")},
        },
    )
    with pytest.raises(UserError, match="no trial finished with a logged model"):
        run_sweep(cfg, SweepOptions(num_samples=1, max_epochs=1, name="crash"), log=lambda *_: None)
    c = mlflow.MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("ralflow").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("ralflow.sweep_parent") == "true"]
    (trial,) = [r for r in runs if "ralflow.trial_id" in r.data.tags]
    assert trial.info.status == "FAILED" and "ralflow.stopped_early" not in trial.data.tags
    assert trial.data.tags["ralflow.end_reason"].startswith(("training failed:", "trial failed:"))
    assert parent.info.status == "FAILED" and "no trial finished" in parent.data.tags["ralflow.end_reason"]
