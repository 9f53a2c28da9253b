"""A Ray Tune sweep on the shared cluster whose one trial crashes. A sweep killed, stopped and
resumed end to end (nested MLflow runs, no finished trial run again) is tests/test_cluster.py's."""

from __future__ import annotations

import mlflow
import pytest

pytestmark = pytest.mark.ray


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
