"""``ralflow tune``: an Optuna TPE search with ASHA early stopping on per-epoch validation macro
mAP, one MLflow parent run per sweep with a child run per trial. An interrupted sweep resumes
(finished trials are not run again).

Each trial is a function trainable that builds the same ``TorchTrainer`` as ``ralflow train``
(``components.train.trainer``) and forwards the workers' epoch reports to Tune with
``TuneReportCallback`` (the Ray Train V2 + Tune integration; no ``Tuner(trainer)``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass, replace

from ..config import Config, setting
from ..data.manifest import Manifest
from ..errors import UserError
from ..tracking import TrackedRun, check_tracking_uri
from ..train.build import build_loss_for
from ..train.resources import check_resources
from ..train.trainer import (
    STORAGE_TAG,
    fit_and_log,
    load_dataset,
    load_init_weights,
    make_job,
    opened_run,
    run_ends_if_this_fails,
    storage_dir_of,
)
from .report import trials_csv, trials_plot, trials_table
from .space import apply_sample, check_search_space, load_search_space, to_tune


@dataclass
class SweepOptions:
    num_samples: int = setting(8, help="trials")
    max_epochs: int = setting(5, help="epochs per trial (ASHA stops trials that fall behind, before their last epoch)")
    grace_epochs: int = setting(1, help="ASHA grace period in epochs")
    search_space: str | None = setting(None, help="YAML overriding the default search space of the loss")
    max_concurrent: int | None = setting(None, help="concurrent trials (default: what the cluster fits)")
    name: str | None = setting(None, help="sweep name (default: from the config and space; stable => resumable)")
    resume: bool = setting(False, help="resume the interrupted sweep of the same name")


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


def sweep_name(cfg: Config, num_samples: int, space: dict, dataset_sha256: str) -> str:
    key = json.dumps([cfg.run_key(dataset_sha256), num_samples, space], sort_keys=True, default=str)
    return f"sweep-{cfg.loss.name}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def make_trial_fn(
    base: Config, manifest: Manifest, parent_run_id: str, sweep: str, storage: str, local_data: bool = False
):
    """The trainable. ``local_data``: the sweep runs on ralflow's embedded local Ray; the trial
    (its own process, with Ray Data's default DataContext) then applies the same Ray Data setting
    as ``ralflow train``."""

    def trial(sample: dict) -> None:
        from ray import tune
        from ray.tune.integration.ray_train import TuneReportCallback

        from ..runtime import use_all_local_cpus_for_data

        trial_id = tune.get_context().get_trial_id()
        cfg = apply_sample(copy.deepcopy(base), sample)
        cfg.tracking.run_name = f"{sweep}-{trial_id}"

        def say(msg):
            print(f"[{trial_id}] {msg}", flush=True)

        if local_data:
            use_all_local_cpus_for_data()
            say("ray data: embedded local Ray, decode tasks scheduled by free CPUs")
        done = TrackedRun.find(cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.tracking.run_name)
        found = done.get() if done is not None else None
        if found is not None and found.info.status == "FINISHED" and done.has_model():
            # Finished before the sweep was stopped, but after Tune last saved its state: report
            # the result instead of reopening the run.
            m = found.data.metrics
            say(f"already finished in MLflow run {done.run_id}; not run again")
            tune.report({"val_mAP": m.get("best_val_mAP", math.nan), "epoch": cfg.train.epochs})
            return
        init = load_init_weights(cfg, manifest, say)  # a sweep over a second stage (e.g. cRT)
        tags = {**(init.tags(cfg.train.head_only) if init else {}), "mlflow.parentRunId": parent_run_id,
                "ralflow.sweep": sweep, "ralflow.trial_id": trial_id}  # fmt: skip
        trials_storage = f"{storage}/{sweep}-trials"
        storage_dir = storage_dir_of(cfg, trials_storage, trial_id)
        with opened_run(cfg, manifest, say, tags, storage_dir, tune_is_stopping) as run:
            job = make_job(cfg, manifest, run, storage_path=trials_storage, name=trial_id, init=init, log=say)
        fit_and_log(
            job, say, tune_is_stopping, callbacks=[TuneReportCallback()], storage_path=trials_storage, name=trial_id
        )

    return trial


def tune_is_stopping() -> bool:
    """Whether Tune has asked this trial to stop (ASHA). Its Train controller then dies with the
    trial's process and the fit fails on the way out: no failure of the trial, and the sweep, which
    knows why it stopped, closes the run. Tune's stop sets the trial session's stop event before
    the process ends (Ray's internal session: without it, the sweep still corrects the run)."""
    try:
        from ray.train._internal.session import get_session

        session = get_session()
        return bool(session is not None and session.stop_event.is_set())
    except (ImportError, AttributeError):
        return False


def close_trial_runs(rows: list[dict], tracking_uri: str) -> None:
    """End the child runs the trials could not end themselves, by Tune's verdict: a trial that
    crashed (its process may have died before it could say so) is FAILED with Tune's error; one
    ASHA stopped is KILLED and tagged as stopped early, also when it wrote FAILED on its way out
    (see ``tune_is_stopping``; where Ray's session could not say so): Tune did not count it as an
    error."""
    for row in rows:
        if not row["run_id"]:
            continue
        run = TrackedRun(tracking_uri, row["run_id"])
        status = run.get().info.status
        if row["status"] == "error":
            if status == "RUNNING":
                run.finish("FAILED", f"trial failed: {row.get('error', 'see the Ray Tune trial error')}")
        elif status in ("RUNNING", "FAILED"):
            run.set_tags({"ralflow.stopped_early": "true"})
            run.finish("KILLED", f"stopped early by ASHA after {row['epochs']} epoch(s)")


LOST_TAG = "ralflow.trial_lost"


def set_apart_lost_trials(parent: TrackedRun, sweep: str, known: set[str], log=print) -> list[str]:
    """Tag the child runs of trials Tune does not know, and end them if still open; returns their
    run names. Tune saves the sweep's state every 10 s or more: a trial that started after the last
    save and before the sweep was killed outright (SIGKILL, a lost head node) is not in the state
    ``--resume`` restores, and the searcher samples a new trial in its place. The lost trial's run
    is kept, tagged ``ralflow.trial_lost``, and counted nowhere (not in trials.csv, not a best
    trial)."""
    lost = [x for x in trial_runs(parent, sweep) if x.data.tags.get("ralflow.trial_id") not in known]
    for x in lost:
        run = TrackedRun(parent.tracking_uri, x.info.run_id)
        run.set_tags({LOST_TAG: "true"})
        if x.info.status == "RUNNING":
            run.finish("KILLED", "trial lost: the sweep was killed before Tune saved it")
    if lost:
        log(
            f"[tune] {len(lost)} trial run(s) of trials Tune had not saved when the sweep was killed, "
            f"tagged {LOST_TAG} and not counted (new trials ran in their place): "
            + ", ".join(x.info.run_name for x in lost)
        )
    return [x.info.run_name for x in lost]


def trial_runs(parent: TrackedRun, sweep: str, status: str | None = None) -> list:
    """The trials' runs of ``sweep`` (only those with ``status`` when given)."""
    where = f"tags.`ralflow.sweep` = '{sweep}'" + (f" and attributes.status = '{status}'" if status else "")
    return parent.client.search_runs([parent.get().info.experiment_id], filter_string=where)


def close_running_trials(parent: TrackedRun, sweep: str, reason: str) -> None:
    for child in trial_runs(parent, sweep, "RUNNING"):
        TrackedRun(parent.tracking_uri, child.info.run_id).finish("KILLED", reason)


def check_sweep_folder(resume: bool, exists: bool, storage: str, name: str) -> None:
    """--resume needs the sweep's saved state (``exists``); a new sweep must not start over one.
    Checked before the parent run is opened, so that a refusal leaves the sweep's run as it was."""
    if resume and not exists:
        raise UserError(
            f"resume: no sweep '{name}' to resume under {storage} (same settings as the first run?)", field="resume"
        )
    if not resume and exists:
        raise UserError(
            f"sweep '{name}' already exists under {storage}; resume it, or give it another name", field="name"
        )


def asha_scheduler(epochs: int, grace_epochs: int):
    """ASHA over the trials' epochs, its rungs all before the last epoch; None (Tune's default:
    every trial runs to the end) for trials of one epoch, where there is nothing to stop early.

    A rung at the last epoch would save no training, and Tune stops a trial on the report that
    ends its last epoch, while the trial still logs its model: a trial that had trained every epoch
    was then recorded as KILLED, "stopped early by ASHA after N epoch(s)". ASHA puts rungs at
    ``grace * 2**k <= max_t``, so ``max_t`` is the epoch before the last.
    ``stop_last_trials=False``: a trial past the last rung ends by itself.
    Time is the trial's epoch (reported by its workers, 1-based): a trial resumed from a
    checkpoint keeps its count, where Tune's training_iteration would start again at 1."""
    from ray.tune.schedulers import ASHAScheduler

    last_rung = epochs - 1
    if last_rung < 1:
        return None
    return ASHAScheduler(
        time_attr="epoch",
        max_t=last_rung,
        grace_period=min(grace_epochs, last_rung),
        reduction_factor=2,
        stop_last_trials=False,
    )


def build_tuner(cfg: Config, opts: SweepOptions, trainable, space: dict, name: str, concurrent: int, log=print):
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    storage = cfg.tracking.storage_path
    experiment_path = f"{storage}/{name}"
    if opts.resume:  # check_sweep_folder said there is one
        log(f"[tune] resuming sweep from {experiment_path}")
        return tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True)
    searcher = ConcurrencyLimiter(OptunaSearch(seed=cfg.train.seed), max_concurrent=concurrent)
    scheduler = asha_scheduler(cfg.train.epochs, opts.grace_epochs)
    stopping = (
        f"ASHA over {cfg.train.epochs} epochs (comparing trials before the last)"
        if scheduler is not None
        else "1 epoch each, none stopped early"
    )
    log(f"[tune] {opts.num_samples} trials, up to {concurrent} at a time, {stopping}, searching {', '.join(space)}")
    return tune.Tuner(
        trainable,
        param_space=to_tune(space),
        tune_config=tune.TuneConfig(
            metric="val_mAP",
            mode="max",
            num_samples=opts.num_samples,
            search_alg=searcher,
            scheduler=scheduler,  # concurrency: the searcher's ConcurrencyLimiter (Tune warns when both say it)
        ),
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1),
    )


def finish_sweep(parent: TrackedRun, results, name: str, space: dict, log=print) -> dict:
    """After ``tuner.fit()``: each trial's run ended by Tune's verdict, lost trials set apart, the
    best trial with a logged model chosen, and the parent's table, chart and best params logged.
    Returns the parent run id, the best trial and every trial's row."""
    import tempfile
    from pathlib import Path

    uri = parent.tracking_uri
    rows = trials_table(results, name, parent.client, parent.get().info.experiment_id)
    close_trial_runs(rows, uri)
    set_apart_lost_trials(parent, name, {r["trial_id"] for r in rows}, log)
    finished = [
        r
        for r in rows
        if r["status"] == "ok"
        and r["run_id"]
        and not math.isnan(r["best_val_mAP"])
        and TrackedRun(uri, r["run_id"]).get().info.status == "FINISHED"
    ]
    if not finished:
        errors = "; ".join(sorted({r["error"] for r in rows if r.get("error")})) or "none finished"
        parent.finish("FAILED", f"no trial finished with a logged model ({errors})")
        raise UserError(f"no trial finished with a logged model; trial errors: {errors}")
    best = max(finished, key=lambda r: r["best_val_mAP"])
    best_params = {k: best[k] for k in space}
    with tempfile.TemporaryDirectory() as tmp:
        trials_plot(rows, list(space), Path(tmp) / "trials.png", f"{name}: {len(rows)} trials")
        parent.log_file(Path(tmp) / "trials.png")
    parent.log_files({"trials.csv": trials_csv(rows)})
    parent.log_params(
        {f"best.{k}": v for k, v in best_params.items()}
        | {"best.trial_id": best["trial_id"], "best.run_id": best["run_id"]}
    )
    parent.log_metrics({"best_val_mAP": best["best_val_mAP"], "num_trials": len(rows)})
    parent.finish("FINISHED")
    return {
        "parent_run_id": parent.run_id,
        "best_trial": best["trial_id"],
        "best_run_id": best["run_id"],
        "best_val_mAP": best["best_val_mAP"],
        "best_params": best_params,
        "trials": rows,
        "name": name,
    }


def run_sweep(
    cfg: Config, opts: SweepOptions, address: str | None = None, log=print, resume_if_exists: bool = False
) -> dict:
    """The whole sweep; returns the parent run id, the best trial (one with a logged model) and
    every trial's row. ``resume_if_exists``: resume the sweep these settings name when its state
    is in storage, start it otherwise (``ralflow run`` re-run); the name is known only once the
    dataset has filled in the config, so only this function can tell."""
    import yaml
    from ray import tune

    from ..runtime import check_shared_path, embedded_ray, init_ray, interrupts_held

    if opts.num_samples < 1:
        raise UserError(f"num_samples must be >= 1, got {opts.num_samples}", field="num_samples")
    cfg.train.epochs = opts.max_epochs
    manifest = load_dataset(cfg)
    space = load_search_space(cfg.loss.name, opts.search_space)
    check_search_space(space, cfg, lambda probe: build_loss_for(probe, manifest))  # here, not in every trial
    name = opts.name or sweep_name(cfg, opts.num_samples, space, manifest.dataset_sha256)
    storage, uri = cfg.tracking.storage_path, cfg.tracking.tracking_uri
    check_tracking_uri(uri)
    tags = {
        "ralflow.sweep_parent": "true",
        "ralflow.loss": cfg.loss.name,
        "ralflow.dataset_sha256": manifest.dataset_sha256,
    }
    identity = {"ralflow.dataset_sha256": manifest.dataset_sha256, STORAGE_TAG: f"{storage}/{name}"}
    exists = tune.Tuner.can_restore(f"{storage}/{name}")
    if resume_if_exists and exists:
        opts = replace(opts, resume=True)
    # What can refuse the sweep comes before its parent run is opened: a refusal leaves it as it was.
    check_sweep_folder(opts.resume, exists, storage, name)
    init_ray(address, log=log)
    check_resources(cfg, log)
    check_shared_path(storage, "tracking.storage_path", field="tracking.storage_path")

    def end_trials(status: str, reason: str) -> None:
        close_running_trials(parent, name, f"sweep {reason}" if status == "KILLED" else reason)

    with interrupts_held() as deliver:  # Ctrl-C never leaves the parent run RUNNING
        parent = TrackedRun.open(uri, cfg.tracking.experiment, name, {**tags, **identity}, identity)
        try:
            with run_ends_if_this_fails(parent, log, failed="sweep failed", before_end=end_trials):
                deliver()  # an interrupt held while the parent run was created lands here and closes it
                parent.hold()  # `tune --resume` elsewhere is refused while this sweep lives
                log(
                    f"[tune] sweep '{name}': MLflow parent run {parent.run_id} "
                    f"({'resumed' if parent.resumed else 'new'}); tracking {uri}; storage {storage}/{name}"
                )
                if not parent.resumed:
                    parent.log_files({"search_space.yaml": yaml.safe_dump({cfg.loss.name: space}, sort_keys=False)})
                    parent.log_params(
                        {
                            "num_samples": opts.num_samples,
                            "max_epochs": cfg.train.epochs,
                            "loss": cfg.loss.name,
                            "model": cfg.model.name,
                            "dataset.sha256": manifest.dataset_sha256,
                        }
                    )
                concurrent = min(opts.max_concurrent or trials_per_cluster(cfg), opts.num_samples)
                base = copy.deepcopy(cfg)
                base.tracking.run_name = None
                trial = make_trial_fn(base, manifest, parent.run_id, name, storage, local_data=embedded_ray())
                # The trial function only drives its TorchTrainer: a token CPU share; the workers ask for their own.
                tuner = build_tuner(cfg, opts, tune.with_resources(trial, {"CPU": 0.01}), space, name, concurrent, log)
                # Tune's own SIGINT handler stops "gracefully" and returns as if the sweep had ended; ralflow
                # lets the interrupt through instead and closes the runs (the state Tune saved resumes).
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
                return finish_sweep(parent, tuner.fit(), name, space, log)
        except KeyboardInterrupt as exc:
            import time

            import ray

            # A trial starting just now opens its run in its own process, after the guard's pass:
            # stop the job's trials (disconnecting ends them), then close what they opened.
            ray.shutdown()
            time.sleep(3)
            end_trials("KILLED", str(exc) or "interrupted")
            raise
