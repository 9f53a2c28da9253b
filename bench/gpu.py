"""GPU training speed, measured side by side in one run (issue 11):

1. compute-only ceiling: train steps on batches already on the device (bf16 autocast on CUDA),
   channels-last off/on, torch.compile off/on;
2. JPEG decode at each size: one CPU process, every CPU in parallel, batched nvJPEG on the GPU
   (``decode_images``);
3. each half alone: ralflow's training loop on batches already on the device, and Ray Data
   ingest to the device with nothing training;
4. `ralflow train` streamed (Ray Data -> TorchTrainer) with the same model, size and flags, for
   each ``--prefetch`` value: first-epoch time and data wait, img/s and data wait of the last
   epoch, peak GPU memory, and the ratio to the ceiling; ``--decode-on cpu`` with every CPU, then
   ``--decode-on gpu`` on a Ray instance of ``--gpu-decode-cpus`` CPUs;
5. the issue's goals, each with its measured value and whether it is met.

    python bench/gpu.py [--models resnet50 densenet121 convnext_small] [--sizes 224 512] [--epochs 3]
    python bench/gpu.py --goals --out gpu.md     # resnet50 only, no compile: what the goals need

On a machine without CUDA it runs tiny (resnet10t at 64 px, a few steps) to check the script
itself, and says that GPU figures were not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def ceiling(model_name: str, size: int, batch: int, steps: int, channels_last: bool, compile_: bool, device) -> float:
    """Images/s of forward + backward + AdamW on one fixed batch already on the device."""
    import torch

    from components.config import load_config
    from components.losses import build_loss
    from components.models.inputs import normalize
    from components.train.build import build_model_for

    # the model `ralflow train --model NAME` builds (its default head included), as the streamed runs
    model = build_model_for(load_config(None, {"model": {"name": model_name}}), 26).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    loss_fn = build_loss("ral").to(device)
    x = torch.randint(0, 255, (batch, 1, size, size), dtype=torch.uint8, device=device)
    y = (torch.rand(batch, 26, device=device) < 0.1).float()
    dtype = torch.bfloat16 if device.type == "cuda" else None

    def step():
        inp = normalize(x)
        if channels_last:
            inp = inp.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(step_model(inp), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3 if compile_ else 2):  # warm-up (and compilation)
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def jpeg_blobs(size: int, n: int) -> list[bytes]:
    """``n`` synthetic chest films at ``size`` px as JPEG bytes (16 distinct ones, repeated)."""
    import io

    import numpy as np
    from PIL import Image

    from components.data.synth import LABELS, ChestRenderer

    renderer, rng = ChestRenderer(size), np.random.default_rng(0)
    blobs = []
    for _ in range(16):
        buf = io.BytesIO()
        Image.fromarray(renderer.render(np.zeros(len(LABELS)), rng)).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    return (blobs * (n // 16 + 1))[:n]


def _decode_part(args) -> int:
    from components.data.ingest import decode_images

    blobs, size, repeats = args
    for _ in range(repeats):  # each process busy long enough that the pool's own overhead is small
        for i in range(0, len(blobs), 64):
            decode_images(blobs[i : i + 64], size, None)
    return len(blobs) * repeats


def _one_thread() -> None:
    """As a Ray Data decode task runs: Ray sets OMP_NUM_THREADS to the task's CPUs (at least 1).
    Left at torch's default (a thread per core in every process), N processes oversubscribe the
    CPUs N times over, and throughput collapses."""
    import torch

    torch.set_num_threads(1)


def _ready(blob: bytes) -> None:
    """Pool warm-up: one decode (torch and torchvision imported), held long enough that every
    process takes one."""
    _decode_part(([blob], 16, 1))
    time.sleep(1.0)


def decode_speed(size: int, n: int, device, processes: int = 1) -> float:
    """Images/s of ``decode_images`` (JPEG -> uint8 at ``size``): on ``device`` in this process, or
    on the CPU in ``processes`` processes at once (as Ray Data's decode tasks run). On the CPU each
    process decodes with one thread, as a Ray Data task does."""
    import torch

    blobs = jpeg_blobs(size, n)
    if processes > 1:
        import multiprocessing

        # spawned: a child forked from a process whose torch threads run hangs in its first torch call
        with multiprocessing.get_context("spawn").Pool(processes, initializer=_one_thread) as pool:
            pool.map(_ready, blobs[:processes], chunksize=1)
            t0 = time.perf_counter()
            parts = [(blobs[i::processes], size, 4) for i in range(processes)]
            done = sum(pool.map(_decode_part, parts, chunksize=1))
        return done / (time.perf_counter() - t0)
    from components.data.ingest import decode_images

    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        decode_images(blobs[:8], size, None, device)  # warm-up
        t0 = time.perf_counter()
        for i in range(0, n, 64):
            out = decode_images(blobs[i : i + 64], size, None, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        del out
        return n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def worker_cpus(gpu: bool) -> int:
    """CPUs of the streamed runs' one training worker (2 beside a GPU: the loop and its batch
    threads); the rest of the machine decodes."""
    return 2 if gpu else 1


def streamed(data: Path, model_name: str, size: int, batch: int, epochs: int, flags: dict, work: Path) -> dict:
    import mlflow

    from components.config import load_config
    from components.train.trainer import run_training

    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    cfg = load_config(None, {
        "data": {"path": str(data), "image_size": size, **flags.get("data", {})},
        "model": {"name": model_name},
        "train": {"epochs": epochs, "batch_size": batch, "num_workers": 1, "cpus_per_worker": worker_cpus(flags["gpu"]),
                  "use_gpu": flags["gpu"], **flags.get("train", {})},
        "tracking": {"tracking_uri": uri, "storage_path": str(work / "runs"), "experiment": "gpu-bench"},
    })  # fmt: skip
    out = run_training(cfg, log=lambda *a, **k: None)
    c = mlflow.MlflowClient(uri)
    keys = (
        "images_per_s",
        "data_wait_frac",
        "data_wait_upstream_frac",
        "data_wait_first_s",
        "epoch_time_s",
        "gpu_peak_mem_gb",
    )
    return {k: [m.value for m in sorted(c.get_metric_history(out["run_id"], k), key=lambda m: m.step)] for k in keys}


def loop_alone(data: Path, model_name: str, size: int, batch: int, device, steps: int = 12) -> float:
    """Images/s of ralflow's own training loop (``train_epoch``, its parts built as a worker builds
    them) over batches already on the device: the streamed runs without Ray Data."""
    import torch

    from components.config import load_config
    from components.data.manifest import Manifest
    from components.train.build import build_parts
    from components.train.loop import train_epoch

    manifest = Manifest.load(data)
    amp = {"amp": "bf16"} if device.type == "cuda" else {}
    cfg = load_config(None, {"data": {"path": str(data), "image_size": size}, "model": {"name": model_name},
                             "train": {"batch_size": batch, "channels_last": True, **amp}})  # fmt: skip
    parts = build_parts(cfg, manifest, device, 1, prepare_model=lambda m: m.to(device))
    c = len(manifest.label_names)
    image = torch.randint(0, 255, (batch, 1, size, size), dtype=torch.uint8, device=device)
    labels = (torch.rand(batch, c, device=device) < 0.1).float()
    batches = [{"image": image.clone(), "labels": labels, "mask": torch.ones_like(labels)} for _ in range(steps)]
    train_epoch(parts, batches[:2], device)  # warm-up
    out = train_epoch(parts, batches, device)
    return out["seen"] / out["time"]


def ingest_alone(data: Path, size: int, batch: int, device, ray_cpus: int, epochs: int = 3) -> list[float]:
    """Images/s of Ray Data alone, per epoch, with nothing training: the training split decoded and
    augmented in Ray Data tasks (as ``--decode-on cpu`` trains), through a streaming split, to
    ``iter_torch_batches`` on the device. Epoch 1 starts on a fresh Ray (cold processes)."""
    from components.config import load_config
    from components.data.ingest import build_ray_dataset
    from components.data.manifest import Manifest
    from components.train.build import augment_options

    restart_ray(ray_cpus)
    cfg = load_config(None, {"data": {"path": str(data), "image_size": size}})
    ds = build_ray_dataset(Manifest.load(data), "train", size, augment_options(cfg), cfg.data.map_cpus, shuffle=True)
    ds.context.enable_progress_bars = False
    (split,) = ds.streaming_split(1, equal=True)
    rates = []
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        for b in split.iter_torch_batches(batch_size=batch, device=device, pin_memory=device.type == "cuda"):
            n += len(b["labels"])
        rates.append(n / (time.perf_counter() - t0))
    return rates


class Reservations:
    """What Ray Data's executions are given, over a streamed run, read in a thread every 0.25 s.

    In Ray 2.60 each dataset execution (an epoch of the training split, a validation pass) asks
    one cluster-wide actor, the AutoscalingCoordinator, for CPUs. Ray Train's workers register
    theirs, and the executions then running split what is left equally (integer division), so an
    epoch's decode tasks get fewer CPUs while another execution lives. To watch it, this takes the
    actor's name with a subclass that can list its requests, before Ray Data makes the actor.
    Private API, for this diagnosis only: in another Ray it says so and logs nothing."""

    def __init__(self) -> None:
        import threading

        self.lines, self.t0, self.stop = [], time.perf_counter(), threading.Event()
        try:
            import ray
            from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
                _AutoscalingCoordinatorActor,
            )

            class Listing(_AutoscalingCoordinatorActor):
                def listing(self) -> dict:
                    def cpus(bundles):
                        return sum(b.get("CPU", 0) for b in bundles)

                    with self._lock:
                        return {k: (cpus(r.requested_resources), cpus(r.reserved_resources.values()))
                                for k, r in self._ongoing_reqs.items()}  # fmt: skip

            self.actor = ray.remote(num_cpus=0)(Listing).options(
                name="AutoscalingCoordinator", namespace="AutoscalingCoordinator", lifetime="detached",
                get_if_exists=True,
            ).remote()  # fmt: skip
        except (ImportError, AttributeError) as exc:
            self.lines.append(f"reservations not watched: {exc}")
            return
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        import ray

        last = None
        while not self.stop.wait(0.25):
            try:
                now = ray.get(self.actor.listing.remote(), timeout=5)
            except Exception as exc:  # noqa: BLE001 - a diagnosis: say it, do not fail the bench
                self.lines.append(f"reservations: {exc}")
                return
            if now != last:  # requester: (CPUs asked for, CPUs reserved)
                shown = ", ".join(f"{self.name(k)} {a:g}/{r:g}" for k, (a, r) in sorted(now.items()))
                self.lines.append(f"[{time.perf_counter() - self.t0:6.1f} s] {len(now)} requesters: {shown}")
                last = now

    @staticmethod
    def name(requester: str) -> str:
        """``data-train_<id>_2`` -> ``train#2`` (the training split's third execution); Ray Train's
        own request (``train-<id>``: its workers' CPUs) -> ``workers``."""
        if requester.startswith("data-") and requester.count("_") >= 2:
            parts = requester[5:].split("_")
            return f"{parts[0]}#{parts[-1]}"
        return "workers" if requester.startswith("train-") else requester

    def close(self) -> list[str]:
        self.stop.set()
        return self.lines


def stop_on_term(signum, frame) -> None:
    """SIGTERM (``timeout``'s, the device's) as Ctrl-C: the runs in progress stop, the finished ones
    still make the goals' table."""
    raise KeyboardInterrupt(f"signal {signum}")


def restart_ray(num_cpus: int | None) -> None:
    """A fresh embedded Ray with ``num_cpus`` CPUs (None: all of them)."""
    import ray

    from components.runtime import init_ray

    if ray.is_initialized():
        ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)  # the stopped instance's: start another, do not join it
    init_ray(None, num_cpus=num_cpus, log=lambda *x, **k: None)


class Report:
    """Printed as it goes, and appended to ``out`` line by line: a run cut short by a time limit
    still leaves what it measured. ``step`` prints (not to ``out``) the seconds since the start, so
    a log cut short says where the time went."""

    def __init__(self, out: str | None = None) -> None:
        self.out = Path(out) if out else None
        self.t0 = time.perf_counter()
        if self.out:
            self.out.write_text("")

    def step(self, what: str) -> None:
        print(f"[{time.perf_counter() - self.t0:.0f} s] {what}", flush=True)

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        if self.out:
            with self.out.open("a") as f:
                f.write(line + "\n")


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet50", "densenet121", "convnext_small"])
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--num-images", type=int, default=4000)
    p.add_argument("--prefetch", type=int, nargs="+",
                   help="--prefetch-batches values to stream with (default: 1 and 4; with --goals, 1)")  # fmt: skip
    p.add_argument("--gpu-decode-cpus", type=int, default=4, help="CPUs of the Ray instance for --decode-on gpu")
    p.add_argument(
        "--goals", action="store_true", help="only what issue 11's goals need: resnet50 at 224 and 512 px, no compile"
    )
    p.add_argument("--out", help="also write the report (Markdown) here")
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    say = Report(a.out)
    if a.goals:  # as issue 11 measured: 6,000 images; GPU decode where its goal is (the largest size)
        a.models, a.num_images = ["resnet50"], max(a.num_images, 6000)
    # --goals fits one device call: prefetch 4 was measured level with 1 (H200, 224 px: 2,378 vs 2,411 img/s)
    a.prefetch = a.prefetch or ([1] if a.goals else [1, 4])
    if not cuda:
        a.models, a.sizes, a.batch, a.steps, a.epochs, a.num_images = ["resnet10t"], [64], 16, 3, 2, 300
        a.gpu_decode_cpus = min(a.gpu_decode_cpus, os.cpu_count() or 1)
        say("No CUDA device: a tiny CPU run that checks this script. GPU figures were not measured.")
    else:
        say(f"GPU: {torch.cuda.get_device_name(0)}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    say(f"Command: python bench/gpu.py {' '.join(sys.argv[1:])}")

    compiles = (False,) if a.goals else (False, True)
    say(f"\n| model | px | channels-last | compile | ceiling img/s (batch {a.batch}) |\n|---|---:|---|---|---:|")
    best = {}
    for model in a.models:
        for size in a.sizes:
            for cl in (True,) if a.goals else (False, True):
                for comp in compiles:
                    say.step(f"ceiling {model} {size} px channels-last {cl} compile {comp}")
                    ips = ceiling(model, size, a.batch, a.steps, cl, comp, device)
                    best[(model, size, cl, comp)] = ips
                    say(f"| {model} | {size} | {cl} | {comp} | {ips:.0f} |")

    cpus = os.cpu_count() or 1
    say("\nCPU decode runs one thread per process, as a Ray Data task does.")
    say(f"\n| px | CPU decode, 1 process img/s | CPU decode, {cpus} processes img/s | device decode img/s |")
    say("|---:|---:|---:|---:|")
    decode = {}
    for size in a.sizes:
        say.step(f"decode {size} px")
        cpu = torch.device("cpu")
        one, pool = decode_speed(size, 256, cpu), decode_speed(size, 256 * cpus, cpu, cpus)
        on_device = decode_speed(size, 2048, device) if cuda else None
        decode[size] = (pool, on_device)
        shown = f"{on_device:.0f}" if on_device else "not measured (no GPU)"
        say(f"| {size} | {one:.0f} | {pool:.0f} | {shown} |")

    runs = []  # (model, size, decode_on, prefetch, cpus, history)
    signal.signal(signal.SIGTERM, stop_on_term)  # a time limit's SIGTERM still leaves the verdict
    try:
        with tempfile.TemporaryDirectory() as tmp:
            datasets = prepare_datasets(say, a, Path(tmp))
            halves_alone(say, a, datasets, device, cuda)
            streamed_runs(say, a, datasets, best, Path(tmp), cuda, runs)
    except KeyboardInterrupt:
        say("\nCut short (SIGTERM or Ctrl-C): the goals below count only the runs above.")
    goals(say, a, best, decode, runs, cuda)


def prepare_datasets(say, a, work: Path) -> dict:
    """One synthetic source at the largest size, prepared (downscaled) for each size: the synthesis
    is the slow part."""
    from components.data.prepare import PrepareOptions, prepare_dataset
    from components.data.synth import SynthOptions, write_synthetic_cxr_lt

    src, top = work / "src", max(a.sizes)
    say.step(f"synthetic data, {a.num_images} images at {top + top // 8} px")
    write_synthetic_cxr_lt(src, SynthOptions(num_images=a.num_images, image_size=top + top // 8, seed=0),
                           progress=None)  # fmt: skip
    datasets = {}
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # shards in parallel: PIL releases the GIL
        for size in a.sizes:
            say.step(f"prepare {size} px")
            datasets[size] = work / f"data{size}"
            opts = PrepareOptions("cxr-lt-2023", str(src), image_size=size + size // 8)
            prepare_dataset(opts, datasets[size], map_shards=lambda fn, shards: list(pool.map(fn, shards)),
                            log=lambda *x: None)  # fmt: skip
    return datasets


def halves_alone(say, a, datasets: dict, device, cuda: bool) -> None:
    """Each half alone: the loop with batches already on the device, and Ray Data with no training."""
    data_cpus = max((os.cpu_count() or 1) - worker_cpus(cuda), 1)  # what the streamed runs' worker leaves
    say("\n| model | px | training loop alone img/s "
        f"| Ray Data alone img/s ({data_cpus} CPUs; epoch 1 / later) |")  # fmt: skip
    say("|---|---:|---:|---:|")
    for size in a.sizes[:1] if a.goals else a.sizes:  # --goals: 224 px, where the gap was; fits the call
        say.step(f"loop alone and Ray Data alone, {size} px")
        loop = loop_alone(datasets[size], a.models[0], size, a.batch, device)
        ingest = ingest_alone(datasets[size], size, a.batch, device, data_cpus)
        say(f"| {a.models[0]} | {size} | {loop:.0f} | {ingest[0]:.0f} / {max(ingest[1:]):.0f} |")


def streamed_runs(say, a, datasets: dict, best: dict, work: Path, cuda: bool, runs: list) -> None:
    """Full ``ralflow`` training runs streamed by Ray Data, each from a cold Ray, appended to ``runs``
    as they finish (so a run cut short leaves the ones before it)."""
    say(
        "\n| model | px | decode on | Ray CPUs | prefetch | epoch 1 s | epoch 1 data wait | first batch, s "
        "(epoch 1 / last) | img/s (last epoch) "
        "| data wait (for Ray Data's tasks) | × ceiling (channels-last) | peak GB |"
    )
    say("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    # --decode-on cpu with every CPU; gpu with the few CPUs a GPU gets on a shared node (--goals:
    # where its goal is, the largest size). One CPU-decode run, then the GPU-decode ones, then
    # the other CPU-decode sizes: a run cut short by a time limit still has both kinds.
    gpu_sizes = [max(a.sizes)] if a.goals else a.sizes
    order = [("cpu", a.sizes[0]), *(("gpu", x) for x in gpu_sizes), *(("cpu", x) for x in a.sizes[1:])]
    runs_of = [(d, size, model, prefetch) for d, size in order for model in a.models for prefetch in a.prefetch]
    for decode_on, size, model, prefetch in runs_of:
        ray_cpus = a.gpu_decode_cpus if decode_on == "gpu" else None
        say.step(f"streamed {model} {size} px decode on {decode_on} prefetch {prefetch}")
        restart_ray(ray_cpus)  # every run starts cold, as a submitted job does
        watch = Reservations()
        flags = {"gpu": cuda, "data": {"decode_on": decode_on, "prefetch_batches": prefetch},
                 "train": {"channels_last": True, **({"amp": "bf16"} if cuda else {})}}  # fmt: skip
        name = f"{model}-{size}-{decode_on}-p{prefetch}"
        h = streamed(datasets[size], model, size, a.batch, a.epochs, flags, work / name)
        runs.append((model, size, decode_on, prefetch, ray_cpus or os.cpu_count() or 1, h))
        print(f"history {name}: {json.dumps(h)}", flush=True)  # every epoch, in the log only
        print(f"CPUs reserved to Ray Data's executions, {name}:", *watch.close(), sep="\n  ")
        say(streamed_row(runs[-1], best))


def of_ceiling(run: tuple, best: dict) -> float:
    """A streamed run's last-epoch speed as a fraction of its model's channels-last ceiling."""
    model, size, *_, h = run
    return h["images_per_s"][-1] / best[(model, size, True, False)]


def streamed_row(run: tuple, best: dict) -> str:
    """The streamed runs' table row of one run ``(model, size, decode_on, prefetch, cpus, history)``."""
    model, size, decode_on, prefetch, cpus, h = run
    peak = f"{h['gpu_peak_mem_gb'][-1]:.1f}" if h["gpu_peak_mem_gb"] else "n/a"
    upstream = h["data_wait_upstream_frac"]
    wait = f"{h['data_wait_frac'][-1]:.0%}" + (f" ({upstream[-1]:.0%})" if upstream else "")
    return (
        f"| {model} | {size} | {decode_on} | {cpus} | {prefetch} | {h['epoch_time_s'][0]:.1f} "
        f"| {h['data_wait_frac'][0]:.0%} | {h['data_wait_first_s'][0]:.2f} / {h['data_wait_first_s'][-1]:.2f} "
        f"| {h['images_per_s'][-1]:.0f} | {wait} | {of_ceiling(run, best):.2f} | {peak} |"
    )


def goals(say, a, best, decode, runs, cuda: bool) -> None:
    """Issue 11's goals, each with the best measured setting and whether it is met."""
    say("\n| goal | measured | met |\n|---|---|---|")

    def row(goal, value, ok):
        say(f"| {goal} | {value} | {('yes' if ok else 'no') if cuda else 'not measured on a GPU'} |")

    model = a.models[0]
    for size in a.sizes:
        cpu_runs = [r for r in runs if r[0] == model and r[1] == size and r[2] == "cpu"]
        if not cpu_runs:
            continue
        top = max(cpu_runs, key=lambda r: r[5]["images_per_s"][-1])
        ratio = of_ceiling(top, best)
        row(f"{model} {size} px streamed >= 0.9x ceiling", f"{ratio:.2f}x (prefetch {top[3]})", ratio >= 0.9)
        wait, first = top[5]["data_wait_frac"][-1], top[5]["data_wait_frac"][0]
        row(f"{model} {size} px data wait <= 5% after epoch 1", f"{wait:.1%} (same run)", wait <= 0.05)
        row(f"{model} {size} px epoch 1 data wait <= 20%", f"{first:.1%} (same run)", first <= 0.20)
    big = max(a.sizes)
    pool, on_device = decode[big]
    if on_device:
        row(f"GPU decode >= 3x CPU decode ({big} px, all CPUs)", f"{on_device / pool:.1f}x", on_device >= 3 * pool)
    gpu_runs = [r for r in runs if r[1] == big and r[2] == "gpu"]
    if gpu_runs:
        top = min(gpu_runs, key=lambda r: r[5]["data_wait_frac"][-1])
        wait = top[5]["data_wait_frac"][-1]
        row(f"GPU-decode training at {big} px with {top[4]} CPUs: data wait <= 5%", f"{wait:.1%} (prefetch {top[3]})",
            wait <= 0.05)  # fmt: skip


if __name__ == "__main__":
    main()
