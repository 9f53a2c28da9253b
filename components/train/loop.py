"""The Ray Train worker: ``train_loop_per_worker`` and the steps it composes.

Each worker streams its share of the training split from Ray Data (decode and augmentation run
in Ray Data tasks), trains the model with the configured loss, and reports a checkpoint every
epoch. Every worker scores its share of the validation split; the shares are gathered and rank 0
scores them once (every image exactly once, so the metric does not depend on the worker count)
and logs the epoch to the run's MLflow run.
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import Config
from ..data.manifest import Manifest
from ..data.sampling import ClassTally, SamplingPlan
from ..tracking import TrackedRun
from .build import TrainingParts
from .stages import InitWeights


@dataclass
class TrainJob:
    """Everything a worker needs, resolved once on the driver and sent to the workers as is."""

    cfg: Config
    manifest: Manifest
    run: TrackedRun | None
    storage_dir: str  # the run's folder in Ray Train storage: its per-epoch checkpoints
    checkpoint_in_place: bool  # local mode: Ray does not persist reported checkpoints, write them here
    drill_marker: str | None = None  # fault drill: a file that says the drill already fired
    plan: SamplingPlan | None = None  # the training split's re-sampling and data seeds
    init: InitWeights | None = None  # a first stage's weights to start from (train.init_from)


def autocast(device, dtype):
    """Autocast to ``dtype`` on ``device``, or full precision when ``dtype`` is None."""
    import torch

    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


class StallWatchdog:
    """Says what the loop waits for when no batch has come for ``after_s`` seconds (once per
    stall): a pipeline that cannot get a CPU, or a cluster that is still adding nodes, is then a
    line in the log instead of silence. ``check`` is asked at each stall whether waiting can still
    end (the cluster may have lost a node since the start); when it raises, the worker says why and
    exits, so Ray Train restarts the group and the driver can continue on what is left."""

    def __init__(self, after_s: float, rank: int, describe=None, say=print, check=None, end=os._exit) -> None:
        import threading

        self.after_s, self.rank, self.say = after_s, rank, say
        self.describe = describe or free_resources
        self.check, self.end = check, end
        self.last = time.monotonic()
        self.warned = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ralflow-stall-watchdog", daemon=True)

    def __enter__(self) -> StallWatchdog:
        if self.after_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def batch(self) -> None:
        self.last, self.warned = time.monotonic(), False

    def _watch(self) -> None:
        while not self._stop.wait(min(self.after_s / 4, 5.0)):
            idle = time.monotonic() - self.last
            if idle >= self.after_s and not self.warned:
                self.warned = True
                self.say(
                    f"[train] worker {self.rank}: no training batch for {idle:.0f}s; waiting for Ray Data's "
                    f"decode tasks. {self.describe()}",
                    flush=True,
                )
                try:
                    if self.check:
                        self.check()
                except Exception as exc:  # noqa: BLE001 - said, then the worker ends
                    self.say(f"[train] worker {self.rank} gives up waiting: {exc}", flush=True)
                    self.end(1)
                    return


def free_resources() -> str:
    import ray

    free, total = ray.available_resources(), ray.cluster_resources()
    return (
        "Free now: "
        + ", ".join(f"{free.get(k, 0):g} of {total[k]:g} {k}" for k in ("CPU", "GPU") if k in total)
        + " (Ray Data needs a free CPU per decode task)"
    )


class RunAhead:
    """Keeps the host at most one step ahead of the device. After queueing step k, the host waits
    for step k-1 to finish: the device always has a step queued (no gap between steps), and the
    host spends that wait blocked without holding the GIL, while this process's batch threads
    (Ray Data's iterator, the Prefetcher) need it. Without the bound, on an H200, one epoch
    trained at 3,903 img/s, and the next two at 505 and 583 img/s, waiting 83-86% of the time for
    data that Ray Data alone delivers at 7,500 img/s. The suspected cause, not yet measured on a
    GPU: the host stays in kernel-launch calls that take and release the GIL hundreds of times a
    step, as torch's autograd thread does, and the batch threads queue for it (GIL contention
    with data threads: PyTorch issue #180500). On the CPU, ``bench/gil.py`` measures the
    mechanism: a main thread that churns the GIL cut a batch thread's rate to 0.67x, one paced
    like this to 0.88x. Off the GPU nothing is queued ahead, and this does nothing.
    """

    def __init__(self, device, new_event=None) -> None:
        self.on = getattr(device, "type", None) == "cuda"
        self.new_event = new_event
        self.pending = None

    def queued(self) -> None:
        """Call after each step's kernels are queued."""
        if not self.on:
            return
        if self.new_event is None:
            import torch

            self.new_event = torch.cuda.Event
        event = self.new_event()
        event.record()
        if self.pending is not None:
            self.pending.synchronize()
        self.pending = event


def train_epoch(parts: TrainingParts, batches, device, watchdog: StallWatchdog | None = None) -> dict:
    """One pass over this worker's batches: loss sum, images, optimiser steps, time spent waiting
    (and how much of it for the first batch) and the positive labels seen per class. A last batch
    smaller than the first is left out (``drop_last``), so every step has the same shape. With
    ``accumulate`` > 1 the gradients of that many batches make one step (DDP syncs only on the
    last of them); a remainder at the end of the epoch still makes a step. The loss is summed
    where it is computed, and the host waits only for the step before the one the device runs
    (``RunAhead``): it queues the next step's kernels while the device still runs this one."""
    import torch

    from ..models.inputs import normalize

    loss_sum, seen, steps, micro, data_wait, first_wait, full = None, 0, 0, 0, 0.0, None, None
    tally, pace = ClassTally(), RunAhead(device)
    n = parts.accumulate
    parts.train_mode()
    t0 = t_wait = time.perf_counter()
    parts.optimizer.zero_grad(set_to_none=True)
    for batch in batches:
        if watchdog:
            watchdog.batch()
        data_wait += time.perf_counter() - t_wait  # time the loop stood waiting for this batch
        if first_wait is None:  # the pipeline's start-up: cold workers, a new epoch's first blocks
            first_wait = data_wait
        rows = len(batch["labels"])
        full = full or rows  # every batch but an epoch's last has the batch size
        # Skipped (every rank has the same rows, so all skip alike): a batch of one, on which batch
        # norm cannot train, and an epoch's last batch when smaller than the rest (timm's
        # drop_last). Its shape would be new (re-sampled epochs vary in size): torch.compile would
        # recompile for it, and cudnn.benchmark re-time its kernels (4-6 s each on an H200).
        if rows < 2 or rows < full:
            t_wait = time.perf_counter()
            continue
        x, y, mask = normalize(batch["image"]), batch["labels"], batch["mask"]
        if parts.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        micro += 1
        last = micro % n == 0
        sync = nullcontext() if last or not hasattr(parts.model, "no_sync") else parts.model.no_sync()
        with sync:
            with autocast(device, parts.autocast_dtype):
                logits = parts.model(x)
            loss = parts.loss_fn(logits, y, mask=mask)  # the loss upcasts to float32 itself
            parts.scaler.scale(loss / n).backward()
        if last:
            steps += optimiser_step(parts)
        batch_loss = loss.detach() * len(x)
        loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
        seen += len(x)
        tally.add(y, mask)
        pace.queued()
        t_wait = time.perf_counter()
    if micro % n:
        steps += optimiser_step(parts)
    total = 0.0 if loss_sum is None else float(loss_sum)  # waits for the last step: the time counts it
    return {
        "loss_sum": total,
        "seen": seen,
        "steps": steps,
        "data_wait": data_wait,
        "first_wait": first_wait or 0.0,
        "time": time.perf_counter() - t0,
        "positives": tally.counts(parts.num_classes),
    }


def optimiser_step(parts: TrainingParts) -> int:
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.scheduler.step()
    parts.step_done()
    parts.optimizer.zero_grad(set_to_none=True)
    return 1


def evaluate(models: dict, batches, device, autocast_dtype, channels_last: bool = False):
    """One pass over an iterable of batches (numpy batches from ``iter_batches``: the study and view
    are strings), scored by every model in ``models`` (name -> module; the raw and the EMA weights
    share the pass, so the split is read and decoded once): ``({name: probabilities}, targets,
    masks, studies, views)``."""
    import torch

    from ..models.inputs import normalize

    for model in models.values():
        model.eval()
    probs, targets, masks, studies, views = {name: [] for name in models}, [], [], [], []
    with torch.inference_mode():
        for batch in batches:
            x = normalize(torch.as_tensor(batch["image"]).to(device, non_blocking=True))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for name, model in models.items():
                with autocast(device, autocast_dtype):
                    logits = model(x)
                probs[name].append(torch.sigmoid(logits.float()).cpu().numpy())
            targets.append(np.asarray(batch["labels"]))
            masks.append(np.asarray(batch["mask"]))
            n = len(targets[-1])
            studies.append(np.asarray(batch.get("study_id", np.arange(n).astype(str))).astype(str))
            views.append(np.asarray(batch.get("view", [""] * n)).astype(str))
    for model in models.values():
        model.train()
    if not targets:
        empty = np.zeros((0, 0), np.float32)
        return {name: empty for name in models}, empty, empty, np.zeros(0, str), np.zeros(0, str)
    shared = (np.concatenate(a) for a in (targets, masks, studies, views))
    return {name: np.concatenate(p) for name, p in probs.items()}, *shared


def select_weights(scored: dict) -> dict:
    """The epoch's validation record from the better of the raw and the EMA weights (by val mAP):
    ``val_mAP`` and the rest describe the weights that would be the run's model; with EMA on,
    ``val_mAP_raw``, ``val_mAP_ema`` and ``ema_selected`` say what was compared and chosen."""
    if set(scored) == {"raw"}:
        return scored["raw"]

    def key(name: str) -> float:
        value = scored[name]["val_mAP"]
        return float("-inf") if value is None or np.isnan(value) else value

    chosen = "ema" if key("ema") > key("raw") else "raw"
    return {
        **scored[chosen],
        "val_mAP_raw": scored["raw"]["val_mAP"],
        "val_mAP_ema": scored["ema"]["val_mAP"],
        "ema_selected": float(chosen == "ema"),
    }


def sync_buffers_from_rank0(module) -> None:
    """Copy rank 0's buffers (batch-norm running statistics) to every rank. DDP broadcasts them at
    the start of each forward, so after the last training step each rank holds its own batch's
    update; validation on every rank must use the model that rank 0 checkpoints."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)


def gather_to_all(*arrays):
    """Concatenate each array across the workers (identity when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return arrays
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, arrays)
    parts = [[g[i] for g in gathered if g[i].size] or [gathered[0][i]] for i in range(len(arrays))]
    return tuple(np.concatenate(p) for p in parts)


def newest_state(job: TrainJob, device) -> dict | None:
    """The newest checkpoint of this run (to resume from), or None."""
    import ray.train

    from .checkpoints import newest_checkpoint_state

    run_id = job.run.run_id if job.run else None
    return newest_checkpoint_state(job.storage_dir, run_id, ray.train.get_checkpoint(), device)


def restore(parts: TrainingParts, job: TrainJob, state: dict | None, rank: int) -> int:
    """Load ``state`` (``newest_state``), if any; returns the first epoch to train (0-based:
    checkpoints count epochs from 0, what users see counts from 1)."""
    run_id = job.run.run_id if job.run else None
    if not state:
        return 0
    parts.load_state_dicts(state)
    if rank == 0:
        done = state["epoch"] + 1
        print(
            f"[train] resumed from the checkpoint of epoch {done} (restart in the same MLflow run {run_id})", flush=True
        )
        if job.run:  # the epoch may have been checkpointed but not logged before the failure
            job.run.log_epoch(state["metrics"], done)
            # A durable record of the restart: worker stdout reaches the driver through Ray's
            # log monitor, which may drop lines around a worker failure.
            job.run.log_restart(done)
    return state["epoch"] + 1


def save_checkpoint(
    parts: TrainingParts, job: TrainJob, epoch: int, metrics: dict, per_class_ap, rank: int, val_outputs=None
) -> None:
    """Report the epoch's metrics with a checkpoint (written by rank 0) to Ray Train."""
    import ray.train

    from .checkpoints import checkpoint_dir_name, save_state

    # Local mode (num_workers=0) does not persist reported checkpoints: write them in place.
    in_place = f"{job.storage_dir}/{checkpoint_dir_name(epoch)}" if job.checkpoint_in_place else None
    with nullcontext(in_place) if in_place else tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            run_id = job.run.run_id if job.run else None
            state = {
                "run_id": run_id,
                **parts.state_dicts(),
                "epoch": epoch,
                "metrics": metrics,
                "per_class_ap": per_class_ap,
                "val_outputs": val_outputs,
            }
            save_state(state, folder)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(epoch))


def fault_drill(job: TrainJob, epoch: int, rank: int, world: int) -> None:
    """``train.fail_at_epoch``: the last worker exits once, at the start of that epoch (just
    after the previous epoch's checkpoint was reported), to exercise recovery."""
    marker = Path(job.drill_marker) if job.drill_marker else None
    if marker is None or job.cfg.train.fail_at_epoch != epoch or rank != world - 1 or marker.exists():
        return
    marker.write_text(f"worker {rank} exited at epoch {epoch}\n")
    print(f"[train] fault drill: worker {rank} exits now (epoch {epoch})", flush=True)
    os._exit(1)


def merge_nodes(tag: str, nodes) -> str:
    """The ``ralflow.worker_nodes`` tag after a (re)start: the nodes used before and now."""
    return ",".join(sorted(set(filter(None, tag.split(","))) | set(nodes)))


def per_class_metrics(prefix: str, names, values) -> dict:
    """One MLflow metric per class, ``prefix/<label>`` (characters MLflow refuses become ``_``)."""
    import re

    return {f"{prefix}/{re.sub(r'[^A-Za-z0-9_.: /-]', '_', name)}": float(v) for name, v in zip(names, values)}


def epoch_line(m: dict, epochs: int) -> str:
    from ..metrics import fmt

    return (
        f"[train] epoch {m['epoch']}/{epochs} loss {m['train_loss']:.4f} val mAP {fmt(m['val_mAP'])} "
        f"(head {fmt(m['val_mAP_head'])} medium {fmt(m['val_mAP_medium'])} tail {fmt(m['val_mAP_tail'])}; "
        f"study {fmt(m.get('val_mAP_study'))}) "
        f"AUROC {fmt(m['val_AUROC'])} {m['images_per_s']:.0f} img/s (data wait {m['data_wait_frac']:.0%}) "
        f"{m['epoch_time_s']:.1f}s"
    )


def train_batches(cfg: Config, shard, device, epoch: int, rank: int):
    """One epoch of this worker's training batches on ``device``, made ahead in a thread
    (``data.prefetch_batches``): decoded in Ray Data tasks, or (``data.decode_on: gpu``) decoded
    and augmented here with draws seeded by (seed, rank, epoch). With ``data.shuffle_buffer``,
    rows are mixed across row groups first, with the same seed."""
    import torch

    from ..data.ingest import device_batches
    from ..data.prefetch import Prefetcher
    from .build import augment_options

    d, batch_size, size = cfg.data, cfg.train.batch_size, cfg.data.image_size
    seed = cfg.train.seed * 1_000_003 + rank * 10_007 + epoch
    options = {"batch_size": batch_size, "prefetch_batches": d.prefetch_batches}
    if d.shuffle_buffer:
        options |= {"local_shuffle_buffer_size": d.shuffle_buffer, "local_shuffle_seed": seed}
    if d.decode_on == "gpu":
        raw = shard.iter_batches(batch_format="numpy", **options)
        batches = device_batches(raw, device, size, augment_options(cfg), torch.Generator().manual_seed(seed))
    else:
        batches = shard.iter_torch_batches(device=device, pin_memory=device.type == "cuda", **options)
    return Prefetcher(batches, d.prefetch_batches, device)


def quiet_ray_train_report_log() -> None:
    """Ray Train logs each report's whole metrics dict at INFO, per worker and epoch (two long
    lines that repeat the worker's own epoch line): raise that one logger to WARNING."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # moved in another Ray: its lines stay, nothing else changes
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)  # Ray names this logger by its file


def train_loop_per_worker(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from ..models import unwrap
    from .build import build_parts
    from .resources import check_room_for_data

    quiet_ray_train_report_log()
    job: TrainJob = config["job"]
    cfg = job.cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed + rank)
    check_room_for_data(cfg)  # a restart after a node loss must not take the CPUs Ray Data needs
    device = ray.train.torch.get_device()
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    state = newest_state(job, device)
    first_epoch = state["epoch"] + 1 if state else 0
    warm = (  # the first epoch's data starts flowing now, while the model is built and restored
        train_batches(cfg, train_shard, device, first_epoch, rank) if first_epoch < cfg.train.epochs else None
    )
    epoch_images = job.plan.expected_images if job.plan else None  # re-sampled epochs change length
    parts = build_parts(cfg, job.manifest, device, world, ray.train.torch.prepare_model, job.init, epoch_images)
    start_epoch = restore(parts, job, state, rank)
    report = unwrap(parts.model).load_report
    if rank == 0 and job.run and report and start_epoch == 0:  # how much of the pretrained weights was used
        job.run.log_params(report.params())
    nodes = gather_to_all(np.array([ray.get_runtime_context().get_node_id()]))[0]
    if rank == 0 and job.run:  # every node the run has used, across restarts
        before = job.run.get().data.tags.get("ralflow.worker_nodes", "")
        job.run.set_tags({"ralflow.worker_nodes": merge_nodes(before, nodes.tolist())})

    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            warm = train_and_validate_epoch(job, parts, epoch, warm, rank, world, device, train_shard, val_shard)
    finally:
        if warm is not None:  # a failed epoch: the next one's reader stops
            warm.close()


def train_and_validate_epoch(job: TrainJob, parts, epoch: int, batches, rank: int, world: int, device, train_shard,
                             val_shard):  # fmt: skip
    """One epoch on this worker: train on ``batches`` (made ahead, or None), then validate,
    checkpoint and log. Returns the next epoch's batches, already flowing: started as soon as
    training ends, their first blocks are decoded while this epoch is validated and checkpointed,
    so a new epoch does not start by waiting for Ray Data to start (warm ingest across epochs)."""
    from ..data.ingest import upstream_wait_s
    from .resources import check_room_for_data

    cfg = job.cfg
    fault_drill(job, epoch, rank, world)
    t_epoch = time.perf_counter()
    upstream = upstream_wait_s(train_shard)
    with StallWatchdog(cfg.train.stall_warn_s, rank, check=lambda: check_room_for_data(cfg)) as watchdog:
        stats = train_epoch(parts, batches or train_batches(cfg, train_shard, device, epoch, rank), device, watchdog)
    if upstream is not None:  # of the batch thread's waits while this epoch trained, those for Ray Data's tasks
        stats["upstream_wait"] = upstream_wait_s(train_shard) - upstream
    ahead = train_batches(cfg, train_shard, device, epoch + 1, rank) if epoch + 1 < cfg.train.epochs else None
    try:
        validate_and_report(job, parts, epoch, stats, t_epoch, rank, device, val_shard)
    except BaseException:
        if ahead is not None:
            ahead.close()
        raise
    return ahead


def validate_and_report(job: TrainJob, parts, epoch: int, stats: dict, t_epoch: float, rank: int, device, val_shard):
    """Score the validation split (every worker its share), then report the epoch's metrics with a
    checkpoint; rank 0 logs them to MLflow and prints the epoch's line."""
    import torch

    from ..data.ingest import device_batches
    from ..data.prefetch import Prefetcher
    from ..metrics import group_means, validation_metrics
    from ..models import unwrap

    cfg, batch_size, size = job.cfg, job.cfg.train.batch_size, job.cfg.data.image_size
    # Every worker scores its share of the validation split with the unwrapped module (no DDP
    # collective inside), the shares are gathered, and rank 0 scores the whole once.
    candidates = {"raw": unwrap(parts.model)} | ({"ema": parts.ema.module} if parts.ema is not None else {})
    for module in candidates.values():  # every share scored with the weights rank 0 saves
        sync_buffers_from_rank0(module)
    batches = val_shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                     prefetch_batches=cfg.data.prefetch_batches)  # fmt: skip
    if cfg.data.decode_on == "gpu":
        batches = Prefetcher(device_batches(batches, device, size, labels_on_device=False),
                             cfg.data.prefetch_batches, device)  # fmt: skip
    mine, *shared = evaluate(candidates, batches, device, parts.autocast_dtype, parts.channels_last)
    *gathered, targets, masks, studies, views = gather_to_all(*mine.values(), *shared)
    scored = {}
    for name, probs in zip(mine, gathered):
        if rank == 0:
            scored[name] = {
                "val_images": int(len(probs)),
                **validation_metrics(probs, targets, masks, job.manifest.group_list(), studies, views),
                # kept with the checkpoint: the best epoch's calibration and thresholds are fitted on them
                "val_outputs": {"probs": probs, "targets": targets, "masks": masks},
            }
    val = select_weights(scored) if rank == 0 else {"per_class_ap": None}
    loss_sum, seen, _ = (
        gather_to_all(np.array([stats["loss_sum"], stats["seen"], stats["steps"]]))[0].reshape(-1, 3).sum(0)
    )
    sampled = gather_to_all(stats["positives"][None])[0].sum(0) / max(seen, 1)  # effective class frequencies
    metrics = {
        "epoch": epoch + 1,  # as people count: the console, MLflow's step and best_epoch agree
        "train_loss": loss_sum / max(seen, 1),
        "lr": parts.scheduler.get_last_lr()[0],
        "images_per_s": seen / max(stats["time"], 1e-9),
        "epoch_time_s": time.perf_counter() - t_epoch,  # training + validation
        "data_wait_frac": stats["data_wait"] / max(stats["time"], 1e-9),  # rank 0's share of time starved of data
        "data_wait_first_s": stats["first_wait"],  # of which for the first batch: the pipeline's start-up
    }
    if "upstream_wait" in stats:  # a data wait well above this one: the worker's batch thread is the bottleneck
        # Ray counts a wait when it ends: one begun before the epoch (a cold start) counts whole, hence the cap
        metrics["data_wait_upstream_frac"] = min(stats["upstream_wait"] / max(stats["time"], 1e-9), 1.0)
    if device.type == "cuda":  # what the chip held at most (rank 0), for sizing batches and images
        metrics["gpu_peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    per_class_ap, val_outputs = val.pop("per_class_ap"), val.pop("val_outputs", None)
    metrics.update(val)
    rates = group_means(sampled, job.manifest.group_list(), empty=None)  # groups with classes only
    metrics.update({f"sampled_pos_rate_{g}": v for g, v in rates.items() if v is not None})
    save_checkpoint(parts, job, epoch, metrics, per_class_ap, rank, val_outputs)
    if rank == 0:
        if job.run:  # logged after the checkpoint is safe: a restart never logs an epoch twice
            job.run.log_epoch(metrics, epoch + 1)
            job.run.log_metrics(per_class_metrics("sampled_freq", job.manifest.label_names, sampled), epoch + 1)
        print(epoch_line(metrics, cfg.train.epochs), flush=True)
