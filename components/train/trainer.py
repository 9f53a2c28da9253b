"""The driver side of a training run, shared by ``ralflow train`` and every Tune trial: check the
config against the dataset, open the MLflow run, build the ``TorchTrainer``, fit, and the one
post-fit path (best checkpoint -> summary metrics, per-class artifacts, logged model, status)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from pathlib import Path

from ..config import Config, save_yaml
from ..data.manifest import Manifest
from ..errors import UserError, first_line
from ..metrics import fmt
from ..tracking import TrackedRun, check_tracking_uri, per_class_chart, per_class_table, sqlite_folder
from .loop import TrainJob, train_loop_per_worker
from .resources import check_resources, cpus_per_worker_that_fit
from .stages import load_init_weights


def load_dataset(cfg: Config, log=print) -> Manifest:
    """The dataset of ``cfg``, verified and checked for training; fills ``data.image_size`` and the
    default run name (config + dataset checksum) from it, and builds the loss and the model once,
    so bad settings fail here rather than in a worker."""
    from .build import build_loss_for, build_model_for

    if not cfg.data.path:
        raise UserError("data.path is required (a folder written by `ralflow prepare`)", field="data.path")
    manifest = Manifest.load(cfg.data.path)
    manifest.split("val")
    manifest.verify()
    cfg.data.image_size = cfg.data.image_size or manifest.image_size
    cfg.tracking.run_name = cfg.tracking.run_name or cfg.default_run_name(manifest.dataset_sha256)
    build_loss_for(cfg, manifest)
    model = build_model_for(cfg, len(manifest.label_names))
    if model.load_report:
        log(f"[train] {model.load_report.line()}")
    return manifest


def git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


STORAGE_TAG = "ralflow.storage"


def storage_dir_of(cfg: Config, storage_path: str | None = None, name: str | None = None) -> str:
    """The run's folder in Ray Train storage: its per-epoch checkpoints."""
    return f"{storage_path or cfg.tracking.storage_path}/{name or cfg.tracking.run_name}"


@contextlib.contextmanager
def opened_run(
    cfg: Config,
    manifest: Manifest,
    log=print,
    extra_tags: dict | None = None,
    storage_dir: str | None = None,
    stopping=None,
):
    """The MLflow run of this config (resumed when it exists), with params, config and manifest
    logged. From the moment the run exists a failure or an interrupt, in the block or while the
    params are logged, ends it saying why (``run_ends_if_this_fails``); Ctrl-C or SIGTERM while
    MLflow creates it are held back until then, so they never leave a run RUNNING."""
    from ..runtime import interrupts_held

    uri = cfg.tracking.tracking_uri
    check_tracking_uri(uri)
    log(f"[train] MLflow tracking URI: {uri}   (browse: mlflow ui --backend-store-uri {uri})")
    storage_dir = storage_dir or storage_dir_of(cfg)
    log(f"[train] Ray Train storage: {storage_dir}")
    # What a resumed run must agree on: a rerun that names the same run must train the same data
    # into the same storage, or its checkpoints and its logged model would tell different stories.
    identity = {"ralflow.dataset_sha256": manifest.dataset_sha256, STORAGE_TAG: storage_dir}
    tags = {**identity, "ralflow.loss": cfg.loss.name, "ralflow.model": cfg.model.name}
    if commit := git_commit():
        tags["ralflow.git_commit"] = commit
    with interrupts_held() as deliver:
        run = TrackedRun.open(
            uri, cfg.tracking.experiment, cfg.tracking.run_name, {**tags, **(extra_tags or {})}, identity
        )
        with run_ends_if_this_fails(run, log, stopping):
            deliver()  # an interrupt held while the run was created ends it here, KILLED
            log(
                f"[train] MLflow run {run.run_id} ({'resumed' if run.resumed else 'new'}) "
                f"in experiment '{cfg.tracking.experiment}'"
            )
            params = cfg.flat()
            params.pop("train.fail_at_epoch", None)
            params["dataset.sha256"] = manifest.dataset_sha256
            params["dataset.num_train"] = manifest.split("train").num_images
            params["dataset.num_val"] = manifest.split("val").num_images
            run.log_params(params)
            if not run.resumed:
                import json
                import tempfile

                with tempfile.TemporaryDirectory() as tmp:
                    save_yaml(cfg, Path(tmp) / "config.yaml")
                    run.log_file(Path(tmp) / "config.yaml")
                run.log_files({"manifest.json": json.dumps(manifest.to_dict(), indent=2)}, "dataset")
            yield run


def build_trainer(job: TrainJob, callbacks=None, storage_path: str | None = None, name: str | None = None):
    """The TorchTrainer for one training run (``ralflow train`` and each Tune trial)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from ..data.ingest import build_ray_dataset
    from .build import augment_options
    from .data_split import ExactValidationSplit

    cfg, d = job.cfg, job.cfg.data
    decode = d.decode_on == "cpu"  # "gpu": JPEG bytes travel, the worker decodes and augments on its device
    augment = augment_options(cfg) if decode else None
    datasets = {
        "train": build_ray_dataset(
            job.manifest, "train", d.image_size, augment, d.map_cpus, shuffle=True, decode=decode, plan=job.plan
        ),
        # with each image's study and view, for the study-level mAP
        "val": build_ray_dataset(job.manifest, "val", d.image_size, None, d.map_cpus, keep_ids=True, decode=decode),
    }
    for ds in datasets.values():
        # These run in Ray Train's split coordinator, a remote actor: its progress bars reach the
        # driver as raw redraw lines and count no rows for a split. The epoch lines report
        # progress, throughput and data wait instead.
        ds.context.enable_progress_bars = False
    plain_print_in_workers()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=name or cfg.tracking.run_name,
            storage_path=storage_path or cfg.tracking.storage_path,
            callbacks=callbacks,
            # A worker group that cannot start (too few resources, a node gone) is retried as
            # often as a failed one, not forever (Ray's default for start failures).
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.train.max_failures, controller_failure_limit=cfg.train.max_failures
            ),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute="val_mAP",
                checkpoint_score_order="max",
            ),
        ),
        datasets=datasets,
        dataset_config=ExactValidationSplit(
            datasets_to_split=["train", "val"],
            execution_options={name: ingest_options(ds) for name, ds in datasets.items()},
        ),
    )


def ingest_options(ds):
    """Ray Train's ingest options for ``ds``, keeping the dataset's own ``preserve_order``, which
    Ray Train's defaults would replace: a seeded training dataset (``build_ray_dataset`` with a
    plan) delivers its rows in the seeded row-group order, not in the order the parallel decode
    tasks finish, so a seed fixes what each worker sees (on one node; across nodes, shard
    locality still depends on timing)."""
    import warnings

    import ray.train

    with warnings.catch_warnings():  # Ray's own defaults set a field Ray deprecates: not the user's to fix
        warnings.filterwarnings("ignore", message=".*exclude_resources.*")
        options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = ds.context.execution_options.preserve_order
    return options


def scaling_config(cfg: Config):
    """Workers and the resources each holds (local mode: none, the driver trains)."""
    import ray.train

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker} if t.num_workers else None
    if resources and t.use_gpu:
        resources["GPU"] = 1
    return ray.train.ScalingConfig(
        num_workers=t.num_workers,
        use_gpu=t.use_gpu,
        resources_per_worker=resources,
        placement_strategy=t.placement_strategy,
    )


def make_job(
    cfg: Config,
    manifest: Manifest,
    run: TrackedRun,
    storage_path: str | None = None,
    name: str | None = None,
    init=None,
    log=print,
) -> TrainJob:
    storage_dir = storage_dir_of(cfg, storage_path, name)
    drill_on = cfg.train.fail_at_epoch is not None and "://" not in storage_dir
    drill = f"{storage_dir}/.fault-drill-done" if drill_on else None
    plan = sampling_plan(cfg, manifest, log)
    if run is not None and plan.active:
        run.log_params({"sampling.expected_epoch_images": round(plan.expected_images)})
    return TrainJob(
        cfg,
        manifest,
        run,
        storage_dir,
        checkpoint_in_place=cfg.train.num_workers == 0,
        drill_marker=drill,
        plan=plan,
        init=init,
    )


def plain_print_in_workers() -> None:
    """Train V2 patches print() in workers to both log and tee it, so every worker line reached the
    driver twice. Plain print keeps one copy; Ray forwards this variable to the workers."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def data_task_runtime_env() -> dict | None:
    """The runtime environment Ray Data's tasks for a ``TorchTrainer`` run with: Ray Train starts
    its controller with ``{"env_vars": ...}`` (the driver's variables it propagates, and one of its
    own), and the dataset coordinators and their tasks inherit it. None when this Ray does not say
    (its internals moved): nothing is prestarted then."""
    try:
        from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR as key
        from ray.train.v2._internal.constants import DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE as value
        from ray.train.v2._internal.constants import get_env_vars_to_propagate
    except ImportError:
        return None
    plain_print_in_workers()  # one of the variables it propagates, set before the trainer is built
    env = get_env_vars_to_propagate()
    env.setdefault(key, value)  # as DataParallelTrainer._initialize_and_run_controller sets it
    return {"env_vars": env}


def prestart_data_workers(cfg: Config, manifest: Manifest) -> None:
    """Prestart the processes the first epoch's decode tasks will run in (``prestart_decode_workers``):
    as many as decode tasks can run at once beside the workers, at most one per training row group.
    Local mode (no workers) trains in the driver, whose tasks need no prestart to matter."""
    import ray

    from ..data.ingest import prestart_decode_workers

    t, d = cfg.train, cfg.data
    if t.num_workers == 0 or not d.prestart_workers or (env := data_task_runtime_env()) is None:
        return
    free = ray.cluster_resources().get("CPU", 0) - t.num_workers * t.cpus_per_worker
    per_group = int(manifest.options.get("row_group_size") or 256)  # what prepare wrote (256 by default)
    groups = sum(math.ceil(s.num_rows / per_group) for s in manifest.shards if s.split == "train")
    prestart_decode_workers(max(min(int(free / d.map_cpus), groups), 0), d.map_cpus, env)


def sampling_plan(cfg: Config, manifest: Manifest, log=print):
    """The training split's sampling plan (``data.sampling``), from its labels."""
    from ..data.sampling import SamplingPlan, plan_sampling, read_split_labels

    d, seed = cfg.data, cfg.train.seed
    if d.sampling == "none":
        return SamplingPlan(seed=seed, expected_images=float(manifest.split("train").num_images))
    from ..metrics import group_means

    labels, masks = read_split_labels(manifest.shard_paths("train"))
    plan = plan_sampling(d.sampling, labels, masks, d.repeat_threshold, seed)
    before, after = (
        group_means(freq, manifest.group_list(), empty=0.0) for freq in (plan.natural_freq, plan.target_freq)
    )
    log(
        f"[train] {d.sampling} sampling: about {plan.expected_images:.0f} images per epoch "
        f"(split: {len(labels)}); mean positive rate of tail classes {before['tail']:.4f} "
        f"-> {after['tail']:.4f}, head {before['head']:.4f} -> {after['head']:.4f}"
    )
    return plan


def user_error_of_workers(exc: BaseException) -> BaseException:
    """A user mistake a training worker found (a weights file its node cannot see, a bad shard)
    as that ``UserError``, naming the first rank that raised it: one line on the CLI and in the
    run's end reason, not "WorkerGroupError: Training failed due to worker errors:" and a traceback."""
    failures = getattr(exc, "worker_failures", None) or {}
    for rank, failure in sorted(failures.items()):
        if isinstance(failure, UserError):
            found = UserError(f"{failure} (training worker rank {rank})", field=failure.field)
            found.__cause__ = exc
            return found
    return exc


def fit_interruptibly(trainer):
    """``trainer.fit()`` where Ctrl-C and SIGTERM reach the caller as KeyboardInterrupt, and a
    worker's ``UserError`` as itself.

    Called from the main thread, Ray Train installs its own SIGINT handler, which aborts the run
    and exits the process without a word; from another thread (as in a Tune trial) it does not.
    So the driver fits in a thread and waits: a signal then interrupts the wait, the run is closed
    as KILLED, and the process ends, taking the job's Ray actors with it."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        try:
            return trainer.fit()
        except Exception as exc:
            raise user_error_of_workers(exc)  # noqa: B904 - it is exc, or names exc as its cause
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in outcome:
        raise user_error_of_workers(outcome["error"])
    return outcome["result"]


@contextlib.contextmanager
def run_ends_if_this_fails(run: TrackedRun, log=print, stopping=None, failed: str = "training failed", before_end=None):
    """A failure in the block ends ``run`` FAILED (``"<failed>: <error>"``), or KILLED when
    interrupted or terminated, with the reason, and is raised on; a run already ended (by a guard
    inside) is left as it is. ``stopping``: whether a failure is only the caller stopping the run
    on purpose (Tune stopping a trial); the run is then left for the caller to close.
    ``before_end(status, reason)``: what must end first, such as a sweep's running trials."""
    try:
        yield
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        status, reason = (
            ("KILLED", str(exc) or "interrupted") if interrupted else ("FAILED", f"{failed}: {first_line(exc)}")
        )
        if before_end is not None:
            before_end(status, reason)
        if run.ended is not None:  # a guard inside ended it, with its own reason
            raise
        if not interrupted and stopping is not None and stopping():
            log(f"[train] stopped on purpose ({first_line(exc)}); the run is left for the caller to close")
        else:
            run.finish(status, reason)
        raise


def fit_and_log(job: TrainJob, log=print, stopping=None, **trainer_options) -> dict:
    """Build the trainer and fit, then the one post-fit path: the best checkpoint's model and
    metrics are logged and the run ends FINISHED. Any failure on the way ends it FAILED (KILLED
    when interrupted or terminated), with the reason. ``stopping``: whether a failure is only the
    caller stopping this fit on purpose (Tune stopping a trial); the run is then left for the
    caller to close."""
    from .checkpoints import (
        best_checkpoint_state,
        prune_unregistered_checkpoints,
        set_aside_checkpoints_of_another_run,
        set_aside_stale_ray_snapshot,
    )

    with run_ends_if_this_fails(job.run, log, stopping):
        if note := set_aside_checkpoints_of_another_run(job.storage_dir, job.run.run_id):
            log(note)
        while True:
            if note := set_aside_stale_ray_snapshot(job.storage_dir):
                log(note)
            try:
                result = fit_interruptibly(build_trainer(job, **trainer_options))
                if result.error:
                    raise result.error
                break
            except Exception:
                smaller = rescaled_after_node_loss(job, log)
                if smaller is None:
                    raise
                job = smaller
    state = best_checkpoint_state(result, job.storage_dir, job.run.run_id)
    prune_unregistered_checkpoints(result)
    return log_best(job, state, log)


def rescaled_after_node_loss(job: TrainJob, log=print) -> TrainJob | None:
    """After a failed fit: when the cluster has shrunk (a node left) so that the workers would
    hold every CPU left, the same job with fewer CPUs per worker, resuming from its newest
    checkpoint in the same MLflow run; None when that is not why it failed or nothing would fit."""
    import copy

    import ray

    if not ray.is_initialized():
        return None
    have = ray.cluster_resources()
    cpus = cpus_per_worker_that_fit(job.cfg, have)
    if cpus is None:
        return None
    before = job.cfg.train.cpus_per_worker
    cfg = copy.deepcopy(job.cfg)
    cfg.train.cpus_per_worker = cpus
    note = (
        f"the cluster shrank to {have.get('CPU', 0):g} CPU (a node left): continuing with train.cpus_per_worker "
        f"{before:g} -> {cpus:g}, leaving {cfg.data.map_cpus:g} for Ray Data"
    )
    log(f"[train] {note}")
    job.run.set_tags({"ralflow.rescaled": note})
    return dataclasses.replace(job, cfg=cfg)


def model_weights(state: dict):
    """The checkpoint's weights that were scored: EMA's when the epoch selected them."""
    return state["ema"] if state["metrics"].get("ema_selected") == 1.0 and "ema" in state else state["model"]


def fit_decision_layer(cfg: Config, val_outputs: dict | None, names, log=print, counts=(), n_train: int = 0):
    """(calibration, {label: threshold} or None), fitted on the best epoch's validation outputs;
    the calibration includes the logit adjustment (by the training split's class ``counts``)."""
    import numpy as np

    from ..calibration import (
        adjust_logits,
        apply_calibration,
        fit_calibration,
        fit_logit_adjustment,
        fit_thresholds,
        macro_f1,
    )

    if not val_outputs or not len(val_outputs["probs"]):
        return {"method": "none"}, None
    probs, targets, masks = val_outputs["probs"], val_outputs["targets"], val_outputs["masks"]
    adjustment = None
    if cfg.train.logit_adjust or cfg.train.logit_adjust_tau is not None:
        prior = np.asarray(counts, np.float64) / max(n_train, 1)
        adjustment = fit_logit_adjustment(probs, targets, masks, prior, cfg.train.logit_adjust_tau)
        log(
            f"[train] logit adjustment: tau {adjustment['tau']:g} "
            f"(validation macro F1 at 0.5: {macro_f1(probs, targets, masks):.4f} "
            f"-> {adjustment['macro_f1_at_0.5']:.4f})"
        )
    calibration = fit_calibration(cfg.train.calibration, adjust_logits(probs, adjustment), targets, masks)
    if adjustment:
        calibration["logit_adjust"] = adjustment
    cuts = fit_thresholds(cfg.train.thresholds, apply_calibration(calibration, probs), targets, masks)
    thresholds = dict(zip(names, cuts)) if cuts else None
    detail = f" (T={calibration['temperature']:.3f})" if calibration["method"] == "temperature" else ""
    log(
        f"[train] fitted on {len(probs)} validation images: calibration {calibration['method']}{detail}, "
        f"thresholds {cfg.train.thresholds}"
    )
    return calibration, thresholds


def log_best(job: TrainJob, state: dict, log=print) -> dict:
    """Log the best epoch's model, summary metrics and per-class AP artifacts; close the run."""
    import tempfile

    from ..models.card import model_card

    cfg, manifest, run = job.cfg, job.manifest, job.run
    names, counts, groups = manifest.label_names, manifest.class_counts("train"), manifest.group_list()
    best = {f"best_{k}": v for k, v in state["metrics"].items() if k.startswith("val_")}
    best["best_epoch"] = state["epoch"] + 1
    run.log_metrics(best)
    ap = [float("nan") if a is None else a for a in state["per_class_ap"]]
    m = state["metrics"]
    with tempfile.TemporaryDirectory() as tmp:
        title = f"{cfg.loss.name} / {cfg.model.name}: val mAP {m['val_mAP']:.3f} (epoch {state['epoch'] + 1})"
        per_class_chart(names, ap, counts, groups, Path(tmp) / "per_class_ap.png", title)
        run.log_file(Path(tmp) / "per_class_ap.png", "evaluation")
    run.log_files({"per_class_ap.csv": per_class_table(names, ap, counts, groups)}, "evaluation")
    if not run.has_model():
        calibration, thresholds = fit_decision_layer(
            cfg, state.get("val_outputs"), names, log, counts, manifest.split("train").num_images
        )
        card = model_card(
            model_name=cfg.model.name,
            loss=cfg.loss.name,
            run_id=run.run_id,
            dataset={
                "source": manifest.source.get("root", ""),
                "format": manifest.source.get("format", ""),
                "dataset_sha256": manifest.dataset_sha256,
                "num_train": manifest.split("train").num_images,
                "num_val": manifest.split("val").num_images,
            },
            label_names=names,
            groups=groups,
            train_counts=counts,
            per_class_ap=ap,
            metrics=m,
            epoch=state["epoch"] + 1,
            image_size=cfg.data.image_size,
            thresholds=thresholds,
            calibration=calibration,
        )
        m_ = cfg.model
        weights = model_weights(state)
        if "ema" in state:  # the better of raw and EMA weights at the best epoch (loop.select_weights)
            chosen = "ema" if weights is state["ema"] else "raw"
            run.set_tags({"ralflow.weights": chosen})
            log(
                f"[train] logging the {chosen} weights "
                f"(val mAP raw {fmt(m.get('val_mAP_raw'))}, ema {fmt(m.get('val_mAP_ema'))})"
            )
        run.log_model(
            weights, m_.name, m_.in_chans, cfg.data.image_size, names, card, calibration, thresholds, m_.head,
            m_.head_lambda,
        )  # fmt: skip
        if adjustment := calibration.get("logit_adjust"):
            run.log_metrics({"logit_adjust_tau": adjustment["tau"]})
    run.finish("FINISHED")
    if restarts := run.restarts():  # after a worker failure or a rerun of the same run name
        log(
            f"[train] this MLflow run resumed {len(restarts)}x, from the checkpoints of epochs "
            f"{', '.join(map(str, restarts))} (MLflow metric restart_from_epoch)"
        )
    log(
        f"[train] best epoch {state['epoch'] + 1}: val mAP {fmt(m['val_mAP'])} (head {fmt(m['val_mAP_head'])}, "
        f"medium {fmt(m['val_mAP_medium'])}, tail {fmt(m['val_mAP_tail'])}); model logged to runs:/{run.run_id}/model"
    )
    return {"run_id": run.run_id, **best}


def run_training(cfg: Config, address: str | None = None, log=print) -> dict:
    """The whole ``ralflow train`` job: checks, MLflow run, Ray Train fit, model + artifacts."""
    from ..runtime import check_shared_path, init_ray

    manifest = load_dataset(cfg, log)
    check_tracking_uri(cfg.tracking.tracking_uri)  # an unreachable server fails before Ray starts
    init_ray(address, log=log)
    check_resources(cfg, log)
    check_shared_path(cfg.tracking.storage_path, "tracking.storage_path", field="tracking.storage_path")
    if (sqlite_dir := sqlite_folder(cfg.tracking.tracking_uri)) is not None:
        check_shared_path(str(sqlite_dir), "the SQLite tracking store in", field="tracking.tracking_uri")
    init = load_init_weights(cfg, manifest, log)
    # from the moment the run exists to its end, Ctrl-C or a failure ends it saying why
    with opened_run(cfg, manifest, log, extra_tags=init.tags(cfg.train.head_only) if init else None) as run:
        run.hold()  # a second `train` of this run name is refused while this one lives
        job = make_job(cfg, manifest, run, init=init, log=log)
        prestart_data_workers(cfg, manifest)
        return fit_and_log(job, log)
