"""Robust runs (issue 15), the parts that need no training: run identity, resources on a
fixed-size Ray, manifest verification, the stall watchdog, and a crashed or interrupted run
ending with its reason."""

from __future__ import annotations

import json
import os
import time
import types

import pytest

from components.config import load_config
from components.data.manifest import Manifest
from components.data.prepare import PrepareOptions, prepare_dataset
from components.errors import UserError
from components.tracking import TrackedRun

from . import formats


@pytest.fixture
def dataset(tmp_path):
    formats.cxr_lt_2023(tmp_path / "src")
    opts = PrepareOptions("cxr-lt-2023", str(tmp_path / "src"), image_size=32, rows_per_shard=4)
    prepare_dataset(opts, tmp_path / "data", log=lambda *_: None)
    return tmp_path / "data"


@pytest.fixture
def sweep_cfg(dataset, tmp_path, monkeypatch):
    """A config of `dataset` with a SQLite store in tmp_path; what a sweep asks of Ray is answered
    without one (it fits)."""
    import components.runtime as runtime
    import components.tune.sweep as sweep

    for module, name in ((runtime, "init_ray"), (runtime, "check_shared_path"), (sweep, "trials_per_cluster"),
                         (sweep, "check_resources")):  # fmt: skip
        monkeypatch.setattr(module, name, lambda *a, **k: 1)
    return load_config(None, {"data": {"path": str(dataset), "image_size": 32}, "model": {"name": "resnet10t"},
                              "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                                           "storage_path": str(tmp_path / "runs")}})  # fmt: skip


def test_a_resumed_run_must_have_the_same_dataset_and_storage(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    identity = {"ralflow.dataset_sha256": "a" * 64, "ralflow.storage": "/runs/r1"}
    first = TrackedRun.open(uri, "ralflow", "r1", identity, identity)
    first.finish("FINISHED")
    again = TrackedRun.open(uri, "ralflow", "r1", identity, identity)  # same: resumed
    assert again.run_id == first.run_id and again.resumed
    again.finish("KILLED", "interrupted")
    # resumed after an interrupt, then finished: FINISHED says it all; the interrupt is history
    third = TrackedRun.open(uri, "ralflow", "r1", identity, identity)
    tags = third.get().data.tags
    assert "ralflow.end_reason" not in tags and tags["ralflow.resumed_after"] == "KILLED: interrupted"
    third.finish("FINISHED")
    run = third.get()
    assert run.info.status == "FINISHED" and "ralflow.end_reason" not in run.data.tags
    moved = {**identity, "ralflow.storage": "/elsewhere/r1"}
    with pytest.raises(UserError, match=r"has ralflow.storage=/runs/r1, not /elsewhere/r1; resume it with the same"):
        TrackedRun.open(uri, "ralflow", "r1", moved, moved)
    assert first.get().info.status == "FINISHED"  # refused before anything was touched


def test_artifacts_of_a_sqlite_store_go_beside_it_not_into_the_working_folder(tmp_path, monkeypatch):
    for folder in ("elsewhere", "store"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the command runs in one folder, the store is in another
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    run = TrackedRun.create(uri, "my sweep/1", "r1")
    run.log_files({"notes.txt": "hello"})
    (logged,) = (tmp_path / "store" / "mlruns" / "my_sweep_1").rglob("notes.txt")
    assert logged.read_text() == "hello" and not (tmp_path / "elsewhere" / "mlruns").exists()


def test_a_sqlite_store_in_a_missing_folder_is_refused_naming_it(tmp_path):
    from components.tracking import check_tracking_uri, sqlite_folder

    assert sqlite_folder("http://mlflow:5000") is None
    check_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")  # the folder exists: accepted
    with pytest.raises(UserError, match=f"folder {tmp_path}/nowhere does not exist") as err:
        check_tracking_uri(f"sqlite:///{tmp_path}/nowhere/mlflow.db")
    assert err.value.field == "tracking.tracking_uri"


def test_the_default_run_name_follows_the_dataset_content(dataset):
    from components.train.trainer import load_dataset

    cfg = load_config(None, {"data": {"path": str(dataset)}, "model": {"name": "resnet10t"}})
    load_dataset(cfg)
    manifest = Manifest.load(dataset)
    assert cfg.tracking.run_name == cfg.default_run_name(manifest.dataset_sha256)
    assert cfg.default_run_name("f" * 64) != cfg.tracking.run_name  # rebuilt data in the same folder: a new run


def test_a_run_that_cannot_fit_the_embedded_ray_is_refused(monkeypatch):
    import ray

    import components.runtime as runtime
    from components.train.resources import check_resources, resources_needed

    cfg = load_config(None, {"train": {"num_workers": 1, "cpus_per_worker": 2}})
    assert resources_needed(cfg) == {"CPU": 2.5}  # the worker, and one Ray Data decode task
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(runtime, "_embedded", True)
    with pytest.raises(UserError, match=r"needs 2.5 CPU \(the cluster has 2\) on this machine; lower them") as err:
        check_resources(cfg)
    assert err.value.field == "train.cpus_per_worker"
    monkeypatch.setattr(runtime, "_embedded", False)  # a cluster may grow: say what it waits for
    said = []
    check_resources(cfg, said.append)
    assert said and said[0].startswith("[train] waiting for resources: the run needs 2.5 CPU")
    check_resources(load_config(None, {"train": {"num_workers": 1, "cpus_per_worker": 1}}), said.append)
    assert len(said) == 1  # a run that fits says nothing


def test_serve_replicas_on_a_cluster_say_what_they_wait_for(monkeypatch):
    import ray

    import components.runtime as runtime
    from components.serve import ServeOptions, check_replicas_fit

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "GPU": 1.0})
    monkeypatch.setattr(runtime, "_embedded", False)
    said = []
    check_replicas_fit(ServeOptions("cxr", replicas=2, cpus_per_replica=2), True, said.append)
    assert said == ["serve: waiting for resources: 2 replica(s) need 2 GPU (the cluster has 1); an autoscaling "
                    "cluster adds nodes"]  # fmt: skip
    check_replicas_fit(ServeOptions("cxr", replicas=4, cpus_per_replica=1), False, said.append)
    assert len(said) == 1  # replicas that fit say nothing


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m, d: m.update(dataset_sha256="0" * 64), "dataset_sha256 does not match"),
        (lambda m, d: m["shards"][0].update(sha256="0" * 64), "dataset_sha256 does not match"),
        (lambda m, d: m.update(image_size=64), "images are 32x32 px but manifest.json says image_size 64"),
        (lambda m, d: (d / "train-00000.parquet").write_bytes(b"corrupt"), "train-00000.parquet: its SHA-256 differs"),
    ],
)
def test_an_edited_manifest_or_a_corrupt_shard_is_refused(dataset, edit, match):
    m = json.loads((dataset / "manifest.json").read_text())
    edit(m, dataset)
    (dataset / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match=match):
        Manifest.load(dataset).verify(full=True)


def test_shards_are_hashed_once_per_version(dataset, monkeypatch, tmp_path):
    import components.data.manifest as manifest_module

    manifest = Manifest.load(dataset)
    assert manifest.verify() == len(manifest.shards)
    assert manifest.verify() == 0  # remembered by size and modification time
    assert manifest.verify(full=True) == len(manifest.shards)
    # a dataset this user cannot write (a read-only mount) is remembered in the user's cache instead
    (dataset / manifest_module.VERIFIED).unlink()
    write = manifest_module.write_text_atomically

    def read_only_beside_the_dataset(path, text):
        if path.parent == dataset:
            raise PermissionError(13, "Permission denied", str(path))
        write(path, text)

    monkeypatch.setattr(manifest_module, "write_text_atomically", read_only_beside_the_dataset)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert manifest.verify() == len(manifest.shards) and manifest.verify() == 0
    assert not (dataset / manifest_module.VERIFIED).exists()
    shard = dataset / manifest.shards[0].path
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")  # a new version of the file
    with pytest.raises(UserError, match="its SHA-256 differs"):
        manifest.verify()


def test_a_new_run_does_not_adopt_the_checkpoints_of_a_deleted_one(tmp_path):
    """A run deleted in MLflow, then the same `ralflow train` again: the new run resumed from the
    deleted run's checkpoints (Ray restored its snapshot) and logged no epoch of its own. The
    folder is now moved aside whole and the new run trains from scratch; its own are resumed."""
    from components.train.checkpoints import OWNER_FILE, save_state, set_aside_checkpoints_of_another_run

    storage = tmp_path / "runs" / "ral-resnet10t-abc"
    save_state({"run_id": "deleted", "epoch": 0}, storage / "epoch-0000")
    save_state({"run_id": "deleted", "epoch": 1}, storage / "epoch-0001")
    (storage / "checkpoint_manager_snapshot.json").write_text("{}")
    (storage / "epoch-0001" / OWNER_FILE).unlink()  # written before the owner file existed: read from the state
    assert set_aside_checkpoints_of_another_run(str(storage), "deleted") is None  # its own: resumed
    note = set_aside_checkpoints_of_another_run(str(storage), "new")
    aside = tmp_path / "runs" / "ral-resnet10t-abc.of-run-deleted"
    assert note.endswith(f"moved to {aside}; training starts fresh") and not storage.exists()
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint_manager_snapshot.json", "epoch-0000", "epoch-0001"]
    save_state({"run_id": "deleted", "epoch": 0}, storage / "epoch-0000")  # once more: kept beside the first
    assert set_aside_checkpoints_of_another_run(str(storage), "new") and len(list(aside.parent.iterdir())) == 2
    assert set_aside_checkpoints_of_another_run(str(tmp_path / "nothing-here"), "new") is None


def test_the_stall_watchdog_says_what_training_waits_for():
    from components.train.loop import StallWatchdog

    said = []

    def say(msg, flush=False):
        said.append(msg)

    with StallWatchdog(0.2, rank=1, describe=lambda: "Free now: 0 of 2 CPU", say=say) as dog:
        time.sleep(0.6)
        assert len(said) == 1  # once per stall
        dog.batch()
        time.sleep(0.1)
        assert len(said) == 1  # batches are flowing again
    assert said[0].startswith("[train] worker 1: no training batch for") and said[0].endswith("Free now: 0 of 2 CPU")


def test_the_watchdog_ends_a_worker_that_can_never_get_data():
    from components.train.loop import StallWatchdog
    from components.train.resources import ClusterTooSmall

    said, ended = [], []

    def check():
        raise ClusterTooSmall("the cluster is now too small for this run")

    say = lambda msg, flush=False: said.append(msg)  # noqa: E731
    with StallWatchdog(0.2, rank=0, describe=lambda: "", say=say, check=check, end=ended.append):
        time.sleep(0.6)
    assert ended == [1] and said[-1] == "[train] worker 0 gives up waiting: the cluster is now too small for this run"
    ended.clear()
    with StallWatchdog(0.2, rank=0, describe=lambda: "", say=say, check=lambda: None, end=ended.append):
        time.sleep(0.4)
    assert ended == []  # room for data: a stall that can still end only warns


def test_after_a_node_loss_the_workers_leave_room_for_ray_data():
    from components.train.resources import ClusterTooSmall, check_room_for_data, cpus_per_worker_that_fit

    cfg = load_config(None, {"train": {"num_workers": 2, "cpus_per_worker": 0.5}, "data": {"map_cpus": 0.5}})
    two_nodes, one_left = {"CPU": 2.0}, {"CPU": 1.0}
    check_room_for_data(cfg, two_nodes)
    with pytest.raises(ClusterTooSmall, match=r"needs 1.5 CPU \(the cluster has 1\).*a node has probably left"):
        check_room_for_data(cfg, one_left)
    assert cpus_per_worker_that_fit(cfg, two_nodes) is None  # fits: nothing to change
    assert cpus_per_worker_that_fit(cfg, one_left) == 0.25  # (1 - 0.5 for Ray Data) / 2 workers
    assert cpus_per_worker_that_fit(cfg, {"CPU": 1.3}) == 0.4  # multiples of 0.05, rounded down
    assert cpus_per_worker_that_fit(cfg, {"CPU": 0.55}) is None  # not even 0.05 each: fail, clearly
    gpu = load_config(None, {"train": {"num_workers": 2, "use_gpu": True}})
    assert cpus_per_worker_that_fit(gpu, {"CPU": 1.0, "GPU": 1.0}) is None  # a GPU short: fewer CPUs cannot help
    check_room_for_data(load_config(None, {"train": {"num_workers": 0}}), {"CPU": 0.0})  # local mode: the driver


def test_a_fit_that_failed_because_a_node_left_continues_with_fewer_cpus(tmp_path, monkeypatch):
    import ray

    import components.train.trainer as trainer

    run = TrackedRun.create(f"sqlite:///{tmp_path}/mlflow.db", "ralflow", "shrunk")
    cfg = load_config(None, {"train": {"num_workers": 2, "cpus_per_worker": 0.5}})
    fits = []

    def build(job, **kw):
        def fit():
            fits.append(job.cfg.train.cpus_per_worker)
            if len(fits) == 1:
                raise RuntimeError("worker group failed: the cluster is now too small")
            raise KeyboardInterrupt  # the second fit ran: stop here, before the post-fit path

        return types.SimpleNamespace(fit=fit)

    monkeypatch.setattr(trainer, "build_trainer", build)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0})
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    said = []
    job = trainer.TrainJob(cfg, None, run, str(tmp_path), checkpoint_in_place=False)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit_and_log(job, log=said.append)
    assert fits == [0.5, 0.25] and cfg.train.cpus_per_worker == 0.5  # the caller's config is left as it was
    assert "continuing with train.cpus_per_worker 0.5 -> 0.25" in said[-1]
    assert "0.5 -> 0.25" in run.get().data.tags["ralflow.rescaled"]
    fits.clear()
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})  # it fits: not why it failed
    run = TrackedRun(run.tracking_uri, run.run_id)  # the run reopened (the one above ended KILLED)
    with pytest.raises(RuntimeError, match="worker group failed"):
        trainer.fit_and_log(trainer.TrainJob(cfg, None, run, str(tmp_path), False), log=said.append)
    assert fits == [0.5] and run.get().info.status == "FAILED"


def test_a_failed_or_interrupted_fit_ends_the_run_with_its_reason(tmp_path, monkeypatch):
    import components.train.trainer as trainer

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for raised, status, reason in (
        (RuntimeError("worker group failed\nmore"), "FAILED", "training failed: RuntimeError: worker group failed"),
        (KeyboardInterrupt(), "KILLED", "interrupted"),
    ):
        run = TrackedRun.create(uri, "ralflow", f"r-{status}")

        def build(job, raised=raised, **kw):
            def fit():
                raise raised

            return types.SimpleNamespace(fit=fit)

        monkeypatch.setattr(trainer, "build_trainer", build)
        job = types.SimpleNamespace(run=run, storage_dir=str(tmp_path), cfg=load_config(None, {}))
        with pytest.raises(type(raised)):
            trainer.fit_and_log(job, log=lambda *_: None)
        got = run.get()
        assert got.info.status == status and got.data.tags["ralflow.end_reason"] == reason


@pytest.mark.parametrize("what", ["train", "sweep"])
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupt_while_mlflow_creates_the_run_still_ends_it_killed(sweep_cfg, monkeypatch, what, sig):
    """Seen in CI: Ctrl-C as soon as a training run appeared in MLflow left it RUNNING; the signal
    had landed while the run was being created, before anything could close it. Here the signal
    arrives just after MLflow wrote the run (training's run or a sweep's parent) and before the
    call that creates it returns."""
    import signal

    import ray

    import components.train.trainer as trainer
    import components.tune.sweep as sweep
    from components.runtime import Terminated, raise_terminated

    cfg, uri = sweep_cfg, sweep_cfg.tracking.tracking_uri
    create, shutdowns = TrackedRun.create.__func__, []

    def create_then_signal(cls, *args, **kwargs):
        run = create(cls, *args, **kwargs)
        signal.raise_signal(getattr(signal, sig))
        return run

    monkeypatch.setattr(TrackedRun, "create", classmethod(create_then_signal))
    before = signal.signal(signal.SIGTERM, raise_terminated)  # as `ralflow` sets it
    try:
        with pytest.raises(Terminated if sig == "SIGTERM" else KeyboardInterrupt):
            if what == "train":
                manifest = trainer.load_dataset(cfg, log=lambda *_: None)
                with trainer.opened_run(cfg, manifest, log=lambda *_: None):
                    pytest.fail("the block must not start: the held signal is delivered first")
            else:
                # the interrupted sweep disconnects from Ray; not here: the session's shared Ray lives on
                monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(1))
                sweep.run_sweep(cfg, sweep.SweepOptions(num_samples=1, max_epochs=1, name="s"), log=lambda *_: None)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back
    import mlflow

    c = mlflow.MlflowClient(uri)
    (run,) = c.search_runs([c.get_experiment_by_name("ralflow").experiment_id])
    reason = "terminated (SIGTERM)" if sig == "SIGTERM" else "interrupted"
    assert (run.info.status, run.data.tags["ralflow.end_reason"]) == ("KILLED", reason)
    assert shutdowns == ([1] if what == "sweep" else [])  # the sweep's own handler ran


def test_a_signal_python_dropped_is_sent_again_and_stops_what_runs(monkeypatch):
    """Seen in CI: Ctrl-C landed while SQLAlchemy ran a weakref callback; Python printed
    "Exception ignored ... KeyboardInterrupt" and dropped it, and the run trained all 30 epochs.
    The CLI sends a dropped signal again, so it stops whatever runs then (here a sleep standing for
    a fit, a sweep or a model being logged); an interrupt raised as usual is not sent again (it
    would stop a later command in the same process)."""
    import signal
    import sys

    import components.runtime as runtime

    printed = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: printed.append(unraisable.exc_type))
    runtime.redeliver_dropped_interrupts()
    runtime.redeliver_dropped_interrupts()  # wraps the hook once, however often a process runs commands
    before = signal.signal(signal.SIGTERM, runtime.raise_terminated)  # as the CLI has it

    class Finalized:
        def __del__(self):  # SIGTERM lands here, where Python cannot raise it
            runtime.raise_terminated(None, None)

    try:
        t0 = time.monotonic()
        with pytest.raises(runtime.Terminated):
            Finalized()
            assert printed == [runtime.Terminated]  # Python's "Exception ignored in ..." still says so
            time.sleep(5)
        assert time.monotonic() - t0 < 4  # raised in the sleep, not after it
        with pytest.raises(runtime.Terminated):
            runtime.raise_terminated(None, None)  # raised as usual: not sent again
        time.sleep(4 * runtime.REDELIVER_AFTER_S)
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_run_already_ended_inside_is_left_as_it_ended(tmp_path):
    """`ralflow train` guards its run from creation to the end, around the fit's own guard: the
    outer guard must not end again a run that the inner one, or the finished post-fit path, ended."""
    from components.train.trainer import run_ends_if_this_fails

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for inner, status, reason in (("FINISHED", "FINISHED", None), ("KILLED", "KILLED", "interrupted")):
        run = TrackedRun.create(uri, "ralflow", f"r-{inner}")
        with pytest.raises(RuntimeError), run_ends_if_this_fails(run, log=lambda *_: None):
            run.finish(inner, reason)
            raise RuntimeError("after the run ended")
        got = run.get()
        assert (got.info.status, got.data.tags.get("ralflow.end_reason")) == (status, reason)


def test_a_fit_stopped_on_purpose_leaves_its_run_to_the_caller(tmp_path, monkeypatch):
    """A Tune trial that Tune stops fails on its way out (its Train controller dies with it): that
    failure is not written, the sweep closes the run. Outside a Tune session nothing is stopping."""
    import components.train.trainer as trainer
    from components.tune.sweep import tune_is_stopping

    def build(job, **kw):
        def fit():
            raise RuntimeError("ActorDiedError: the controller died")

        return types.SimpleNamespace(fit=fit)

    monkeypatch.setattr(trainer, "build_trainer", build)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for stopping, status in ((lambda: True, "RUNNING"), (tune_is_stopping, "FAILED")):
        run = TrackedRun.create(uri, "ralflow", f"r-{status}")
        job = types.SimpleNamespace(run=run, storage_dir=str(tmp_path), cfg=load_config(None, {}))
        with pytest.raises(RuntimeError):
            trainer.fit_and_log(job, lambda *_: None, stopping)
        assert run.get().info.status == status


def test_a_user_mistake_a_worker_finds_ends_the_run_saying_what_it_is(tmp_path, monkeypatch):
    """A worker's UserError (a weights file its node cannot see) reached the CLI as a traceback of
    "WorkerGroupError: Training failed due to worker errors:", the run's whole end reason. Now it
    is that UserError, naming the rank, in the driver's thread and in a Tune trial's alike."""
    import threading

    import ray.train

    import components.train.trainer as trainer

    def build(job, **kw):
        def fit():
            failures = {1: UserError("model.pretrained_path /w.pt: file not found", field="model.pretrained_path"),
                        0: RuntimeError("the process group broke after rank 1 left")}  # fmt: skip
            raise ray.train.WorkerGroupError("Traceback ...", failures)

        return types.SimpleNamespace(fit=fit)

    monkeypatch.setattr(trainer, "build_trainer", build)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for where in ("main", "trial"):
        run = TrackedRun.create(uri, "ralflow", f"r-{where}")
        job = types.SimpleNamespace(run=run, storage_dir=str(tmp_path), cfg=load_config(None, {}))
        raised = []

        def fit_and_keep(job=job, raised=raised):
            try:
                trainer.fit_and_log(job, lambda *_: None)
            except BaseException as error:  # checked below, in the test's thread
                raised.append(error)

        if where == "main":
            fit_and_keep()
        else:
            thread = threading.Thread(target=fit_and_keep)
            thread.start()
            thread.join()
        (exc,) = raised
        assert isinstance(exc, UserError) and exc.field == "model.pretrained_path"
        assert str(exc) == "model.pretrained_path /w.pt: file not found (training worker rank 1)"
        assert isinstance(exc.__cause__, ray.train.WorkerGroupError)
        got = run.get()
        assert got.info.status == "FAILED"
        assert got.data.tags["ralflow.end_reason"] == f"training failed: UserError: {exc}"

    other = ray.train.WorkerGroupError("Traceback ...", {0: RuntimeError("CUDA error: an illegal memory access")})
    assert trainer.user_error_of_workers(other) is other  # a bug keeps Ray's error and its traceback


@pytest.mark.parametrize("epochs", [1, 2, 3, 4, 8])
def test_asha_stops_trials_that_fall_behind_but_never_at_their_last_epoch(epochs):
    """A stop on the report that ends a trial's last epoch saves no training and cuts the trial
    off while it logs its model (in a real 3-trial sweep of 1 epoch, such a trial was recorded as
    stopped early). Of three trials, one falls behind from the start (ASHA stops it early) and one
    only in its last epoch (it runs on)."""
    from ray.tune.schedulers import TrialScheduler

    from components.tune.sweep import asha_scheduler

    scheduler = asha_scheduler(epochs, grace_epochs=1)
    if epochs == 1:
        assert scheduler is None  # nothing before the last epoch to compare at: every trial runs
        return
    scheduler.set_search_properties("val_mAP", "max")
    scores = {"steady": lambda e: 0.9, "behind": lambda e: 0.5, "fades-last": lambda e: 0.1 if e == epochs else 0.95}
    stops = {}
    for trial_id, score in scores.items():
        trial = types.SimpleNamespace(trial_id=trial_id)
        scheduler.on_trial_add(None, trial)
        for epoch in range(1, epochs + 1):
            if scheduler.on_trial_result(None, trial, {"epoch": epoch, "val_mAP": score(epoch)}) == TrialScheduler.STOP:
                stops[trial_id] = epoch
                break
    assert stops == {"behind": 1}, stops


def test_a_sweep_ends_its_trial_runs_by_tunes_verdict(tmp_path):
    """After the sweep, Tune's verdict decides how an open trial run ends; a stopped trial that
    wrote FAILED on its way out (seen in a real sweep) is KILLED as stopped early, and a run that
    ended by itself is left alone."""
    from components.tune.sweep import close_trial_runs

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cases = {  # name: (status before, Tune's row status, status after, reason after)
        "stopped": ("RUNNING", "ok", "KILLED", "stopped early by ASHA after 1 epoch(s)"),
        "stopped-said-failed": ("FAILED", "ok", "KILLED", "stopped early by ASHA after 1 epoch(s)"),
        "crashed": ("RUNNING", "error", "FAILED", "trial failed: RuntimeError: boom"),
        "crashed-said-so": ("FAILED", "error", "FAILED", "training failed: RuntimeError: boom"),
        "finished": ("FINISHED", "ok", "FINISHED", None),
    }
    rows, runs = [], {}
    for name, (before, verdict, _, _) in cases.items():
        runs[name] = run = TrackedRun.create(uri, "ralflow", name)
        if before != "RUNNING":
            run.finish(before, "training failed: RuntimeError: boom" if before == "FAILED" else None)
        rows.append({"run_id": run.run_id, "status": verdict, "epochs": 1, "error": "RuntimeError: boom"})
    rows.append({"run_id": "", "status": "error", "epochs": 0})  # a trial that never opened a run
    close_trial_runs(rows, uri)
    for name, (_, _, after, reason) in cases.items():
        got = runs[name].get()
        assert (got.info.status, got.data.tags.get("ralflow.end_reason")) == (after, reason), name
        assert ("ralflow.stopped_early" in got.data.tags) == name.startswith("stopped"), name


def test_runs_of_trials_tune_lost_are_tagged_ended_and_not_counted(tmp_path):
    """Seen on the 2-node cluster: a sweep killed outright just after a trial started, before Tune
    saved its state; the resumed sweep ran a new trial in its place and the experiment had four
    child runs for three trials. Runs of trials Tune does not know are tagged and closed; Tune's
    own trials, and another sweep's, are left alone."""
    from components.tune.sweep import LOST_TAG, set_apart_lost_trials

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = TrackedRun.create(uri, "ralflow", "s", {"ralflow.sweep_parent": "true"})
    runs = {}
    for sweep, trial_id, status in (("s", "t1", "FINISHED"), ("s", "t2", "RUNNING"), ("s", "gone1", "RUNNING"),
                                    ("s", "gone2", "FINISHED"), ("other", "t9", "RUNNING")):  # fmt: skip
        tags = {"ralflow.sweep": sweep, "ralflow.trial_id": trial_id, "mlflow.parentRunId": parent.run_id}
        runs[trial_id] = run = TrackedRun.create(uri, "ralflow", f"{sweep}-{trial_id}", tags)
        if status != "RUNNING":
            run.finish(status)
    said = []
    lost = set_apart_lost_trials(parent, "s", {"t1", "t2"}, said.append)
    assert sorted(lost) == ["s-gone1", "s-gone2"]
    assert said and "s-gone1" in said[0] and "s-gone2" in said[0]
    for trial_id, status, reason, tagged in (
        ("t1", "FINISHED", None, False),
        ("t2", "RUNNING", None, False),  # a trial of this sweep still going: the sweep ends it
        ("gone1", "KILLED", "trial lost: the sweep was killed before Tune saved it", True),
        ("gone2", "FINISHED", None, True),  # its result is kept, but it is not one of the sweep's trials
        ("t9", "RUNNING", None, False),
    ):
        got = runs[trial_id].get()
        assert (got.info.status, got.data.tags.get("ralflow.end_reason")) == (status, reason), trial_id
        assert (got.data.tags.get(LOST_TAG) == "true") == tagged, trial_id
    assert set_apart_lost_trials(parent, "s", {"t1", "t2", "gone1", "gone2"}, said.append) == []


def test_a_stale_ray_snapshot_is_set_aside_not_fatal(tmp_path):
    from components.train.checkpoints import RAY_SNAPSHOT, set_aside_stale_ray_snapshot

    (tmp_path / "epoch-0001").mkdir()
    snapshot = tmp_path / RAY_SNAPSHOT
    state = {"checkpoint_results": [{"checkpoint_dir_name": "epoch-0001", "metrics": {}}],
             "latest_checkpoint_result": {"checkpoint_dir_name": "epoch-0001", "metrics": {}}}  # fmt: skip
    snapshot.write_text(json.dumps(state))
    assert set_aside_stale_ray_snapshot(str(tmp_path)) is None and snapshot.exists()  # consistent: kept
    state["checkpoint_results"].append({"checkpoint_dir_name": "epoch-0002", "metrics": {}})
    snapshot.write_text(json.dumps(state))
    note = set_aside_stale_ray_snapshot(str(tmp_path))
    assert "names checkpoint folder(s) that are gone: epoch-0002" in note
    assert not snapshot.exists() and (tmp_path / f"{RAY_SNAPSHOT}.stale").exists()
    snapshot.write_text("{truncated")
    assert "is unreadable" in set_aside_stale_ray_snapshot(str(tmp_path))
    assert set_aside_stale_ray_snapshot(str(tmp_path / "no-run-yet")) is None


def test_predict_actors_must_leave_a_cpu_to_read_images(monkeypatch):
    """Actors holding every CPU leave none for the decode tasks and the job waits forever (seen:
    `predict --actors 2` on 2 CPUs); the embedded Ray refuses it, a cluster says what it waits for."""
    import ray

    import components.runtime as runtime
    from components.predict import check_actors_fit

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(runtime, "_embedded", True)
    check_actors_fit(1, False)  # 1 CPU for the model, 0.5 to read: fits
    with pytest.raises(UserError) as err:
        check_actors_fit(2, False)
    assert err.value.field == "actors" and str(err.value) == (
        "actors=2: 2 model actor(s) x 1 CPU each, and 0.5 CPU to read images, need 2.5 CPU (the cluster has 2) on "
        "this machine; lower --actors"
    )
    with pytest.raises(UserError, match=r"x 1 GPU each, .* need 1 GPU \(the cluster has 0\)"):
        check_actors_fit(1, True)
    monkeypatch.setattr(runtime, "_embedded", False)
    said = []
    check_actors_fit(4, False, said.append)
    assert said == ["predict: waiting for resources: 4 model actor(s) and a decode task need 4.5 CPU (the cluster "
                    "has 2); an autoscaling cluster adds nodes"]  # fmt: skip


def test_a_search_space_no_trial_could_run_is_refused_before_the_sweep_opens_a_run(sweep_cfg, tmp_path):
    import mlflow

    import components.tune.sweep as sweep

    space = tmp_path / "space.yaml"
    space.write_text("ral:\n  loss.nope: {uniform: [0.1, 1.0]}\n")
    opts = sweep.SweepOptions(num_samples=1, max_epochs=1, search_space=str(space))
    with pytest.raises(UserError, match="search space 'loss.nope' = 0.1: loss 'ral' has no parameter"):
        sweep.run_sweep(sweep_cfg, opts, log=lambda *_: None)
    exp = mlflow.MlflowClient(sweep_cfg.tracking.tracking_uri).get_experiment_by_name("ralflow")
    assert exp is None or mlflow.MlflowClient(sweep_cfg.tracking.tracking_uri).search_runs([exp.experiment_id]) == []


def test_a_refused_sweep_leaves_its_run_as_it_was_and_one_that_fails_to_start_ends_failed(sweep_cfg, monkeypatch):
    """Seen: `tune --num-workers 2 --cpus-per-worker 1` on 2 CPUs was refused after its parent run
    was opened, and that run stayed RUNNING; the same sweep run again without --resume reopened its
    FINISHED parent before refusing. Now what can refuse a sweep comes first, and a failure after
    the parent is open (here: building the Tuner) ends it FAILED with the reason."""
    import mlflow

    import components.tune.sweep as sweep

    cfg, uri = sweep_cfg, sweep_cfg.tracking.tracking_uri

    def too_big(cfg, log=print):
        raise UserError("train.num_workers 2 x train.cpus_per_worker 1 ... needs 2.5 CPU (the cluster has 2)")

    monkeypatch.setattr(sweep, "check_resources", too_big)
    with pytest.raises(UserError, match="needs 2.5 CPU"):
        sweep.run_sweep(cfg, sweep.SweepOptions(num_samples=1, max_epochs=1, name="big"), log=lambda *_: None)
    exp = mlflow.MlflowClient(uri).get_experiment_by_name("ralflow")
    assert exp is None or mlflow.MlflowClient(uri).search_runs([exp.experiment_id]) == []

    monkeypatch.setattr(sweep, "check_resources", lambda cfg, log=print: None)

    def no_tuner(*args, **kwargs):
        raise RuntimeError("the Tuner could not be built")

    monkeypatch.setattr(sweep, "build_tuner", no_tuner)
    with pytest.raises(RuntimeError):
        sweep.run_sweep(cfg, sweep.SweepOptions(num_samples=1, max_epochs=1, name="broken"), log=lambda *_: None)
    c = mlflow.MlflowClient(uri)
    (parent,) = c.search_runs([c.get_experiment_by_name("ralflow").experiment_id])
    assert parent.info.status == "FAILED"
    assert parent.data.tags["ralflow.end_reason"] == "sweep failed: RuntimeError: the Tuner could not be built"

    # The same sweep again without --resume, over its saved state: refused, its finished parent untouched
    from ray import tune

    c.set_terminated(parent.info.run_id, "FINISHED")
    monkeypatch.setattr(tune.Tuner, "can_restore", staticmethod(lambda path: path.endswith("/broken")))
    with pytest.raises(UserError, match="sweep 'broken' already exists under"):
        sweep.run_sweep(cfg, sweep.SweepOptions(num_samples=1, max_epochs=1, name="broken"), log=lambda *_: None)
    assert c.get_run(parent.info.run_id).info.status == "FINISHED"


def test_a_sweep_that_fails_after_its_trials_ends_its_parent_with_the_reason(sweep_cfg, monkeypatch):
    """What follows `tuner.fit()` (each trial's verdict, the best trial, the parent's artifacts) is
    inside the sweep's guard: a failure there ends the parent FAILED (it stayed RUNNING), and a
    sweep where no trial finished keeps the reason it ended with."""
    import types

    import mlflow

    import components.tune.sweep as sweep

    cfg, uri = sweep_cfg, sweep_cfg.tracking.tracking_uri
    monkeypatch.setattr(sweep, "build_tuner", lambda *a, **k: types.SimpleNamespace(fit=lambda: []))

    def unreadable(*args):
        raise RuntimeError("the trials' results could not be read")

    c = mlflow.MlflowClient(uri)
    for name, table, error, reason in (
        ("broken", unreadable, RuntimeError, "sweep failed: RuntimeError: the trials' results could not be read"),
        ("none", lambda *a: [], UserError, "no trial finished with a logged model (none finished)"),
    ):
        monkeypatch.setattr(sweep, "trials_table", table)
        with pytest.raises(error):
            sweep.run_sweep(cfg, sweep.SweepOptions(num_samples=1, max_epochs=1, name=name), log=lambda *_: None)
        (parent,) = c.search_runs(
            [c.get_experiment_by_name("ralflow").experiment_id], f"tags.`ralflow.run_name` = '{name}'"
        )
        assert (parent.info.status, parent.data.tags["ralflow.end_reason"]) == ("FAILED", reason)


def test_a_run_whose_driver_lives_is_not_taken_over(tmp_path):
    """Seen: two `ralflow train` of the same run name at once (a job submitted twice; two people with
    the default, config-hashed name) both trained into one MLflow run and one checkpoint folder. A
    driver now holds its run; a second open is refused while the holder lives: a process still
    there on this host, or another host's heard from lately. A crashed driver's run resumes."""
    import json
    import pickle
    import socket
    import subprocess
    import sys

    from components.tracking import DRIVER_GONE_S, DRIVER_TAG, process_started

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = TrackedRun.open(uri, "ralflow", "r1")
    run.hold()
    lease = json.loads(run.get().data.tags[DRIVER_TAG])
    assert lease["host"] == socket.gethostname() and lease["pid"] == os.getpid()
    assert pickle.loads(pickle.dumps(run)).run_id == run.run_id  # still goes to Ray workers
    assert TrackedRun.open(uri, "ralflow", "r1").run_id == run.run_id  # its own process may reopen it
    run.finish("FINISHED")
    assert run._heartbeat.is_set()  # the heartbeat ends with the run

    run = TrackedRun.open(uri, "ralflow", "r2")  # leases written by hand below: no heartbeat of ours
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = {"host": socket.gethostname(), "pid": other.pid, "started": process_started(other.pid), "beat": 0}
        run.client.set_tag(run.run_id, DRIVER_TAG, json.dumps(mine))
        with pytest.raises(UserError) as err:
            TrackedRun.open(uri, "ralflow", "r2")
        assert err.value.field == "tracking.run_name" and str(err.value) == (
            f"tracking.run_name r2: MLflow run {run.run_id} is being trained right now (pid {other.pid} on this "
            "host); wait for it, stop it, or give another run_name"
        )
    finally:
        other.kill()
        other.wait()
    assert TrackedRun.open(uri, "ralflow", "r2").resumed  # its driver is gone: resumed at once

    elsewhere = {"host": "node-7", "pid": 1, "started": "1", "beat": time.time() - 5}
    run.client.set_tag(run.run_id, DRIVER_TAG, json.dumps(elsewhere))
    with pytest.raises(UserError, match=r"\(pid 1 on node-7, heard from 5 s ago; a driver silent for 90 s is"):
        TrackedRun.open(uri, "ralflow", "r2")
    run.client.set_tag(run.run_id, DRIVER_TAG, json.dumps({**elsewhere, "beat": time.time() - DRIVER_GONE_S - 1}))
    assert TrackedRun.open(uri, "ralflow", "r2").resumed  # silent too long: gone
    blind = {"host": socket.gethostname(), "pid": 1, "started": None, "beat": time.time()}  # no /proc (macOS)
    run.client.set_tag(run.run_id, DRIVER_TAG, json.dumps(blind))
    with pytest.raises(UserError, match=r"heard from 0 s ago"):  # then the heartbeat tells, as for another host
        TrackedRun.open(uri, "ralflow", "r2")
    run.client.set_tag(run.run_id, DRIVER_TAG, json.dumps({**blind, "beat": time.time() - DRIVER_GONE_S - 1}))
    assert TrackedRun.open(uri, "ralflow", "r2").resumed

    run.finish("KILLED", "interrupted")  # a run that ended is resumed whatever its last driver
    run.client.set_tag(run.run_id, DRIVER_TAG, json.dumps({**elsewhere, "beat": time.time()}))
    assert TrackedRun.open(uri, "ralflow", "r2").resumed
