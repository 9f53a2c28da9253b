"""Ingest throughput, measured side by side in one run (images/s):

  (a) decode only: the shards' JPEG bytes decoded in W processes (no augmentation, no Ray)
  (a2) decode + the same augmentation in W processes: the compute ceiling for (b) and (c)
  (b) Ray Data: the training pipeline (decode + augmentation in map tasks) to iter_torch_batches,
      as ralflow runs it on its embedded local Ray; (b0) the same with Ray's default per-operator
      resource reservation, as on a cluster
  (c) torch DataLoader: the same JPEGs as files, same decode + transforms, W worker processes

    python bench/ingest.py [--num-images 3000] [--stored-size 256] [--image-size 224] [--workers 2] [--rounds 5]

Goals: (b) >= 1.0x (c) and (b) >= 0.8x (a). (a) does no augmentation, so the second goal is
measured like for like: the same Ray Data pipeline decoding only, (b-decode), against (a); and
(b) against the augmenting ceiling (a2).

Every pipeline stays warm (worker processes started, torch imported) and each round times one
epoch of every variant back to back; ratios are taken within a round, so a busy stretch of a
shared machine hits all variants alike. The table gives medians and the per-round range.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _decode_chunk(blobs):
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    torch.set_num_threads(1)
    for b in blobs:
        decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.GRAY)
    return len(blobs)


def _augment_chunk(args):
    import torch

    from components.data.ingest import DecodeTransform
    from components.models.inputs import normalize

    torch.set_num_threads(1)
    blobs, labels, image_size, augment = args
    out = DecodeTransform(image_size, augment)({"image": blobs, "labels": labels, "mask": labels})
    return len(normalize(torch.as_tensor(out["image"])))


class FileDataset:
    def __init__(self, files, labels, image_size, augment):
        from components.data.ingest import DecodeTransform

        self.files, self.labels = files, labels
        self.transform = DecodeTransform(image_size, augment)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        data = Path(self.files[i]).read_bytes()
        out = self.transform({"image": [data], "labels": [self.labels[i]], "mask": [self.labels[i]]})
        return out["image"][0], out["labels"][0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-images", type=int, default=3000)
    ap.add_argument("--stored-size", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="CPU workers for every variant")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; each times one epoch of every variant, in turn")
    ap.add_argument(
        "--map-cpus",
        type=float,
        default=1.0,
        help="CPUs per Ray Data decode task: 1 runs one task per worker CPU; ralflow's training "
        "default (data.map_cpus) is 0.5, two tasks per CPU beside the training workers",
    )
    args = ap.parse_args()

    import logging

    import pyarrow.parquet as pq
    import ray
    import torch

    from components.data.ingest import AugmentOptions, build_ray_dataset
    from components.data.prepare import PrepareOptions, prepare_dataset
    from components.data.synth import SynthOptions, write_synthetic_cxr_lt
    from components.models.inputs import normalize

    work = Path(tempfile.mkdtemp(prefix="ralflow-bench-ingest-"))
    write_synthetic_cxr_lt(
        work / "src", SynthOptions(num_images=args.num_images, image_size=args.stored_size), progress=None
    )
    manifest = prepare_dataset(
        PrepareOptions("cxr-lt-2023", str(work / "src"), image_size=args.stored_size, rows_per_shard=256),
        work / "data",
        log=lambda *_: None,
    )
    paths = manifest.shard_paths("train")
    table = pq.read_table(paths, columns=["image", "labels"])
    blobs, labels = table.column("image").to_pylist(), table.column("labels").to_pylist()
    n = len(blobs)
    files = []
    (work / "jpeg").mkdir()
    for i, b in enumerate(blobs):
        f = work / "jpeg" / f"{i:06d}.jpg"
        f.write_bytes(b)
        files.append(str(f))
    augment = AugmentOptions()
    map_cpus = args.map_cpus
    print(
        f"{n} training images stored at {args.stored_size}px -> batches at {args.image_size}px, "
        f"{args.workers} CPU workers each ({map_cpus} CPU per Ray Data task), {args.rounds} rounds, "
        f"torch {torch.__version__}, ray {ray.__version__}"
    )

    from ray.data import DataContext

    from components.runtime import SYSTEM_CONFIG, use_all_local_cpus_for_data

    ray.init(
        num_cpus=args.workers,
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
        _system_config=dict(SYSTEM_CONFIG),
    )
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    DataContext.get_current().enable_progress_bars = False
    # A Dataset keeps a copy of the DataContext it was created under: (b0) keeps Ray's default
    # per-operator reservation (as on clusters), the others get ralflow's local-Ray setting.
    ds_b0 = build_ray_dataset(manifest, "train", args.image_size, augment, num_cpus=map_cpus)
    use_all_local_cpus_for_data()
    ds_b = build_ray_dataset(manifest, "train", args.image_size, augment, num_cpus=map_cpus)
    ds_b_decode = build_ray_dataset(
        manifest, "train", args.stored_size, None, num_cpus=map_cpus
    )  # like (a): no resize, no augmentation
    loader = torch.utils.data.DataLoader(
        FileDataset(files, labels, args.image_size, augment),
        batch_size=args.batch_size,
        num_workers=args.workers,
        shuffle=True,
        persistent_workers=True,
    )
    pool = ProcessPoolExecutor(args.workers)
    chunks = [blobs[i : i + 100] for i in range(0, n, 100)]
    aug_chunks = [(blobs[i : i + 64], labels[i : i + 64], args.image_size, augment) for i in range(0, n, 64)]

    def ray_epoch(ds, consume=normalize) -> int:  # every epoch is a new Ray Data execution, as in training
        return sum(len(consume(b["image"])) for b in ds.iter_torch_batches(batch_size=args.batch_size))

    variants = {
        "a": lambda: sum(pool.map(_decode_chunk, chunks)),
        "a2": lambda: sum(pool.map(_augment_chunk, aug_chunks)),
        "b": lambda: ray_epoch(ds_b),
        "b0": lambda: ray_epoch(ds_b0),
        "b-decode": lambda: ray_epoch(ds_b_decode, consume=lambda images: images),  # batches left as they arrive
        "c": lambda: sum(len(normalize(x)) for x, _ in loader),
    }
    for run in variants.values():  # warm-up: worker processes start and import torch
        assert run() == n
    rates = {k: [] for k in variants}
    for r in range(args.rounds):
        # One epoch of each variant per round, back to back, so a slower or busier stretch of a
        # shared machine hits every variant alike; ratios are taken within a round.
        for name, run in variants.items():
            t0 = time.perf_counter()
            assert run() == n
            rates[name].append(n / (time.perf_counter() - t0))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()), flush=True)
    pool.shutdown()
    ray.shutdown()

    med = {k: statistics.median(v) for k, v in rates.items()}

    def ratio(x: str, y: str) -> str:
        per_round = sorted(p / q for p, q in zip(rates[x], rates[y]))
        return f"{statistics.median(per_round):.2f} × ({y}) [{per_round[0]:.2f}–{per_round[-1]:.2f}]"

    print(f"\nmedian images/s over {args.rounds} rounds; ratios: median of the per-round ratios [min–max]")
    print("| variant | images/s | ratio |")
    print("|---|---:|---:|")
    print(f"| (a) decode only | {med['a']:.0f} | 1.00 × (a) |")
    print(f"| (a2) decode + augmentation, W processes (compute ceiling) | {med['a2']:.0f} | {ratio('a2', 'a')} |")
    print(
        f"| (b) Ray Data -> iter_torch_batches (ralflow's local Ray) | {med['b']:.0f} | "
        f"{ratio('b', 'c')}, {ratio('b', 'a2')} |"
    )
    print(
        f"| (b0) the same with Ray's default resource reservation (clusters) | {med['b0']:.0f} | {ratio('b0', 'c')} |"
    )
    print(f"| (b-decode) the same pipeline, decode only (as (a)) | {med['b-decode']:.0f} | {ratio('b-decode', 'a')} |")
    print(f"| (c) DataLoader over JPEG files | {med['c']:.0f} | {ratio('c', 'a2')} |")
    print(
        f"goals: (b)/(c) = {ratio('b', 'c')} (>= 1.0); decode only, (b-decode)/(a) = {ratio('b-decode', 'a')} (>= 0.8)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
