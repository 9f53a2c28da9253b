"""Tune the loss (and learning rate) with Ray Tune: Optuna TPE search, ASHA early stopping on
per-epoch validation macro mAP, one MLflow parent run per sweep with a child run per trial.
An interrupted sweep resumes with --resume (finished trials are not run again).
Prints the parent run id and the best trial."""
from __future__ import annotations

import math
import sys

from workflows.common import main_for

DESCRIPTION = "Hyperparameter sweep over a loss with Ray Tune (Optuna + ASHA), tracked in MLflow."


def add_arguments(parser) -> None:
    from workflows.train import add_common_training_arguments

    add_common_training_arguments(parser)
    parser.add_argument("--loss", help="loss to tune (default ral)")
    parser.add_argument("--model", help="timm model name")
    parser.add_argument("--num-samples", type=int, default=8, help="trials")
    parser.add_argument("--max-epochs", type=int, default=5, help="epochs per trial (ASHA's max_t)")
    parser.add_argument("--grace-epochs", type=int, default=1, help="ASHA grace period in epochs")
    parser.add_argument("--search-space", help="YAML overriding the default search space of the loss")
    parser.add_argument("--max-concurrent", type=int, help="default: what the cluster fits")
    parser.add_argument("--name", help="sweep name (default: derived from config + space; stable => resumable)")
    parser.add_argument("--resume", action="store_true", help="resume the interrupted sweep of the same name")


def run(args) -> int:
    from components.config import load_config
    from workflows.train import overrides_from_args

    overrides = overrides_from_args(args)
    overrides.setdefault("train", {})["epochs"] = args.max_epochs
    cfg = load_config(args.config, overrides)
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    out = run_sweep(cfg, args.num_samples, args.search_space, args.resume, args.address, args.name,
                    args.max_concurrent, args.grace_epochs)
    print(f"parent run id: {out['parent_run_id']}")
    print(f"best trial: {out['best_trial']} val mAP {out['best_val_mAP']:.4f} run {out['best_run_id']} params {out['best_params']}")
    return 0


def run_sweep(cfg, num_samples: int, space_file: str | None = None, resume: bool = False, address: str | None = None,
              name: str | None = None, max_concurrent: int | None = None, grace_epochs: int = 1, log=print) -> dict:
    import tempfile
    from pathlib import Path

    import yaml
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from components import tracking
    from components.data.prepare import load_manifest
    from components.errors import UserError
    from workflows.raylib import check_shared_path, embedded_ray, init_ray
    from workflows.training import loss_params_for
    from workflows.tuning import (load_search_space, make_trial_fn, sweep_name, to_tune, trials_per_cluster,
                                  trials_plot, trials_table)

    if not cfg.data.path:
        raise UserError("--data is required (a folder written by `ralflow prepare`)")
    manifest = load_manifest(cfg.data.path)
    cfg.data.image_size = cfg.data.image_size or manifest["image_size"]
    from components.losses import build_loss

    build_loss(cfg.loss.name, **loss_params_for(cfg, manifest))
    space = load_search_space(cfg.loss.name, space_file)
    name = name or sweep_name(cfg, num_samples, space)
    storage = cfg.tracking.storage_path
    tracking.check_tracking_uri(cfg.tracking.tracking_uri)
    c = tracking.client(cfg.tracking.tracking_uri)
    exp_id = tracking.experiment_id(c, cfg.tracking.experiment)
    parent_id, resumed = tracking.find_or_create_run(c, exp_id, name, {"ralflow.sweep_parent": "true", "ralflow.loss": cfg.loss.name,
                                                                       "ralflow.dataset_sha256": manifest["dataset_sha256"]})
    log(f"[tune] sweep '{name}': MLflow parent run {parent_id} ({'resumed' if resumed else 'new'}); "
        f"tracking {cfg.tracking.tracking_uri}; storage {storage}/{name}")
    if not resumed:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "search_space.yaml").write_text(yaml.safe_dump({cfg.loss.name: space}, sort_keys=False))
            c.log_artifact(parent_id, str(Path(tmp) / "search_space.yaml"))
        tracking.log_params(c, parent_id, {"num_samples": num_samples, "max_epochs": cfg.train.epochs, "loss": cfg.loss.name,
                                           "model": cfg.model.name, "dataset.sha256": manifest["dataset_sha256"]})

    init_ray(address, log=log)
    check_shared_path(storage, "--storage-path")
    concurrent = min(max_concurrent or trials_per_cluster(cfg), num_samples)
    base = cfg.to_dict()
    base["tracking"]["run_name"] = None
    # The trial function only drives its TorchTrainer: a token CPU share; the workers ask for their own.
    trainable = tune.with_resources(make_trial_fn(base, manifest, parent_id, name, storage, local_data=embedded_ray()), {"CPU": 0.01})
    experiment_path = f"{storage}/{name}"
    if resume:
        if not tune.Tuner.can_restore(experiment_path):
            raise UserError(f"--resume: no sweep '{name}' to resume under {storage} (same flags as the first run?)")
        log(f"[tune] resuming sweep from {experiment_path}")
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True)
    else:
        if tune.Tuner.can_restore(experiment_path):
            raise UserError(f"sweep '{name}' already exists under {storage}; add --resume to continue it, or --name for a new one")
        searcher = ConcurrencyLimiter(OptunaSearch(seed=cfg.train.seed), max_concurrent=concurrent)
        # stop_last_trials=False: a trial that reaches the last epoch ends by itself, so it can
        # log its model; ASHA stops only the ones that fall behind at a rung.
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs,
                                  grace_period=min(grace_epochs, cfg.train.epochs), reduction_factor=2,
                                  stop_last_trials=False)
        log(f"[tune] {num_samples} trials, up to {concurrent} at a time, ASHA over {cfg.train.epochs} epochs, "
            f"searching {', '.join(space)}")
        tuner = tune.Tuner(
            trainable, param_space=to_tune(space),
            tune_config=tune.TuneConfig(metric="val_mAP", mode="max", num_samples=num_samples, search_alg=searcher,
                                        scheduler=scheduler, max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1),
        )
    results = tuner.fit()
    rows = trials_table(results, name, c, exp_id)
    for row in rows:  # trials ASHA stopped never reached finish_run: close their child runs
        if row["run_id"] and c.get_run(row["run_id"]).info.status == "RUNNING":
            c.set_tag(row["run_id"], "ralflow.stopped_early", "true")
            c.set_terminated(row["run_id"], "KILLED")
    finished = [r for r in rows if r["status"] == "ok" and not math.isnan(r["best_val_mAP"])]
    if not finished:
        c.set_terminated(parent_id, "FAILED")
        raise UserError("no trial produced a validation metric; see the trial errors above")
    best = max(finished, key=lambda r: r["best_val_mAP"])
    best_params = {k: best[k] for k in space}
    with tempfile.TemporaryDirectory() as tmp:
        import csv

        fields = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("trial_id", "run_id", "status", "epochs", "best_val_mAP"), k))
        with open(Path(tmp) / "trials.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        trials_plot(rows, list(space), Path(tmp) / "trials.png", f"{name}: {len(rows)} trials")
        c.log_artifact(parent_id, str(Path(tmp) / "trials.csv"))
        c.log_artifact(parent_id, str(Path(tmp) / "trials.png"))
    tracking.log_params(c, parent_id, {f"best.{k}": v for k, v in best_params.items()} | {"best.trial_id": best["trial_id"],
                                                                                         "best.run_id": best["run_id"]})
    from mlflow.entities import Metric
    import time

    c.log_batch(parent_id, metrics=[Metric("best_val_mAP", best["best_val_mAP"], int(time.time() * 1000), 0),
                                    Metric("num_trials", len(rows), int(time.time() * 1000), 0)])
    c.set_terminated(parent_id, "FINISHED")
    return {"parent_run_id": parent_id, "best_trial": best["trial_id"], "best_run_id": best["run_id"],
            "best_val_mAP": best["best_val_mAP"], "best_params": best_params, "trials": rows, "name": name}


if __name__ == "__main__":
    sys.exit(main_for(__name__))
