"""Ray Tune job code for ``ralflow tune``: search spaces, the per-trial function, the sweep.

Each trial is a function trainable that builds the same ``TorchTrainer`` as ``ralflow train``
and forwards the workers' epoch reports to Tune with ``TuneReportCallback`` (the current
Ray Train V2 + Tune integration; no ``Tuner(trainer)``). Each trial has its own MLflow child
run, nested under one parent run per sweep.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np

from components.config import Config, load_config, merge
from components.errors import UserError
from workflows.training import build_trainer, finish_run, prepare_run

DEFAULT_SPACES = Path(__file__).resolve().parents[1] / "components" / "search_spaces.yaml"
DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "randint", "choice")


def load_search_space(loss: str, override_file: str | None = None) -> dict:
    """``{"loss.lamb": {"uniform": [1, 3]}, ...}`` for ``loss``: defaults, then the override file."""
    import yaml

    spaces = yaml.safe_load(DEFAULT_SPACES.read_text())
    space = dict(spaces.get(loss, {}))
    if override_file:
        path = Path(override_file)
        if not path.is_file():
            raise UserError(f"--search-space {override_file}: file not found")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise UserError(f"--search-space {override_file}: expected a mapping of loss name -> parameters")
        space.update(data.get(loss, {}))
    if not space:
        raise UserError(f"no search space for loss '{loss}' (add one with --search-space)")
    for key, spec in space.items():
        if "." not in key:
            raise UserError(f"search space key '{key}': expected section.key, e.g. loss.lamb or optim.lr")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise UserError(f"search space '{key}': expected one of {', '.join(DISTRIBUTIONS)} with its arguments, got {spec!r}")
    return space


def to_tune(space: dict) -> dict:
    from ray import tune

    out = {}
    for key, spec in space.items():
        (kind, args), = spec.items()
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


def trials_per_cluster(cfg: Config) -> int:
    """How many trials fit at once: CPUs (or GPUs) / what one trial's Train run needs."""
    import ray

    res = ray.cluster_resources()
    workers = max(cfg.train.num_workers, 1)
    per_trial_cpu = workers * cfg.train.cpus_per_worker + 2 * cfg.data.map_cpus  # + Ray Data tasks
    fit = int(res.get("CPU", 1) // per_trial_cpu)
    if cfg.train.use_gpu:
        fit = min(fit, int(res.get("GPU", 0) // workers))
    return max(fit, 1)


def make_trial_fn(base: dict, manifest: dict, parent_run_id: str, sweep: str, storage: str, local_data: bool = False):
    """``local_data``: the sweep runs on ralflow's embedded local Ray; the trial (its own process,
    with Ray Data's default DataContext) then applies the same Ray Data setting as ``ralflow train``."""
    def trial(sample: dict) -> None:
        from ray import tune
        from ray.tune.integration.ray_train import TuneReportCallback

        from workflows.raylib import use_all_local_cpus_for_data

        trial_id = tune.get_context().get_trial_id()
        cfg = apply_sample(merge(load_config(), base, "sweep"), sample)
        cfg.tracking.run_name = f"{sweep}-{trial_id}"
        say = lambda msg: print(f"[{trial_id}] {msg}", flush=True)
        if local_data:
            use_all_local_cpus_for_data()
            say("ray data: embedded local Ray, decode tasks scheduled by free CPUs")
        _, c, run_id = prepare_run(cfg, say, extra_tags={"mlflow.parentRunId": parent_run_id, "ralflow.sweep": sweep,
                                                         "ralflow.trial_id": trial_id})
        trainer = build_trainer(cfg, manifest, run_id, callbacks=[TuneReportCallback()],
                                storage_path=f"{storage}/{sweep}-trials", name=trial_id)
        result = trainer.fit()
        if result.error:
            c.set_terminated(run_id, "FAILED")
            raise result.error
        from workflows.training import best_checkpoint_state, prune_unregistered_checkpoints

        state = best_checkpoint_state(result, trainer.train_loop_config["storage_dir"], run_id)
        prune_unregistered_checkpoints(result)
        finish_run(cfg, manifest, c, run_id, state, say)

    return trial


def sweep_name(cfg: Config, num_samples: int, space: dict) -> str:
    import hashlib

    key = json.dumps([cfg.run_key(), num_samples, space], sort_keys=True, default=str)
    return f"sweep-{cfg.loss.name}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def trials_table(results, sweep: str, client, exp_id: str) -> list[dict]:
    rows = []
    for r in results:
        if r.metrics is None:
            continue
        trial_id = r.metrics.get("trial_id") or Path(r.path).name
        df = r.metrics_dataframe
        best = float(df["val_mAP"].max()) if df is not None and "val_mAP" in df else math.nan
        epochs = int(df["training_iteration"].max()) if df is not None and "training_iteration" in df else 0
        child = client.search_runs([exp_id], filter_string=f"tags.`ralflow.run_name` = '{sweep}-{trial_id}'", max_results=1)
        row = {"trial_id": trial_id, "run_id": child[0].info.run_id if child else "", "status": "error" if r.error else "ok",
               "epochs": epochs, "best_val_mAP": best}
        row.update({k: v for k, v in (r.config or {}).items()})
        rows.append(row)
    return rows


def trials_plot(rows: list[dict], keys: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r for r in rows)] or ["trial"]
    cols = min(4, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), dpi=100, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        xs = [r.get(key, i) for i, r in enumerate(rows)]
        ys = [r["best_val_mAP"] for r in rows]
        ax.scatter(xs, ys, c=[r["epochs"] for r in rows], cmap="viridis", s=30)
        if key == "optim.lr":
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("best val mAP")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"{title} (colour: epochs run before ASHA stopped the trial)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
