"""What a training run holds on the cluster, and what to do when the cluster cannot hold it.

Ray Data's decode tasks need CPUs the training workers do not hold: a worker group that takes
every CPU trains nothing and waits forever. So a run is checked before it starts (the embedded Ray
refuses it, a cluster says what it waits for), each (re)started worker group checks again (a node
may have gone), and after a node loss the driver continues with fewer CPUs per worker when that
fits what is left."""

from __future__ import annotations

import math

from ..config import Config
from ..errors import UserError
from ..runtime import describe, missing, refuse_or_wait

# Below this a worker is not worth scheduling: fail with the reason instead.
MIN_CPUS_PER_WORKER = 0.05


class ClusterTooSmall(UserError):
    """The cluster (after a node loss) cannot hold the workers and a Ray Data decode task."""


def resources_needed(cfg: Config) -> dict:
    """What one training run holds while it trains: its workers (local mode: the driver) and room
    for at least one Ray Data decode task."""
    workers = cfg.train.num_workers
    need = {"CPU": workers * cfg.train.cpus_per_worker + cfg.data.map_cpus}
    if cfg.train.use_gpu:
        need["GPU"] = max(workers, 1)
    return need


def shortfall(cfg: Config, have: dict) -> dict:
    return missing(resources_needed(cfg), have)


def check_resources(cfg: Config, log=print) -> None:
    """On ralflow's embedded Ray (a fixed size: nothing will be added) a run that cannot fit is
    refused before it starts; on a cluster, which may autoscale, say what the run waits for."""
    t = cfg.train

    def refusal(short):
        return UserError(
            f"train.num_workers {t.num_workers} x train.cpus_per_worker {t.cpus_per_worker:g} + data.map_cpus "
            f"{cfg.data.map_cpus:g} for Ray Data needs {describe(short)} on this machine; lower them "
            "(Ray Data's decode tasks need a CPU the workers do not hold)",
            field="train.use_gpu" if "GPU" in short else "train.cpus_per_worker",
        )

    refuse_or_wait(resources_needed(cfg), refusal, lambda short: (
        f"[train] waiting for resources: the run needs {short}. An autoscaling cluster adds nodes; on a "
        f"fixed-size one, lower the workers or their CPUs (starting is retried {t.max_failures}x, "
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S each)"
    ), log)  # fmt: skip


def check_room_for_data(cfg: Config, have: dict | None = None) -> None:
    """Run by every (re)started worker: the cluster as it is now must hold the workers *and* a
    decode task. After a node loss Ray Train restarts the group on what is left, where it could
    take every CPU and wait forever for data; this fails the attempt at once instead."""
    import ray

    if cfg.train.num_workers == 0:
        return
    short = shortfall(cfg, ray.cluster_resources() if have is None else have)
    if short:
        raise ClusterTooSmall(
            f"the cluster is now too small for this run: it needs {describe(short)} "
            f"({cfg.train.num_workers} workers x {cfg.train.cpus_per_worker:g} CPU + {cfg.data.map_cpus:g} "
            "for Ray Data); a node has probably left",
            field="train.cpus_per_worker",
        )


def cpus_per_worker_that_fit(cfg: Config, have: dict) -> float | None:
    """After the cluster shrank: the largest ``train.cpus_per_worker`` (a multiple of 0.05) that
    leaves ``data.map_cpus`` free on what is left, or None when the run fits as it is, when it is
    short of something other than CPUs, or when even the minimum would not fit."""
    short = shortfall(cfg, have)
    if not short or set(short) != {"CPU"} or cfg.train.num_workers == 0:
        return None
    spare = have.get("CPU", 0.0) - cfg.data.map_cpus
    cpus = math.floor(spare / cfg.train.num_workers / MIN_CPUS_PER_WORKER + 1e-9) * MIN_CPUS_PER_WORKER
    return round(cpus, 2) if cpus >= MIN_CPUS_PER_WORKER else None
