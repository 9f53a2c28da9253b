"""GPU training speed, measured side by side in one run (issue 11):

1. compute-only ceiling: train steps on batches already on the device (bf16 autocast on CUDA),
   channels-last off/on, torch.compile off/on;
2. `ralflow train` streamed (Ray Data -> TorchTrainer) with the same model, size and flags:
   img/s per epoch, data wait, first-epoch time, peak GPU memory; and its ratio to the ceiling;
3. JPEG decode: one CPU process vs batched nvJPEG on the GPU (``decode_images``).

    python bench/gpu.py [--models resnet50 densenet121 convnext_small] [--sizes 224 512] [--epochs 3]

On a machine without CUDA it runs tiny (resnet10t at 64 px, a few steps) to check the script
itself, and says that GPU figures were not measured.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def ceiling(model_name: str, size: int, batch: int, steps: int, channels_last: bool, compile_: bool, device) -> float:
    """Images/s of forward + backward + AdamW on one fixed batch already on the device."""
    import torch

    from components.losses import build_loss
    from components.models import build_model
    from components.models.inputs import normalize

    model = build_model(model_name, 26, 1).to(device)
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


def decode_speed(size: int, n: int, device) -> float:
    import io

    import numpy as np
    from PIL import Image

    from components.data.ingest import decode_images
    from components.data.synth import LABELS, ChestRenderer

    renderer, rng = ChestRenderer(size), np.random.default_rng(0)
    blobs = []
    for _ in range(16):
        buf = io.BytesIO()
        Image.fromarray(renderer.render(np.zeros(len(LABELS)), rng)).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    blobs = (blobs * (n // 16 + 1))[:n]
    decode_images(blobs[:8], size, None, device)  # warm-up
    t0 = time.perf_counter()
    for i in range(0, n, 64):
        out = decode_images(blobs[i : i + 64], size, None, device)
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()
    del out
    return n / (time.perf_counter() - t0)


def streamed(data: Path, model_name: str, size: int, batch: int, epochs: int, flags: dict, work: Path) -> dict:
    import mlflow

    from components.config import load_config
    from components.train.trainer import run_training

    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    cfg = load_config(None, {
        "data": {"path": str(data), "image_size": size, **flags.get("data", {})},
        "model": {"name": model_name},
        "train": {"epochs": epochs, "batch_size": batch, "num_workers": 1, "cpus_per_worker": 2 if flags["gpu"] else 1,
                  "use_gpu": flags["gpu"], **flags.get("train", {})},
        "tracking": {"tracking_uri": uri, "storage_path": str(work / "runs"), "experiment": "gpu-bench"},
    })  # fmt: skip
    out = run_training(cfg, log=lambda *a, **k: None)
    c = mlflow.MlflowClient(uri)
    hist = {k: [m.value for m in sorted(c.get_metric_history(out["run_id"], k), key=lambda m: m.step)]
            for k in ("images_per_s", "data_wait_frac", "epoch_time_s", "gpu_peak_mem_gb")}  # fmt: skip
    return hist


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet50", "densenet121", "convnext_small"])
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--num-images", type=int, default=4000)
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        a.models, a.sizes, a.batch, a.steps, a.epochs, a.num_images = ["resnet10t"], [64], 16, 3, 2, 300
        print("No CUDA device: a tiny CPU run that checks this script. GPU figures were not measured.")
    else:
        print(f"GPU: {torch.cuda.get_device_name(0)}")

    from components.data.prepare import PrepareOptions, prepare_dataset
    from components.data.synth import SynthOptions, write_synthetic_cxr_lt
    from components.runtime import init_ray

    print("\n| model | px | channels-last | compile | ceiling img/s |\n|---|---:|---|---|---:|")
    best = {}
    for model in a.models:
        for size in a.sizes:
            for cl in (False, True):
                for comp in (False, True):
                    ips = ceiling(model, size, a.batch, a.steps, cl, comp, device)
                    best[(model, size, cl, comp)] = ips
                    print(f"| {model} | {size} | {cl} | {comp} | {ips:.0f} |", flush=True)

    print("\n| px | CPU decode, 1 process img/s | device decode img/s |\n|---:|---:|---:|")
    for size in a.sizes:
        cpu = decode_speed(size, 256, torch.device("cpu"))
        gpu = f"{decode_speed(size, 1024, device):.0f}" if cuda else "not measured (no GPU)"
        print(f"| {size} | {cpu:.0f} | {gpu} |", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        init_ray(None, log=lambda *x, **k: None)
        print("\n| model | px | decode on | epoch 1 s | img/s (last epoch) | data wait | × ceiling (channels-last) | "
              "peak GB |\n|---|---:|---|---:|---:|---:|---:|---:|")  # fmt: skip
        for size in a.sizes:
            src, data = work / f"src{size}", work / f"data{size}"
            write_synthetic_cxr_lt(src, SynthOptions(num_images=a.num_images, image_size=size + size // 8, seed=0),
                                   progress=None)  # fmt: skip
            prepare_dataset(PrepareOptions("cxr-lt-2023", str(src), image_size=size + size // 8), data,
                            log=lambda *x: None)  # fmt: skip
            for model in a.models:
                for decode_on in ("cpu", "gpu"):
                    flags = {"gpu": cuda, "data": {"decode_on": decode_on}, "train": {"channels_last": True}}
                    h = streamed(data, model, size, a.batch, a.epochs, flags, work / f"{model}-{size}-{decode_on}")
                    ratio = h["images_per_s"][-1] / best[(model, size, True, False)]
                    peak = f"{h['gpu_peak_mem_gb'][-1]:.1f}" if h["gpu_peak_mem_gb"] else "n/a"
                    first, ips, wait = h["epoch_time_s"][0], h["images_per_s"][-1], h["data_wait_frac"][-1]
                    print(f"| {model} | {size} | {decode_on} | {first:.1f} | {ips:.0f} | {wait:.0%} | {ratio:.2f} "
                          f"| {peak} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
