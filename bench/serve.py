"""`ralflow serve` under load: N concurrent clients POST a DICOM film, for several concurrency
levels and with request batching on and off, against one running service. Prints requests/s and
p50/p99 latency per setting (CPU, or a GPU when the machine has one).

    python bench/serve.py [--model resnet50] [--image-size 224] [--requests 200] [--concurrency 1 8 32]

The service runs on ralflow's embedded local Ray, serving a registered model with random
weights (speed does not depend on the weights) from a throw-away SQLite store. Each setting is
warmed up first; "batch 1" redeploys with --max-batch-size 1 for comparison.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def register(uri: str, model: str, size: int) -> None:
    from components.data.labels import CXR_LT_2023_COUNTS
    from components.models import build_model
    from components.tracking import ModelRegistry, TrackedRun

    labels = list(CXR_LT_2023_COUNTS)
    run = TrackedRun.create(uri, "bench", "serve-bench")
    run.log_model(build_model(model, len(labels), 1).state_dict(), model, 1, size, labels)
    run.finish()
    registry = ModelRegistry(uri)
    registry.set_alias("bench", "champion", registry.register("bench", run.run_id, {}))


def film(size: int) -> bytes:
    """A 12-bit DICOM film, 2x the model's input size (the service resizes it, as for real films)."""
    import numpy as np

    from components.data.images import encode_dicom

    return encode_dicom((np.random.default_rng(0).random((2 * size, 2 * size)) * 4095).astype(np.uint16))


def post(url: str, body: bytes) -> float:
    t0 = time.perf_counter()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/dicom"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        json.loads(resp.read())
    return time.perf_counter() - t0


def load(url: str, body: bytes, requests: int, concurrency: int) -> dict:
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: post(url, body), range(min(requests, 2 * concurrency))))  # warm-up
        t0 = time.perf_counter()
        latencies = sorted(pool.map(lambda _: post(url, body), range(requests)))
        wall = time.perf_counter() - t0
    return {
        "rps": requests / wall,
        "p50": statistics.median(latencies) * 1000,
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000,
    }


def serve(uri: str, port: int, batch: int, cpus: float, log: Path) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).with_name("ralflow")), "serve", "--model-name", "bench", "--tracking-uri", uri,
           "--port", str(port), "--max-batch-size", str(batch), "--cpus-per-replica", str(cpus)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"ralflow serve exited: {log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return proc
        except OSError:
            time.sleep(1)
    raise SystemExit("ralflow serve did not start in 300 s")


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--batch", type=int, nargs="+", default=[16, 1], help="max batch sizes to compare")
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    a = p.parse_args()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only (not measured on a GPU)"
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        register(uri, a.model, a.image_size)
        body = film(a.image_size)
        print(f"ralflow serve, {a.model} at {a.image_size} px, {len(body) // 1024} KiB DICOM per request, {device}")
        print("| max batch | concurrent clients | requests/s | p50 ms | p99 ms |")
        print("|---:|---:|---:|---:|---:|")
        for batch in a.batch:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            proc = serve(uri, port, batch, a.cpus_per_replica, Path(tmp) / f"serve-{batch}.log")
            try:
                for c in a.concurrency:
                    r = load(f"http://127.0.0.1:{port}/predict", body, a.requests, c)
                    print(f"| {batch} | {c} | {r['rps']:.1f} | {r['p50']:.0f} | {r['p99']:.0f} |", flush=True)
            finally:
                proc.terminate()  # SIGTERM: ralflow closes Serve (SIGINT may be ignored in a background job)
                proc.wait(timeout=300)


if __name__ == "__main__":
    main()
