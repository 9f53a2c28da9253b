"""Everything ralflow writes to MLflow goes through this module.

``TrackedRun`` owns one MLflow run (its id and every write: params, per-epoch metrics, restart
markers, artifacts, the model, the final status and its reason); ``ModelRegistry`` owns the
registry writes (versions and aliases). Train, each Tune trial, the sweep's parent run, predict
and promote use them. A ``TrackedRun`` is picklable: Ray Train workers get it with their job and
open their own client.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from .errors import UserError

RUN_KEY_TAG = "ralflow.run_name"
RESTART_METRIC = "restart_from_epoch"
END_REASON_TAG = "ralflow.end_reason"
# A resumed run's last end ("KILLED: interrupted"): the end reason describes how the run ended,
# which no longer holds once it runs again.
RESUMED_AFTER_TAG = "ralflow.resumed_after"
# The process driving a run (host, pid, its start time, and a heartbeat): a second `train` of the
# same run name, or `tune --resume` of a sweep still going, must not take over a run that lives.
DRIVER_TAG = "ralflow.driver"
HEARTBEAT_S = 30.0
DRIVER_GONE_S = 3 * HEARTBEAT_S  # a driver on another host silent this long is gone (crashed, node lost)

# MLflow draws a progress bar for every artifact it downloads, a dozen small ones at the end of each
# run: noise between the lines people read. Set the variable to true to have them back.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def sqlite_folder(tracking_uri: str) -> Path | None:
    """The folder holding a ``sqlite:///`` store's database, or None for any other store."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///") :]).parent


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, when the tracking store cannot be used."""
    field = "tracking.tracking_uri"
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                if r.status != 200:
                    raise UserError(f"MLflow tracking server at {uri} answered {r.status} on /health", field=field)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(
                f"cannot reach the MLflow tracking server at {uri} ({reason}); start it or fix {field}", field=field
            ) from None
    elif (parent := sqlite_folder(uri)) is not None:
        if not parent.is_dir():
            raise UserError(f"{field} {uri}: folder {parent} does not exist", field=field)
    elif uri.startswith(("file:", "databricks", "postgresql", "mysql", "mssql")) or "://" not in uri:
        return
    else:
        raise UserError(
            f"{field} {uri}: unsupported scheme (use http(s)://, sqlite:///, postgresql:// or a path)", field=field
        )


def client(uri: str):
    """An MLflow client for reading (runs, metric histories, model versions) of the store at
    ``uri``, registry included: MLflow would otherwise take the registry from whatever this
    process set last (``mlflow.set_registry_uri``, which loading a model does, and which it also
    exports as MLFLOW_REGISTRY_URI to every process started afterwards)."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store, in ``mlruns/`` (MLflow's
    default is ``./mlruns`` under whichever folder the command happened to run in). None: the
    store's own default (a server's ``--default-artifact-root``, a file store's folder)."""
    folder = sqlite_folder(tracking_uri)
    if folder is None:
        return None
    return str(folder.resolve() / "mlruns" / re.sub(r"[^A-Za-z0-9._-]+", "_", experiment))


def experiment_id(c, name: str, tracking_uri: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return c.create_experiment(name, artifact_location=artifact_location(tracking_uri, name))
    if exp.lifecycle_stage == "deleted":
        raise UserError(
            f"tracking.experiment: MLflow experiment '{name}' is deleted; restore it or use another",
            field="tracking.experiment",
        )
    return exp.experiment_id


def runs_named(c, exp_id: str, run_name: str) -> list:
    """The newest run carrying ``run_name`` (ralflow's stable run key), as a list of at most one."""
    return c.search_runs(
        [exp_id],
        filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_name}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )


def logged_models(c, exp_id: str, run_id: str) -> list:
    """The models logged by ``run_id``."""
    return c.search_logged_models(experiment_ids=[exp_id], filter_string=f"source_run_id = '{run_id}'")


def _finite_metrics(metrics: dict, step: int) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    ]


def process_started(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), or None when there is no
    such process here: with the pid, it names a process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def this_process() -> dict:
    import socket

    return {"host": socket.gethostname(), "pid": os.getpid(), "started": process_started(os.getpid())}


def refuse_if_driven(run_name: str, run_id: str, lease_json: str) -> None:
    """A RUNNING run whose driver lives (a process on this host that is still there, or one on
    another host heard from within DRIVER_GONE_S) is not taken over; this process's own run is."""
    import json

    try:
        lease = json.loads(lease_json)
    except ValueError:
        return
    me, pid = this_process(), lease.get("pid", -1)
    if lease.get("host") == me["host"] and lease.get("started") is not None:  # the process itself can be seen
        if pid == me["pid"] or process_started(pid) != lease["started"]:
            return  # this process's own run, or its driver is gone
        since = f"pid {pid} on this host"
    else:  # another host (or no /proc here): the heartbeat tells
        age = time.time() - float(lease.get("beat", 0))
        if age >= DRIVER_GONE_S or (lease.get("host"), pid) == (me["host"], me["pid"]):
            return
        since = (
            f"pid {pid} on {lease.get('host')}, heard from {age:.0f} s ago; a driver silent for "
            f"{DRIVER_GONE_S:.0f} s is taken as gone"
        )
    raise UserError(
        f"tracking.run_name {run_name}: MLflow run {run_id} is being trained right now ({since}); wait for it, "
        "stop it, or give another run_name",
        field="tracking.run_name",
    )


class TrackedRun:
    """One MLflow run and every write to it."""

    def __init__(self, tracking_uri: str, run_id: str, resumed: bool = False) -> None:
        self.tracking_uri, self.run_id, self.resumed = tracking_uri, run_id, resumed
        self._client = None
        self._heartbeat = None  # set while this process holds the run (see hold)
        self.ended: str | None = None  # the status this process ended it with

    def __getstate__(self) -> dict:  # the client holds connections: each process opens its own
        return {**self.__dict__, "_client": None, "_heartbeat": None}

    @property
    def client(self):
        if self._client is None:
            self._client = client(self.tracking_uri)
        return self._client

    @classmethod
    def open(
        cls, tracking_uri: str, experiment: str, run_name: str, tags: dict | None = None, identity: dict | None = None
    ) -> TrackedRun:
        """The run carrying ``run_name`` (resumed, status back to RUNNING, its last end reason kept
        as ``ralflow.resumed_after``), else a new one. A run to resume must carry the same
        ``identity`` tags where it has them (else nothing is touched)."""
        c = client(tracking_uri)
        found = runs_named(c, experiment_id(c, experiment, tracking_uri), run_name)
        if found:
            run_id = found[0].info.run_id
            for key, value in (identity or {}).items():
                before = found[0].data.tags.get(key)
                if before is not None and before != str(value):
                    raise UserError(
                        f"tracking.run_name {run_name}: MLflow run {run_id} has {key}={before}, not {value}; "
                        "resume it with the same dataset and storage_path, or give another run_name",
                        field="tracking.run_name",
                    )
            if found[0].info.status == "RUNNING" and (lease := found[0].data.tags.get(DRIVER_TAG)):
                refuse_if_driven(run_name, run_id, lease)
            if found[0].info.status != "RUNNING":
                if reason := found[0].data.tags.get(END_REASON_TAG):
                    c.set_tag(run_id, RESUMED_AFTER_TAG, f"{found[0].info.status}: {reason}")
                    c.delete_tag(run_id, END_REASON_TAG)
                c.update_run(run_id, status="RUNNING")
            return cls(tracking_uri, run_id, resumed=True)
        return cls.create(tracking_uri, experiment, run_name, tags)

    @classmethod
    def find(cls, tracking_uri: str, experiment: str, run_name: str) -> TrackedRun | None:
        """The run carrying ``run_name``, untouched, or None."""
        c = client(tracking_uri)
        exp = c.get_experiment_by_name(experiment)
        found = exp and runs_named(c, exp.experiment_id, run_name)
        return cls(tracking_uri, found[0].info.run_id, resumed=True) if found else None

    @classmethod
    def create(cls, tracking_uri: str, experiment: str, run_name: str, tags: dict | None = None) -> TrackedRun:
        """Always a new run."""
        c = client(tracking_uri)
        run = c.create_run(
            experiment_id(c, experiment, tracking_uri), run_name=run_name, tags={RUN_KEY_TAG: run_name, **(tags or {})}
        )
        return cls(tracking_uri, run.info.run_id)

    def get(self):
        """The run as MLflow has it now (info, params, metrics, tags)."""
        return self.client.get_run(self.run_id)

    def log_params(self, params: dict) -> None:
        """Params as strings capped to MLflow's limit. Params already logged (a resumed run) are
        skipped: MLflow refuses to change a logged param."""
        from mlflow.entities import Param

        existing = self.get().data.params
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        """Finite scalar metrics at ``step`` (others are left out)."""
        if batch := _finite_metrics(metrics, step):
            self.client.log_batch(self.run_id, metrics=batch)

    def log_epoch(self, metrics: dict, epoch: int) -> None:
        """Per-epoch metrics at step=epoch; an epoch already logged is not logged again (a
        restored run may report the same epoch twice)."""
        if epoch not in {m.step for m in self.client.get_metric_history(self.run_id, "val_mAP")}:
            self.log_metrics(metrics, epoch)

    def log_restart(self, epoch: int) -> None:
        """Record that training restarted from the checkpoint of ``epoch`` (one value per restart)."""
        self.log_metrics({RESTART_METRIC: epoch}, epoch)

    def restarts(self) -> list[int]:
        """The epochs this run restarted from, in the order the restarts happened."""
        history = sorted(self.client.get_metric_history(self.run_id, RESTART_METRIC), key=lambda m: m.timestamp)
        return [int(m.value) for m in history]

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_files(self, files: dict[str, str | bytes], artifact_path: str | None = None) -> None:
        """Artifacts from memory: file name -> text or bytes."""
        with tempfile.TemporaryDirectory() as tmp:
            for name, content in files.items():
                p = Path(tmp) / name
                p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
                self.log_file(p, artifact_path)

    def has_model(self) -> bool:
        return bool(logged_models(self.client, self.get().info.experiment_id, self.run_id))

    def log_model(
        self,
        state_dict,
        model_name: str,
        in_chans: int,
        image_size: int,
        label_names,
        card: str | None = None,
        calibration: dict | None = None,
        thresholds: dict | None = None,
        head: str = "linear",
        head_lambda: float = 0.1,
    ) -> None:
        """The trained network as the registered-model pyfunc: a model from code
        (``components/models/pyfunc.py``) with the ``components`` package beside it, pinned pip
        requirements, its signature, a PNG input example, ralflow's metadata, the model card, and
        the calibration and per-class thresholds fitted on validation (``calibration.json``)."""
        import io
        import json
        import shutil

        import mlflow
        import numpy as np
        import pandas as pd
        import torch
        from PIL import Image

        from .models import pyfunc

        mlflow.set_tracking_uri(self.tracking_uri)
        with tempfile.TemporaryDirectory() as tmp:
            weights, spec = Path(tmp) / "weights.pt", Path(tmp) / "spec.json"
            torch.save(state_dict, weights)
            meta = {
                "model": model_name,
                "in_chans": in_chans,
                "image_size": image_size,
                "label_names": list(label_names),
                "head": head,
                "head_lambda": head_lambda,
            }
            spec.write_text(json.dumps(meta))
            artifacts = {"weights": str(weights), "spec": str(spec)}
            if calibration or thresholds:
                decision = Path(tmp) / "calibration.json"
                decision.write_text(json.dumps({"calibration": calibration, "thresholds": thresholds}))
                artifacts["calibration"] = str(decision)
                meta["calibration"] = (calibration or {}).get("method", "none")
                if (calibration or {}).get("logit_adjust"):
                    meta["logit_adjust_tau"] = calibration["logit_adjust"]["tau"]
                if thresholds:
                    meta["thresholds"] = thresholds
            if card:
                (Path(tmp) / "model_card.md").write_text(card)
                artifacts["model_card"] = str(Path(tmp) / "model_card.md")
            package = Path(tmp) / "components"
            shutil.copytree(Path(__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            example = io.BytesIO()
            side = max(image_size, 64)  # a film-sized example: any size is resized by the model
            Image.fromarray(np.full((side, side), 128, np.uint8), mode="L").save(example, format="PNG")
            with mlflow.start_run(run_id=self.run_id):
                mlflow.pyfunc.log_model(
                    name="model",
                    python_model=pyfunc.__file__,
                    artifacts=artifacts,
                    code_paths=[str(package)],
                    pip_requirements=model_requirements(),
                    signature=pyfunc.signature(len(label_names)),
                    input_example=pd.DataFrame({pyfunc.INPUT_COLUMN: [example.getvalue()]}),
                    metadata=meta,
                )
            if card:
                self.log_file(Path(tmp) / "model_card.md")

    def hold(self) -> None:
        """Record this process as the run's driver, with a heartbeat every HEARTBEAT_S until the
        run ends or the process does: ``open`` elsewhere then refuses the run while it lives."""
        import json
        import threading

        me, stop = this_process(), threading.Event()

        def beat() -> None:
            try:
                self.client.set_tag(self.run_id, DRIVER_TAG, json.dumps({**me, "beat": time.time()}))
            except Exception:  # noqa: BLE001 - a missed heartbeat is not a failure of the run
                pass

        def keep_beating() -> None:
            while not stop.wait(HEARTBEAT_S):
                beat()

        beat()  # written before training starts: a second driver sees it at once
        threading.Thread(target=keep_beating, name="ralflow-heartbeat", daemon=True).start()
        self._heartbeat = stop

    def finish(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """End the run as FINISHED, FAILED or KILLED, recording why when there is a reason."""
        if self._heartbeat is not None:
            self._heartbeat.set()
        if reason:
            self.client.set_tag(self.run_id, END_REASON_TAG, reason[:5000])
        self.client.set_terminated(self.run_id, status)
        self.ended = status


class ModelRegistry:
    """Registry writes: model versions with their lineage tags, and aliases."""

    def __init__(self, tracking_uri: str) -> None:
        import mlflow

        # The registry store resolves a version's source (models:/<logged model id>) through the
        # process-wide tracking URI, not through this client's.
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        self.tracking_uri = tracking_uri
        self.client = client(tracking_uri)

    def alias_version(self, name: str, alias: str):
        """The version holding ``alias``, or None."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException:
            return None

    def version_of_run(self, name: str, run_id: str):
        """The version of ``name`` already registered from ``run_id``, or None."""
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        except MlflowException:  # no such registered model yet
            return None
        return min(found, key=lambda v: int(v.version)) if found else None

    def register(self, name: str, run_id: str, tags: dict) -> int:
        """A new version of ``name`` from the run's logged model; returns its number."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name, description="ralflow chest X-ray classifier")
        run = self.client.get_run(run_id)
        model = logged_models(self.client, run.info.experiment_id, run_id)[0]
        version = self.client.create_model_version(
            name, source=f"models:/{model.model_id}", run_id=run_id, tags=tags, model_id=model.model_id
        )
        return int(version.version)

    def set_tags(self, name: str, version: int, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_model_version_tag(name, str(version), k, str(v))

    def set_alias(self, name: str, alias: str, version: int) -> None:
        self.client.set_registered_model_alias(name, alias, str(version))


def model_requirements() -> list[str]:
    """What the registered model needs to load, pinned to the versions it was trained with."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("mlflow", "torch", "torchvision", "timm", "numpy", "pandas", "pillow", "pydicom"):
        try:
            out.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            out.append(dist)
    return out


def per_class_table(label_names, ap, counts, groups) -> str:
    rows = ["label,group,train_count,ap"]
    for name, a, n, g in zip(label_names, ap, counts, groups):
        value = "" if a is None or (isinstance(a, float) and math.isnan(a)) else f"{a:.6f}"
        rows.append(f'"{name}",{g},{int(n)},{value}')
    return "\n".join(rows) + "\n"


def per_class_chart(label_names, ap, counts, groups, path: str | Path, title: str) -> None:
    """Per-class AP against training frequency (log scale), coloured by head/medium/tail."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"head": "tab:blue", "medium": "tab:orange", "tail": "tab:red"}
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    for name, a, n, g in zip(label_names, ap, counts, groups):
        if a is None or (isinstance(a, float) and math.isnan(a)):
            continue
        ax.scatter(max(n, 0.8), a, color=colors.get(g, "gray"), s=28)
        ax.annotate(name, (max(n, 0.8), a), fontsize=6.5, xytext=(3, 2), textcoords="offset points")
    for g, c in colors.items():
        ax.scatter([], [], color=c, label=g)
    ax.set_xscale("log")
    ax.set_xlabel("training images with the label (log scale)")
    ax.set_ylabel("validation AP")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
