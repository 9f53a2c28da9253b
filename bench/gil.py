"""GIL contention in the training process, on the CPU (issue 11): how fast Ray Data's iterator
delivers batches (in a ``Prefetcher`` thread, as a training worker runs it) while the process's
main thread does one of three things:

  wait    blocks without the GIL (a step that waits for the device, or an idle loop);
  churn   runs tiny torch ops nonstop, taking and releasing the GIL at each: what a host thread
          does when it queues kernels with no bound, each launch waiting for a slot in a full
          launch queue (the unbounded loop of the second H200 run);
  paced   runs tiny ops for ``--launch-ms``, then blocks without the GIL for ``--step-ms``: a host
          that queues a step's kernels, then waits for the step before (``RunAhead``).

The batches come from a materialized dataset of uint8 images, so Ray Data's tasks cost nothing and
the measure is the consumer side alone. Each round times one epoch of each mode, back to back;
the table gives medians over the rounds and the per-round ratio to ``wait``.

    python bench/gil.py [--images 4096] [--size 224] [--rounds 5] [--switch-ms 5 1 0.2]

``--switch-ms`` repeats the three modes at each of Python's GIL switch intervals
(``sys.setswitchinterval``; Python's default is 5 ms): how long a thread waiting for the GIL lets
the holder run before asking it to let go.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("wait", "churn", "paced")


def epoch(split, batch: int, mode: str, launch_s: float, step_s: float) -> float:
    """One epoch's images/s through a Prefetcher thread."""
    import torch

    from components.data.prefetch import Prefetcher

    done, rate = threading.Event(), []

    def consume() -> None:
        t0, n = time.perf_counter(), 0
        for b in Prefetcher(split.iter_torch_batches(batch_size=batch), 1):
            n += len(b["data"])
        rate.append(n / (time.perf_counter() - t0))
        done.set()

    thread = threading.Thread(target=consume)
    thread.start()
    x = torch.zeros(8)
    while not done.is_set():
        if mode == "wait":
            done.wait(step_s)
        elif mode == "churn":
            for _ in range(200):
                x.add_(1)
        else:
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < launch_s:
                x.add_(1)
            done.wait(step_s)
    thread.join()
    return rate[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--launch-ms", type=float, default=10.0, help="paced: time spent queueing a step")
    p.add_argument("--step-ms", type=float, default=30.0, help="paced: time the device runs a step")
    p.add_argument("--switch-ms", type=float, nargs="+", default=[5.0], help="GIL switch intervals to run at")
    a = p.parse_args()

    import numpy as np
    import ray
    import torch

    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    images = np.random.default_rng(0).integers(0, 255, (a.images, 1, a.size, a.size), dtype=np.uint8)
    (split,) = ray.data.from_numpy(images).materialize().streaming_split(1, equal=True)
    args = (split, a.batch)
    epoch(*args, "wait", a.launch_ms / 1e3, a.step_ms / 1e3)  # warm-up: the first epoch starts things
    default_switch = sys.getswitchinterval()
    rates = {(ms, m): [] for ms in a.switch_ms for m in MODES}
    for r in range(a.rounds):
        for ms in a.switch_ms:
            sys.setswitchinterval(ms / 1e3)
            for mode in MODES:
                rates[ms, mode].append(epoch(*args, mode, a.launch_ms / 1e3, a.step_ms / 1e3))
        sys.setswitchinterval(default_switch)
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{m} {v[-1]:.0f}" for m, v in rates.items()), flush=True)
    ray.shutdown()
    print(f"\n{a.images} images of {a.size} px, batches of {a.batch}, {a.rounds} rounds; img/s delivered, "
          "median [min-max]; ratio to wait: median of the per-round ratios at the same switch interval")  # fmt: skip
    print("| GIL switch interval | main thread | img/s | × wait |\n|---:|---|---:|---:|")
    for (ms, mode), v in rates.items():
        ratio = statistics.median(x / w for x, w in zip(v, rates[ms, "wait"]))
        print(f"| {ms:g} ms | {mode} | {statistics.median(v):.0f} [{min(v):.0f}-{max(v):.0f}] | {ratio:.2f} |")


if __name__ == "__main__":
    main()
