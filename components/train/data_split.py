"""How the datasets are split among the Ray Train workers."""

from __future__ import annotations

import ray.train


class ExactValidationSplit(ray.train.DataConfig):
    """Training is split equally (Ray drops up to a row per worker so that every worker takes the
    same number of steps: DDP needs that); validation is split unequally, so each worker scores its
    share and every image is scored exactly once, whatever the worker count."""

    EXACT = ("val",)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        exact = {k: v for k, v in datasets.items() if k in self.EXACT}
        rest = {k: v for k, v in datasets.items() if k not in self.EXACT}
        output = (
            super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
            if rest
            else [{} for _ in range(world_size)]
        )
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, ds in exact.items():
            ds = ds.copy(ds)
            if ds.name is None:
                ds.set_name(name)
            ds.context.execution_options = self._resolve_execution_options(name)
            for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                output[i][name] = split
        return output
