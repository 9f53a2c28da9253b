"""Ray Train end to end on the shared local cluster: local mode in-process, and a 2-worker run
whose worker is killed mid-training and recovers into the same MLflow run."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import mlflow
import numpy as np
import pandas as pd
import pytest

from .conftest import RALFLOW, default_sigint

pytestmark = pytest.mark.ray


def prevalence_baseline(manifest) -> float:
    """mAP of a model that predicts each class's prevalence (AP of a constant = prevalence)."""
    val = manifest.splits["val"]
    prev = [c / val.num_images for c in val.class_counts.values() if c > 0]
    return float(np.mean(prev))


def test_local_mode_train_loop(tiny_dataset, tmp_path, ray_address):
    import torch

    from components.config import load_config
    from components.models import build_model
    from components.train import run_training

    torch.save(build_model("resnet10t", 1000, in_chans=3).state_dict(), tmp_path / "imagenet-like.pt")
    cfg = load_config(
        None,
        {
            # decode_on gpu: JPEG bytes through Ray Data, decoded and augmented in the worker (on CPU here)
            "data": {"path": str(tiny_dataset), "image_size": 32, "decode_on": "gpu"},
            "model": {"name": "resnet10t", "pretrained_path": str(tmp_path / "imagenet-like.pt")},
            "loss": {"name": "ral"},
            "train": {"epochs": 1, "batch_size": 32, "num_workers": 0, "ema": True},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "storage_path": str(tmp_path / "runs")},
        },
    )
    said = []
    out = run_training(cfg, log=said.append)
    c = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    run = c.get_run(out["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["loss.name"] == "ral"
    # the pretrained start is reported and logged (the default CSRA head's 4 tensors start fresh);
    # EMA weights were scored beside the raw ones
    assert any("1 adapted (input stem), 4 new, 2 unused" in line for line in said)
    assert (run.data.params["pretrained.adapted"], run.data.params["pretrained.new"]) == ("1", "4")
    assert {"val_mAP_raw", "val_mAP_ema", "ema_selected"} <= set(run.data.metrics)
    assert run.data.tags["ralflow.weights"] in ("raw", "ema")
    assert [m.step for m in c.get_metric_history(out["run_id"], "val_mAP")] == [1]  # epochs count from 1
    assert [m.value for m in c.get_metric_history(out["run_id"], "epoch")] == [1] and out["best_epoch"] == 1
    assert 0 < out["best_val_mAP"] <= 1
    assert "data_wait_upstream_frac" not in run.data.metrics  # local mode's iterator keeps no such figure
    # Re-running the finished run resumes past its last epoch: nothing retrained, same result.
    again = run_training(cfg, log=lambda *_: None)
    assert again["run_id"] == out["run_id"] and again["best_val_mAP"] == out["best_val_mAP"]
    assert [m.step for m in c.get_metric_history(out["run_id"], "val_mAP")] == [1]
    from components.tracking import TrackedRun

    assert TrackedRun(cfg.tracking.tracking_uri, out["run_id"]).restarts() == [1]


def test_two_workers_recover_from_a_killed_worker_into_the_same_run(tiny_dataset, tmp_path, cli, ray_address):
    from components.data.ingest import build_ray_dataset
    from components.data.manifest import Manifest
    from components.metrics import multilabel_metrics

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage = tmp_path / "runs"
    r = cli(
        "train",
        "--data",
        str(tiny_dataset),
        "--model",
        "resnet10t",
        "--loss",
        "ral",
        "--epochs",
        "4",
        "--batch-size",
        "32",
        "--num-workers",
        "2",
        "--cpus-per-worker",
        "0.5",
        "--lr",
        "0.003",
        "--image-size",
        "40",
        "--tracking-uri",
        uri,
        "--storage-path",
        str(storage),
        "--run-name",
        "drill",
        "--fail-at-epoch",
        "1",
        "--address",
        ray_address,
        cwd=tmp_path,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_id = re.search(r"run id: (\w+)", r.stdout).group(1)
    assert (storage / "drill" / ".fault-drill-done").read_text().startswith("worker 1 exited at epoch 1")
    # The driver reports the restart from the run's durable record (worker stdout may drop lines).
    assert "this MLflow run resumed 1x, from the checkpoints of epochs 1 " in r.stdout
    out = r.stdout + r.stderr
    assert "Reporting training result" not in out  # Ray Train's per-report dump is quieted
    for epoch in range(1, 5):  # worker lines are not doubled by Train's print patch (some may be dropped)
        assert out.count(f"[train] epoch {epoch}/4 loss") <= 1, out[-4000:]

    # The first epoch's decode tasks ran in the processes the driver prestarted (torch imported
    # while Ray Train started its workers): Ray pools them by job and runtime environment.
    from ray.util.state import list_tasks

    def tasks(name):
        return list_tasks(filters=[("name", "=", name)], detail=True, limit=10_000, raise_on_missing_output=False)

    prestarted = {(t.job_id, t.worker_pid) for t in tasks("import_decode_modules")}
    decoded = {(t.job_id, t.worker_pid) for t in tasks("MapBatches(read_row_group)->MapBatches(decode_batch)")}
    assert prestarted & decoded, (prestarted, decoded)

    c = mlflow.MlflowClient(uri)
    from components.tracking import TrackedRun

    assert TrackedRun(uri, run_id).restarts() == [1]
    runs = c.search_runs([c.get_experiment_by_name("ralflow").experiment_id])
    assert [x.info.run_id for x in runs] == [run_id]  # one run, never a second
    assert sorted(m.step for m in c.get_metric_history(run_id, "val_mAP")) == [1, 2, 3, 4]  # no duplicated epoch
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    manifest = Manifest.load(tiny_dataset)
    n_val = manifest.splits["val"].num_images
    assert n_val % 2 == 1  # odd: an equal 2-way split would drop one
    assert [m.value for m in c.get_metric_history(run_id, "val_images")] == [n_val] * 4
    # each epoch, the share of training the batch thread waited for Ray Data's tasks
    assert all(0 <= m.value <= 1 for m in c.get_metric_history(run_id, "data_wait_upstream_frac"))
    assert len(c.get_metric_history(run_id, "data_wait_upstream_frac")) == 4
    best = run.data.metrics["best_val_mAP"]
    assert best > prevalence_baseline(manifest) + 0.05, (best, prevalence_baseline(manifest))
    # checkpoints kept in storage: the best two (keep_checkpoints) and the latest, none that Ray
    # left unregistered
    best_two = sorted(c.get_metric_history(run_id, "val_mAP"), key=lambda m: -m.value)[:2]
    assert {p.name for p in (storage / "drill").glob("epoch-*")} == {f"epoch-{m.step - 1:04d}" for m in best_two} | {
        "epoch-0003"
    }

    # The logged model, loaded here (a process that did not train), reproduces the logged metric
    # computed from 2 workers' gathered predictions: the metric does not depend on worker count.
    # It takes raw uint8 pixels: resizing and normalising are its own job.
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert model.metadata.metadata["label_names"] == manifest.label_names
    # fitted on the best epoch's validation predictions, stored with the model (issue 13)
    assert model.metadata.metadata["calibration"] == "temperature"
    assert list(model.metadata.metadata["thresholds"]) == manifest.label_names
    assert "best_val_mAP_study" in run.data.metrics
    probs, targets = [], []
    for batch in build_ray_dataset(manifest, "val", 40, None).iter_batches(batch_size=64):
        probs.append(model.predict(pd.DataFrame({"image": list(batch["image"])})))
        targets.append(batch["labels"])
    probs, targets = np.concatenate(probs), np.concatenate(targets)
    assert probs.shape == (n_val, 26) and ((probs >= 0) & (probs <= 1)).all()
    assert multilabel_metrics(probs, targets)["mAP"] == pytest.approx(best, abs=1e-5)
    arts = {a.path for a in c.list_artifacts(run_id, "evaluation")}
    assert arts == {"evaluation/per_class_ap.csv", "evaluation/per_class_ap.png"}
    card = open(c.download_artifacts(run_id, "model_card.md", str(tmp_path))).read()  # also in the model
    assert manifest.dataset_sha256 in card and "## Intended use and limits" in card
    assert f"| {manifest.label_names[0]} | " in card and f"best epoch {run.data.metrics['best_epoch']:.0f}" in card
    assert (
        json.loads(open(c.download_artifacts(run_id, "dataset/manifest.json", str(tmp_path))).read())["dataset_sha256"]
        == manifest.dataset_sha256
    )


@pytest.mark.parametrize(
    "sig,code,word,reason,mid_training",
    [
        (signal.SIGTERM, 143, "terminated", "terminated (SIGTERM)", True),
        (signal.SIGINT, 130, "interrupted", "interrupted", False),
    ],
    ids=["SIGTERM-mid-training", "SIGINT-while-starting"],
)
def test_a_signal_ends_the_run_killed_saying_so(
    tiny_dataset, tmp_path, ray_address, sig, code, word, reason, mid_training
):
    """SIGTERM (ray job stop, a scheduler) after an epoch, and Ctrl-C as soon as the run exists
    (before any epoch: a user who sees a wrong flag), end training with the run KILLED and why,
    and the command says so with the conventional exit code."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [
        "train",
        "--data",
        str(tiny_dataset),
        "--model",
        "resnet10t",
        "--epochs",
        "30",
        "--batch-size",
        "32",
        "--num-workers",
        "1",
        "--image-size",
        "32",
        "--tracking-uri",
        uri,
        "--storage-path",
        str(tmp_path / "runs"),
        "--address",
        ray_address,
    ]
    with open(tmp_path / "out.log", "w") as out:
        proc = subprocess.Popen([RALFLOW, *args], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=default_sigint)  # fmt: skip
    c, deadline, run_id = mlflow.MlflowClient(uri), time.monotonic() + 300, None
    while time.monotonic() < deadline and proc.poll() is None:  # until the run exists, or its first epoch is logged
        time.sleep(2 if mid_training else 0.5)
        try:
            runs = c.search_runs([c.get_experiment_by_name("ralflow").experiment_id])
        except Exception:  # the store is still being created
            continue
        if runs and (not mid_training or c.get_metric_history(runs[0].info.run_id, "val_mAP")):
            run_id = runs[0].info.run_id
            break
    assert run_id, (tmp_path / "out.log").read_text()[-3000:]
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == code, (tmp_path / "out.log").read_text()[-3000:]
    assert f"ralflow train: {word}" in (tmp_path / "out.log").read_text()
    run = c.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["ralflow.end_reason"] == reason


def test_a_run_too_big_for_the_embedded_ray_is_refused_before_it_starts(tiny_dataset, tmp_path, cli):
    r = cli(
        "train",
        "--data",
        str(tiny_dataset),
        "--num-workers",
        "1",
        "--cpus-per-worker",
        "64",
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        cwd=tmp_path,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "on this machine; lower them" in r.stderr.strip().splitlines()[-1]
    assert "(flag --cpus-per-worker)" in r.stderr
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run was opened


def test_same_seed_same_metrics_then_a_crt_stage_from_the_run(tiny_dataset, tmp_path, ray_address):
    """Seeded runs (row-group order, re-sampling, augmentation draws) log the same metrics; a cRT
    stage starts from the first run's logged model, linked to it, and its model (CSRA head, logit
    adjustment) loads and predicts."""
    from components.config import load_config
    from components.train import run_training

    def config(name, sampling="repeat-factor", **train):
        return load_config(
            None,
            {
                "data": {"path": str(tiny_dataset), "image_size": 32, "sampling": sampling},
                "model": {"name": "resnet10t", "head": "csra"},
                "train": {"epochs": 2, "batch_size": 32, "num_workers": 0, "seed": 3, **train},
                "tracking": {
                    "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                    "storage_path": str(tmp_path / "runs"),
                    "run_name": name,
                },
            },
        )

    said = []
    first = run_training(config("first"), log=said.append)
    second = run_training(config("second"), log=lambda *_: None)
    c = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")

    def history(run_id, key):
        return [m.value for m in c.get_metric_history(run_id, key)]

    for key in ("train_loss", "val_mAP", "sampled_pos_rate_tail"):
        assert history(first["run_id"], key) == pytest.approx(history(second["run_id"], key), rel=1e-6), key
    assert any("repeat-factor sampling: about" in line for line in said)
    tail = history(first["run_id"], "sampled_pos_rate_tail")
    assert len(tail) == 2 and tail[0] != tail[1]  # each epoch draws its copies afresh
    freq = {k for k in c.get_run(first["run_id"]).data.metrics if k.startswith("sampled_freq/")}
    assert len(freq) == len(json.loads((tiny_dataset / "manifest.json").read_text())["label_names"])

    said.clear()
    stage = config("crt", sampling=None, init_from=first["run_id"], head_only=True, logit_adjust=True)
    crt = run_training(stage, log=said.append)
    run = c.get_run(crt["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == first["run_id"] and run.data.tags["ralflow.stage"] == "crt"
    assert run.data.params["data.sampling"] == "class-aware"  # the stage's default
    assert any(line.startswith("[train] logit adjustment: tau") for line in said)
    info = mlflow.models.get_model_info(f"runs:/{crt['run_id']}/model")
    assert "logit_adjust_tau" in info.metadata
    model = mlflow.pyfunc.load_model(f"runs:/{crt['run_id']}/model")
    probs = model.predict(pd.DataFrame({"image": [np.full((50, 50), 90, np.uint8)]}))
    assert np.asarray(probs).shape == (1, len(info.metadata["label_names"]))
    from components.data.manifest import Manifest
    from components.errors import UserError
    from components.train.stages import load_init_weights

    wrong = config("wrong-head", init_from=first["run_id"])
    wrong.model.head = "linear"
    with pytest.raises(UserError, match="its model is resnet10t with a csra head"):
        load_init_weights(wrong, Manifest.load(tiny_dataset))
    wrong.train.init_from = "0" * 32
    with pytest.raises(UserError, match="no logged ralflow model there"):
        load_init_weights(wrong, Manifest.load(tiny_dataset))
