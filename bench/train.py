"""Training benchmarks, measured in one run.

1. Throughput: images/s of one Ray Train worker (TorchTrainer, Ray Data streaming, decode and
   augmentation in Ray Data tasks) vs a plain single-process PyTorch loop with the same model,
   batch size and thread count, fed (a) by the same Ray Data stream, timed per epoch like the
   worker, and (b) from batches decoded in memory beforehand. Goal: >= 0.95x.
2. Warm ingest: the first epoch's wait for data (for its first batch, and in all) of a fresh
   `ralflow train` with the decode processes prestarted (the default) and without
   (`--no-prestart-workers`), alternated over --rounds rounds.
3. Quality: macro / head / medium / tail validation mAP of bce, asl and ral with default
   parameters and the same budget on a synthetic CXR-LT stand-in.

    python bench/train.py [--num-images 6000] [--image-size 64] [--model resnet10t] [--epochs 6]
    python bench/train.py --num-images 3000 --skip-quality --skip-throughput    # warm ingest only
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def plain_loop_images_per_s(data, image_size, model_name, batch_size, steps, streamed):
    """Single process, one thread (what a 1-CPU Ray Train worker gets), same model, loss, optimizer
    and batches. `streamed=True`: a whole epoch streamed from the same Ray Data pipeline the worker
    reads (decoded on the machine's other core meanwhile), timed like the worker's epoch: from the
    iterator's creation, pipeline start-up included, after one warm-up epoch. `streamed=False`:
    `steps` batches decoded into memory first, then trained on (pure compute, an upper bound)."""
    import torch

    from components.config import load_config
    from components.data.ingest import AugmentOptions, build_ray_dataset
    from components.data.manifest import Manifest
    from components.losses import build_loss
    from components.models.inputs import normalize
    from components.train.build import build_model_for

    torch.set_num_threads(1)
    torch.manual_seed(0)
    manifest = Manifest.load(data)
    # the model `ralflow train --model NAME` builds (its default head included)
    model = build_model_for(load_config(None, {"model": {"name": model_name}}), len(manifest.label_names))
    loss_fn = build_loss("ral")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(b):
        loss = loss_fn(model(normalize(b["image"])), b["labels"], mask=b["mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        return len(b["image"])

    ds = build_ray_dataset(manifest, "train", image_size, AugmentOptions())
    if streamed:
        for _ in range(2):  # the first epoch warms the pipeline up; the second is timed
            t0 = time.perf_counter()
            n = sum(step(b) for b in ds.iter_torch_batches(batch_size=batch_size))
        return n / (time.perf_counter() - t0)
    batches = [b for b, _ in zip(ds.iter_torch_batches(batch_size=batch_size), range(steps + 2))]
    for b in batches[:2]:
        step(b)
    t0 = time.perf_counter()
    n = sum(step(b) for b in batches[2:])
    return n / (time.perf_counter() - t0)


def train_cli(args, *extra):
    cmd = [str(Path(sys.executable).with_name("ralflow")), "train", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=args.work)
    if out.returncode != 0:
        raise SystemExit(f"train failed: {out.stderr[-2000:]}")
    return out.stdout + out.stderr


def warm_ingest(args, common) -> None:
    """First-epoch data wait of fresh one-epoch runs (one 1-CPU worker), prestarted or not, the
    two variants alternated so that drift of a shared machine hits both alike."""
    import mlflow

    waits = {True: [], False: []}
    for r in range(args.rounds):
        for prestart in (False, True):
            name = f"warm-{r}-{'on' if prestart else 'off'}"
            flag = "--prestart-workers" if prestart else "--no-prestart-workers"
            train_cli(args, *common, "--loss", "ral", "--epochs", "1", "--num-workers", "1", "--cpus-per-worker",
                      "1", flag, "--run-name", name)  # fmt: skip
            client = mlflow.MlflowClient(f"sqlite:///{args.work}/mlflow.db")
            experiment = client.get_experiment_by_name("ralflow").experiment_id
            (run,) = client.search_runs([experiment], filter_string=f"attributes.run_name = '{name}'")
            m = run.data.metrics
            # data_wait_frac is a share of the training time; epoch_time_s also counts validation
            waits[prestart].append(
                (f"{m['data_wait_first_s']:.1f}", f"{m['data_wait_frac']:.1%}", f"{m['epoch_time_s']:.1f}")
            )
    print(f"\nwarm ingest: first epoch of a fresh run, one 1-CPU worker, {args.rounds} rounds")
    print("| decode processes | waited for the first batch, s | data wait (share of training) | epoch s |")
    print("|---|---:|---:|---:|")
    for prestart, what in ((False, "started by Ray Data (`--no-prestart-workers`)"), (True, "prestarted (default)")):
        cols = zip(*waits[prestart])
        print(f"| {what} | " + " | ".join(", ".join(col) for col in cols) + " |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-images", type=int, default=6000)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--model", default="resnet10t")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--losses", default="bce,asl,ral")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-warm", action="store_true", help="skip the warm-ingest comparison")
    ap.add_argument("--rounds", type=int, default=2, help="warm ingest: rounds of the two variants")
    args = ap.parse_args()
    args.work = Path(tempfile.mkdtemp(prefix="ralflow-bench-train-"))

    import ray

    from components.data.prepare import PrepareOptions, prepare_dataset
    from components.data.synth import SynthOptions, write_synthetic_cxr_lt
    from components.runtime import SYSTEM_CONFIG  # the same Ray settings `ralflow train` starts with

    write_synthetic_cxr_lt(
        args.work / "src",
        SynthOptions(num_images=args.num_images, image_size=max(args.image_size, 64) * 2),
        progress=None,
    )
    data = args.work / "data"
    manifest = prepare_dataset(
        PrepareOptions("cxr-lt-2023", str(args.work / "src"), image_size=args.image_size), data, log=lambda *_: None
    )
    common = [
        "--data",
        str(data),
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        "--image-size",
        str(args.image_size),
        "--tracking-uri",
        f"sqlite:///{args.work}/mlflow.db",
        "--storage-path",
        str(args.work / "runs"),
        "--lr",
        str(args.lr),
    ]

    # 1. throughput, same process budget: one 1-CPU worker vs the plain loop on one thread. The
    # plain loops run before and after the Ray run, so drift of this shared machine shows.
    steps = max(4, min(30, manifest.split("train").num_images // args.batch_size - 2))

    def plain(streamed):
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=False,
            _system_config=dict(SYSTEM_CONFIG),
        )
        try:
            return plain_loop_images_per_s(data, args.image_size, args.model, args.batch_size, steps, streamed)
        finally:
            ray.shutdown()

    if not args.skip_throughput:
        before = {s: plain(s) for s in (True, False)}
        out = train_cli(
            args,
            *common,
            "--loss",
            "ral",
            "--epochs",
            "3",
            "--num-workers",
            "1",
            "--cpus-per-worker",
            "1",
            "--run-name",
            "throughput",
        )
        ray_ips = [float(v) for v in re.findall(r"(\d+) img/s", out)][-1]  # the last epoch: warm
        after = {s: plain(s) for s in (True, False)}
        print(f"\nmodel {args.model}, {args.image_size}px, batch {args.batch_size}, CPU, one training thread each")
        print("| loop | images/s (before / after the Ray run) | Ray Train / this |")
        print("|---|---:|---:|")
        for streamed, what in (
            (True, "an epoch streamed from the same Ray Data pipeline"),
            (False, "batches pre-decoded in memory (compute only)"),
        ):
            b, a = before[streamed], after[streamed]
            print(
                f"| plain PyTorch, {what} | {b:.0f} / {a:.0f} | {ray_ips / max(a, b):.2f}–{ray_ips / min(a, b):.2f} |"
            )
        print(f"| Ray Train, one worker (TorchTrainer, get_dataset_shard) | {ray_ips:.0f} | 1.00 |", flush=True)

    if not args.skip_warm:
        warm_ingest(args, common)
    if args.skip_quality:
        return 0
    rows = []
    for loss in args.losses.split(","):
        t0 = time.perf_counter()
        out = train_cli(
            args,
            *common,
            "--loss",
            loss,
            "--epochs",
            str(args.epochs),
            "--num-workers",
            "2",
            "--run-name",
            f"quality-{loss}",
        )
        m = re.search(r"best epoch (\d+): val mAP ([\d.]+) \(head ([\d.]+), medium ([\d.]+), tail ([\d.]+)\)", out)
        rows.append((loss, *m.groups()[1:], time.perf_counter() - t0))
        print(f"  {loss}: done", file=sys.stderr, flush=True)
    print(
        f"\nquality: {args.num_images} synthetic images, {args.image_size}px, {args.model}, {args.epochs} epochs, "
        "2 workers, defaults"
    )
    print("| loss | val mAP | head | medium | tail | wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for loss, m, h, md, t, secs in rows:
        print(f"| {loss} | {m} | {h} | {md} | {t} | {secs:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
