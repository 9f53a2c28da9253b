"""Promotion gate: first version champion, worse candidate challenger, --force records its
reason, a candidate validated on another dataset is refused, lineage tags on every version."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from components import tracking
from components.errors import UserError
from components.promote import PromoteOptions
from components.promote import promote as promote_options

LABELS = [f"c{i}" for i in range(3)]


def promote(uri, model_name, **kwargs):
    import tempfile

    # As in a fresh process: MLflow's process-wide tracking URI is not this store (logging the
    # models above set it); promote must work from its own settings alone.
    mlflow.set_tracking_uri(f"file:{tempfile.mkdtemp(prefix='ralflow-elsewhere-')}")
    return promote_options(PromoteOptions(model_name, tracking_uri=uri, **kwargs))


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, "ralflow", uri)
    state = {}

    def make_run(val_map: float, sha: str = "a" * 64, loss: str = "ral") -> str:
        from components.models import build_model

        run = c.create_run(
            exp,
            tags={
                "ralflow.dataset_sha256": sha,
                "ralflow.loss": loss,
                "ralflow.model": "test_resnet",
                "ralflow.git_commit": "abc123",
                tracking.RUN_KEY_TAG: f"r{len(state)}",
            },
        )
        rid = run.info.run_id
        c.log_param(rid, "loss.params.lamb", "2.0")
        for k, v in {
            "best_val_mAP": val_map,
            "best_val_mAP_head": 0.9,
            "best_val_mAP_medium": 0.5,
            "best_val_mAP_tail": 0.1,
        }.items():
            c.log_metric(rid, k, v)
        if "weights" not in state:
            state["weights"] = build_model("test_resnet", len(LABELS), 1).state_dict()
        tracking.TrackedRun(uri, rid).log_model(state["weights"], "test_resnet", 1, 16, LABELS)
        c.set_terminated(rid, "FINISHED")
        state[rid] = val_map
        return rid

    return uri, c, make_run


def test_promotion_gate_cases(store):
    uri, c, make_run = store
    first = make_run(0.40)
    out = promote(uri, "cxr", experiment="ralflow")
    assert (out["version"], out["alias"], out["run_id"]) == (1, "champion", first)
    assert "first version" in out["reason"]

    out = promote(uri, "cxr", run_id=first)  # the same run again: says which version it is
    assert (out["version"], out["alias"], out["already"]) == (1, "champion", True) and "already version 1" in out[
        "reason"
    ]

    worse = make_run(0.38)
    out = promote(uri, "cxr", run_id=worse)
    assert (out["version"], out["alias"]) == (2, "challenger") and "0.3800 does not beat champion v1 0.4000" in out[
        "reason"
    ]
    tie = make_run(0.40)
    out = promote(uri, "cxr", run_id=tie)  # a tie is not an improvement
    assert (out["version"], out["alias"]) == (3, "challenger")
    assert int(c.get_model_version_by_alias("cxr", "champion").version) == 1

    better = make_run(0.41)
    out = promote(uri, "cxr", run_id=better, margin=0.02)  # better, but not by the margin
    assert (out["version"], out["alias"]) == (4, "challenger")
    out = promote(uri, "cxr", run_id=better, margin=0.005)  # decided again, for the same version
    assert (out["version"], out["alias"], out["already"]) == (4, "champion", True)
    assert len(c.search_model_versions("name = 'cxr'")) == 4  # no run registered twice

    with pytest.raises(UserError, match="force needs a reason"):
        promote(uri, "cxr", run_id=worse, force=True)
    out = promote(uri, "cxr", run_id=worse, force=True, reason="rollback: v4 fails on portable films")
    v = c.get_model_version("cxr", str(out["version"]))
    assert (out["version"], out["alias"]) == (2, "champion")  # the run's version, not a new one
    assert v.tags["promotion.forced_reason"] == "rollback: v4 fails on portable films"

    other = make_run(0.9, sha="b" * 64)
    with pytest.raises(UserError, match="refused: the candidate was validated on dataset bbbbbbbbbbbb"):
        promote(uri, "cxr", run_id=other)
    assert int(c.get_model_version_by_alias("cxr", "champion").version) == out["version"]  # unchanged

    tags = c.get_model_version("cxr", "1").tags
    assert tags["dataset_sha256"] == "a" * 64 and tags["loss"] == "ral" and tags["source_run_id"] == first
    assert tags["loss_params"] == '{"lamb": "2.0"}' and tags["val_mAP"] == "0.400000" and tags["git_commit"] == "abc123"
    assert tags["val_mAP_tail"] == "0.100000" and tags["promotion.decision"] == "champion"

    # the champion loads by alias in this process, as predict does in a fresh one, and takes raw
    # uint8 pixels of any size (it resizes and normalises them itself)
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/cxr@champion")
    images = [np.zeros((1, 16, 16), "uint8"), np.zeros((40, 64), "uint8")]
    assert model.predict(pd.DataFrame({"image": images})).shape == (2, 3)


def test_promote_cli_errors_are_one_line(cli, tmp_path):
    r = cli("promote", "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--model-name", "x", cwd=tmp_path)
    assert (
        r.returncode == 2
        and r.stderr.strip() == "ralflow promote: error: no MLflow experiment 'ralflow' at this tracking URI"
    )
    r = cli("promote", "--tracking-uri", "http://127.0.0.1:9", "--model-name", "x", cwd=tmp_path)
    assert r.returncode == 2 and "cannot reach the MLflow tracking server" in r.stderr


def test_a_client_reads_its_own_stores_registry_whatever_the_process_set_before(tmp_path, monkeypatch):
    """Loading a model sets MLflow's process-wide registry URI (and exports MLFLOW_REGISTRY_URI):
    a client for another store must still read that store's registry."""
    from mlflow.tracking._model_registry import utils as registry_utils

    here, elsewhere = f"sqlite:///{tmp_path}/here.db", f"sqlite:///{tmp_path}/elsewhere.db"
    tracking.client(here).create_registered_model("only-here")
    monkeypatch.setattr(registry_utils, "_registry_uri", elsewhere)  # what mlflow.set_registry_uri leaves
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", elsewhere)
    assert tracking.client(here).get_registered_model("only-here").name == "only-here"
