"""MLflow helpers: reachability check, stable runs, epoch metrics without duplicates, the
logged model (a pyfunc that maps images to per-class probabilities) and the per-class AP
artifacts. Only the driver and rank 0 call these."""
from __future__ import annotations

import json
import math
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from .errors import UserError

RUN_KEY_TAG = "ralflow.run_name"


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, when the tracking store cannot be used."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                if r.status != 200:
                    raise UserError(f"MLflow tracking server at {uri} answered {r.status} on /health")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(f"cannot reach the MLflow tracking server at {uri} ({reason}); start it or fix --tracking-uri") from None
    elif uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///"):]).parent
        if not parent.is_dir():
            raise UserError(f"--tracking-uri {uri}: folder {parent} does not exist")
    elif uri.startswith(("file:", "databricks", "postgresql", "mysql", "mssql")) or "://" not in uri:
        return
    else:
        raise UserError(f"--tracking-uri {uri}: unsupported scheme (use http(s)://, sqlite:///, postgresql:// or a path)")


def client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def experiment_id(c, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return c.create_experiment(name)
    if exp.lifecycle_stage == "deleted":
        raise UserError(f"MLflow experiment '{name}' is deleted; restore it or use another --experiment")
    return exp.experiment_id


def find_or_create_run(c, exp_id: str, run_name: str, tags: dict | None = None) -> tuple[str, bool]:
    """The run carrying ``run_name`` (resumed), else a new one. Returns (run_id, resumed)."""
    found = c.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_name}'", max_results=1,
                          order_by=["attributes.start_time DESC"])
    if found:
        run = found[0]
        if run.info.status != "RUNNING":
            c.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id, True
    run = c.create_run(exp_id, run_name=run_name, tags={RUN_KEY_TAG: run_name, **(tags or {})})
    return run.info.run_id, False


def logged_steps(c, run_id: str, key: str) -> set[int]:
    return {m.step for m in c.get_metric_history(run_id, key)}


def log_epoch(c, run_id: str, metrics: dict, epoch: int) -> None:
    """Per-epoch scalar metrics at step=epoch; an epoch already logged is not logged again
    (a restored run may report the same epoch twice)."""
    from mlflow.entities import Metric
    import time

    if epoch in logged_steps(c, run_id, "val_mAP"):
        return
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, epoch) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
    c.log_batch(run_id, metrics=batch)


RESTART_METRIC = "restart_from_epoch"


def log_restart(c, run_id: str, epoch: int) -> None:
    """Record that training restarted from the checkpoint of ``epoch`` (one value per restart)."""
    from mlflow.entities import Metric
    import time

    c.log_batch(run_id, metrics=[Metric(RESTART_METRIC, float(epoch), int(time.time() * 1000), epoch)])


def restarts(c, run_id: str) -> list[int]:
    """The epochs a run restarted from, in the order the restarts happened."""
    history = sorted(c.get_metric_history(run_id, RESTART_METRIC), key=lambda m: m.timestamp)
    return [int(m.value) for m in history]


def log_params(c, run_id: str, params: dict) -> None:
    """Flattened params; values are strings capped to MLflow's limit. Params already logged
    (a resumed run) are skipped: MLflow refuses to change a logged param."""
    from mlflow.entities import Param

    existing = c.get_run(run_id).data.params
    items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def per_class_table(label_names, ap, counts, groups) -> str:
    rows = ["label,group,train_count,ap"]
    for name, a, n, g in zip(label_names, ap, counts, groups):
        rows.append(f"\"{name}\",{g},{int(n)},{'' if a is None or (isinstance(a, float) and math.isnan(a)) else f'{a:.6f}'}")
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


# -- the logged model --------------------------------------------------------------------------

try:
    import mlflow.pyfunc as _pyfunc

    _PythonModel = _pyfunc.PythonModel
except Exception:  # pragma: no cover - mlflow is a dependency; keep imports of this module cheap
    _PythonModel = object


class ChestXrayClassifier(_PythonModel):
    """pyfunc: float32 images (N, C_in, H, W), normalised as in training -> (N, classes)
    probabilities. ``label_names`` in the model's metadata give the column order."""

    # The signature logged with the model describes the input (float32 images); this skips
    # MLflow's type-hint based wrapping of predict and its warning about missing hints.
    _skip_type_hint_validation = True

    def load_context(self, context):
        import torch

        from .models import build_model

        spec = json.loads(Path(context.artifacts["spec"]).read_text())
        self.label_names = spec["label_names"]
        self.model = build_model(spec["model"], len(self.label_names), spec["in_chans"])
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)

    def predict(self, context, model_input, params=None):
        import torch

        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32), device=self.device)
        with torch.inference_mode():
            return torch.sigmoid(self.model(x).float()).cpu().numpy()


def log_model(run_id: str, tracking_uri: str, state_dict, model_name: str, in_chans: int, image_size: int,
              label_names, registered_model_name: str | None = None):
    """Log the trained network to ``run_id`` with MLflow 3's API (name=, signature, input example)."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pt"
        torch.save(state_dict, weights)
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"model": model_name, "in_chans": in_chans, "image_size": image_size,
                                    "label_names": list(label_names)}))
        example = np.zeros((2, in_chans, image_size, image_size), dtype=np.float32)
        signature = infer_signature(example, np.zeros((2, len(label_names)), dtype=np.float32))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=ChestXrayClassifier(), artifacts={"weights": str(weights), "spec": str(spec)},
                signature=signature, input_example=example,
                metadata={"label_names": list(label_names), "image_size": image_size, "in_chans": in_chans},
                registered_model_name=registered_model_name,
            )
    return info
