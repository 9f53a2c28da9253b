"""Connecting to Ray the way users expect: the cluster from RAY_ADDRESS / --address (what
``ray job submit`` sets), else a local Ray started for this process."""
from __future__ import annotations

import os


def init_ray(address: str | None = None, num_cpus: int | None = None, log=print) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = {"log_to_driver": True, "configure_logging": True, "logging_level": "WARNING"}
    if address:
        ray.init(address=address, **quiet)
        log(f"ray: connected to cluster at {address}")
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet)
        log(f"ray: started a local Ray instance ({int(ray.cluster_resources().get('CPU', 0))} CPUs)")


def map_with_ray_data(fn, items: list, num_cpus: float = 1.0) -> list:
    """Run ``fn`` over ``items`` as Ray Data map tasks spread over the cluster's CPUs
    (one block per item), with Ray Data's progress bar; returns results in item order."""
    import pickle

    import ray.data

    if not items:
        return []
    payload = [{"i": i, "item": pickle.dumps(x)} for i, x in enumerate(items)]
    ds = ray.data.from_items(payload, override_num_blocks=len(items))
    ds = ds.map(lambda row: {"i": row["i"], "result": pickle.dumps(fn(pickle.loads(row["item"])))}, num_cpus=num_cpus)
    rows = sorted(ds.take_all(), key=lambda r: r["i"])
    return [pickle.loads(r["result"]) for r in rows]
