"""GPU-only paths (issue 11), skipped without CUDA: nvJPEG decoding gives the CPU decoder's images
(JPEG decoders may round differently: within 2 grey levels), batches made ahead on a side stream
are complete when the step reads them, and a 2-epoch bf16 run with channels-last, worker-side
decode, two batches made ahead and a shuffle buffer trains and logs its peak GPU memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_nvjpeg_decodes_the_cpu_decoders_images():
    import io

    from PIL import Image

    from components.data.ingest import AugmentOptions, decode_images

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(8):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (96, 96), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    cpu = decode_images(blobs, 64, None, "cpu")
    gpu = decode_images(blobs, 64, None, "cuda")
    assert gpu.device.type == "cuda" and (gpu.cpu().int() - cpu.int()).abs().max() <= 2
    aug = AugmentOptions(hflip=True)
    a = decode_images(blobs, 64, aug, "cpu", torch.Generator().manual_seed(0))
    b = decode_images(blobs, 64, aug, "cuda", torch.Generator().manual_seed(0))
    assert (b.cpu().float() - a.float()).abs().mean() < 2  # same draws, same warp, on another device


def test_batches_made_on_the_side_stream_are_whole_on_the_consumers():
    from components.data.prefetch import Prefetcher

    def batches():
        for i in range(20):
            x = torch.full((2048, 2048), float(i), device="cuda")
            yield {"x": x * 2 + 1, "labels": torch.ones(4, device="cuda")}  # kernels queued on the side stream

    for i, batch in enumerate(Prefetcher(batches(), ahead=3, device=torch.device("cuda", 0))):
        assert bool((batch["x"] == 2 * i + 1).all())


@pytest.mark.ray
def test_two_epochs_in_bf16_on_the_gpu(tiny_dataset, tmp_path, ray_address):
    import mlflow

    from components.config import load_config
    from components.train import run_training

    cfg = load_config(None, {
        "data": {"path": str(tiny_dataset), "image_size": 32, "decode_on": "gpu", "prefetch_batches": 2,
                 "shuffle_buffer": 64},
        "model": {"name": "resnet10t"},
        "train": {"epochs": 2, "batch_size": 32, "num_workers": 1, "use_gpu": True, "amp": "bf16"},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "storage_path": str(tmp_path / "runs")},
    })  # fmt: skip
    out = run_training(cfg, log=lambda *_: None)
    run = mlflow.MlflowClient(cfg.tracking.tracking_uri).get_run(out["run_id"])
    assert run.info.status == "FINISHED" and out["best_val_mAP"] > 0
    assert run.data.metrics["gpu_peak_mem_gb"] > 0
