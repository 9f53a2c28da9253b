"""Prepared Parquet dataset -> Ray Dataset of model-ready batches.

Decode and augmentation run in Ray Data ``map_batches`` tasks on CPUs (anywhere in the
cluster): workers see ready uint8 images via ``iter_torch_batches`` and normalise them on their
device. With ``data.decode_on: gpu`` the tasks pass the stored JPEG bytes instead, and the worker
decodes and augments them on its device (``device_batches``), ahead of the step
(``components.data.prefetch``). Chest X-rays are not mirror-symmetric (heart on the left), so
horizontal flip is off by default.
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import threading
from dataclasses import dataclass

import numpy as np

from ..paths import filesystem_for
from .manifest import Manifest
from .sampling import AUG_SEED_COLUMN, SamplingPlan, sample_row_group


@dataclass(frozen=True)
class AugmentOptions:
    crop_scale_min: float = 0.75  # RandomResizedCrop area range [min, 1]
    rotation_degrees: float = 7.0
    hflip: bool = False
    brightness: float = 0.2
    contrast: float = 0.2


@contextlib.contextmanager
def deferred_interrupts():
    """Hold back KeyboardInterrupt until the block ends.

    Ray cancels a running task (Ray Data does so when a consumer stops early, e.g. after
    ``limit``) by interrupting its main thread. An import cut short that way leaves half-initialised
    modules in ``sys.modules``, and the worker process is reused: every later task in it then
    fails to import torchvision ("partially initialized module", "no attribute 'compiler'")."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        if callable(previous):
            previous(*pending[0])
        raise KeyboardInterrupt


class DecodeTransform:
    """Batch callable: JPEG bytes -> (B, 1, S, S) uint8, plus labels/mask as (B, C) float32.

    Augmentation is vectorised over small chunks of images (one affine warp per chunk, each image
    with its own random parameters): fewer, larger calls save per-call overhead, but a chunk whose
    float working set outgrows the CPU caches costs more per image than it saves (bench/ingest.py
    times the chunk sizes)."""

    CACHE_BYTES = 5 << 20  # float working set of one warp (input, sampling grid, output)

    def __init__(self, image_size: int, augment: AugmentOptions | None, keep_ids: bool = False) -> None:
        import_decode_modules()  # a worker's first call imports torch + torchvision (unless prestarted)
        self.image_size = image_size
        self.augment = augment
        self.keep_ids = keep_ids  # string ids cannot go through iter_torch_batches

    def __call__(self, batch: dict) -> dict:
        generator = None
        if self.augment is not None and AUG_SEED_COLUMN in batch and len(batch[AUG_SEED_COLUMN]):
            import torch  # the row group's seeded draws (components.data.sampling)

            generator = torch.Generator().manual_seed(int(batch[AUG_SEED_COLUMN][0]))
        out = decode_images(batch["image"], self.image_size, self.augment, generator=generator, chunk=self.chunk_size)
        result = {"image": out.numpy(), "labels": _stack(batch["labels"]), "mask": _stack(batch["mask"])}
        if self.keep_ids:
            for key in ID_COLUMNS:
                result[key] = np.asarray(batch[key])
        return result

    def chunk_size(self, side: int) -> int:
        """Images per warp: as many as keep its float working set (4 bytes per pixel of the input,
        of the two-channel sampling grid and of the output) within CACHE_BYTES."""
        per_image = 4 * (side * side + 3 * self.image_size * self.image_size)
        return max(1, self.CACHE_BYTES // per_image)


def decode_images(blobs, image_size: int, augment: AugmentOptions | None, device="cpu", generator=None, chunk=None):
    """JPEG bytes -> (B, 1, S, S) uint8 on ``device``: decoded there (nvJPEG, batched, on CUDA),
    then resized, or augmented (random resized crop, rotation, flip, brightness, contrast) with
    parameters drawn from ``generator``. The Ray Data tasks (``data.decode_on: cpu``) and the
    training worker (``gpu``) run this same function, so both paths give the same images for the
    same parameters. ``chunk(side)``: images per warp (CPU cache sizing), default all at once."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    images = decode_jpeg(datas, mode=ImageReadMode.GRAY, device=device) if datas else []
    out = torch.empty((len(images), 1, image_size, image_size), dtype=torch.uint8, device=device)
    step = chunk(max(images[0].shape[-2:])) if chunk and len(images) else max(len(images), 1)
    for i in range(0, len(images), step):
        part = images[i : i + step]
        if len({tuple(im.shape) for im in part}) > 1:  # prepared datasets are square; others resize first
            side = max(max(im.shape[-2:]) for im in part)
            part = [resize_batch(im[None], side)[0] for im in part]
        x = torch.stack(part)
        if augment:
            params = {k: v.to(device) for k, v in augment_params(len(part), augment, generator).items()}
            out[i : i + len(part)] = augment_batch(x, image_size, augment, params)
        else:
            out[i : i + len(part)] = resize_batch(x, image_size)
    return out


def _to_uint8(x):
    import torch

    return x.round_().clamp_(0, 255).to(dtype=torch.uint8)


def resize_batch(x, size: int):
    """(B, C, H, W) uint8 -> (B, C, size, size) uint8, bilinear with antialiasing (as v2.Resize)."""
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == (size, size):
        return x
    return _to_uint8(F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False))


def augment_params(n: int, opts: AugmentOptions, generator=None) -> dict:
    """Per-image random parameters, drawn as torchvision's RandomResizedCrop (area in
    [crop_scale_min, 1], log-uniform aspect ratio in [0.9, 1.1]), RandomRotation (uniform angle)
    and ColorJitter (uniform factors) draw theirs."""
    import torch

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    area = uniform(opts.crop_scale_min, 1.0)
    ratio = torch.exp(uniform(math.log(0.9), math.log(1.1)))
    w, h = (
        torch.sqrt(area * ratio).clamp(max=1.0),
        torch.sqrt(area / ratio).clamp(max=1.0),
    )  # crop half-extents in [-1, 1]
    return {
        "w": w,
        "h": h,
        "cx": (1 - w) * uniform(-1.0, 1.0),
        "cy": (1 - h) * uniform(-1.0, 1.0),
        "angle": torch.deg2rad(uniform(-opts.rotation_degrees, opts.rotation_degrees)),
        "flip": (torch.rand(n, generator=generator) < 0.5) if opts.hflip else torch.zeros(n, dtype=torch.bool),
        "brightness": uniform(1 - opts.brightness, 1 + opts.brightness),
        "contrast": uniform(1 - opts.contrast, 1 + opts.contrast),
    }


def augment_batch(x, size: int, opts: AugmentOptions, params: dict | None = None):
    """(B, 1, H, W) uint8 -> (B, 1, size, size) uint8: random resized crop, then rotation about the
    centre (zero fill), optional horizontal flip, then brightness and contrast, every image with
    its own parameters, in one bilinear warp for the whole batch."""
    import torch
    import torch.nn.functional as F

    n = len(x)
    p = params or augment_params(n, opts)
    img = x.float()
    smallest_crop = max(math.sqrt(opts.crop_scale_min * 0.9), 1e-3)  # narrowest crop side, as a fraction
    pre = math.ceil(size / smallest_crop)
    if img.shape[-1] > 1.25 * pre:  # a large downscale: antialias first, as a resize would
        img = F.interpolate(img, size=(pre, pre), mode="bilinear", antialias=True, align_corners=False)
    # Output coords (normalised, [-1, 1]) -> input coords: rotate, then map into the crop box.
    # (F.affine_grid computes the same grid through a batched matmul, which is slower on CPU.)
    cos, sin = torch.cos(p["angle"]).view(n, 1, 1), torch.sin(p["angle"]).view(n, 1, 1)
    sign = torch.where(p["flip"], -1.0, 1.0).view(n, 1, 1)
    w, h = p["w"].view(n, 1, 1), p["h"].view(n, 1, 1)
    u = (torch.arange(size, dtype=torch.float32, device=x.device) * 2 + 1) / size - 1  # pixel centres
    xs, ys = u.view(1, 1, size), u.view(1, size, 1)
    grid = torch.empty(n, size, size, 2, device=x.device)
    torch.add(w * cos * sign * xs, -w * sin * ys, out=grid[..., 0]).add_(p["cx"].view(n, 1, 1))
    torch.add(h * sin * sign * xs, h * cos * ys, out=grid[..., 1]).add_(p["cy"].view(n, 1, 1))
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out.mul_(p["brightness"].view(n, 1, 1, 1)).clamp_(0, 255)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out.sub_(mean).mul_(p["contrast"].view(n, 1, 1, 1)).add_(mean)
    return _to_uint8(out)


def import_decode_modules() -> int:
    """Ray task body: import what a decode task imports (torch, torchvision's JPEG decoder), in a
    worker process that Ray then keeps for later tasks; returns its pid."""
    import os

    with deferred_interrupts():
        import torch  # noqa: F401
        import torchvision.io  # noqa: F401
    return os.getpid()


def prestart_decode_workers(count: int, num_cpus: float, runtime_env: dict | None = None) -> list:
    """Start ``count`` Ray worker processes and import the decode modules in them, not waiting for
    it. Ray Data starts the processes its decode tasks run in only when the first epoch asks for
    data, and each spends seconds importing torch before it decodes anything (on an H200 node the
    first epoch waited 76% of its time for data). Started from the driver, they import while Ray
    Train is still starting its workers, and Ray Data's tasks run in them: Ray keeps an idle
    process for the next task of the same job *and runtime environment*, so ``runtime_env`` must
    be the one those tasks will have (``trainer.data_task_runtime_env``)."""
    import ray

    task = ray.remote(import_decode_modules).options(num_cpus=num_cpus, runtime_env=runtime_env, max_retries=0)
    return [task.remote() for _ in range(count)]


@functools.lru_cache(maxsize=8)
def _transform(image_size: int, augment: AugmentOptions | None, keep_ids: bool) -> DecodeTransform:
    return DecodeTransform(image_size, augment, keep_ids)


# What ``keep_ids`` keeps: the image, its study (the unit CXR-LT labels) and its view.
ID_COLUMNS = ("image_id", "study_id", "view")


def decode_batch(batch: dict, image_size: int, augment: AugmentOptions | None, keep_ids: bool = False) -> dict:
    """Stateless task form of DecodeTransform (the transform is cached per process)."""
    return _transform(image_size, augment, keep_ids)(batch)


def _stack(column) -> np.ndarray:
    arr = np.asarray(column)
    if arr.dtype == object:
        arr = np.stack([np.asarray(v, dtype=np.float32) for v in column])
    return arr.astype(np.float32, copy=False)


def encoded_batch(batch: dict, keep_ids: bool = False) -> dict:
    """Ray Data task body for ``decode=False``: the stored JPEG bytes, labels and masks as they are."""
    out = {"image": np.asarray(batch["image"], dtype=object), "labels": _stack(batch["labels"]),
           "mask": _stack(batch["mask"])}  # fmt: skip
    if keep_ids:
        for key in ID_COLUMNS:
            out[key] = np.asarray(batch[key])
    return out


def device_batches(batches, device, image_size: int, augment: AugmentOptions | None = None, generator=None,
                   labels_on_device: bool = True):  # fmt: skip
    """Numpy batches of JPEG bytes (``decode=False``) -> batches decoded (and augmented, with
    parameters from ``generator``) on ``device``, as ``iter_torch_batches`` would deliver them."""
    import torch

    for batch in batches:
        out = dict(batch)
        out["image"] = decode_images(batch["image"], image_size, augment, device, generator)
        if labels_on_device:
            # copied (a few floats per image): Ray hands read-only arrays, which torch warns about
            out["labels"] = torch.tensor(batch["labels"]).to(device, non_blocking=True)
            out["mask"] = torch.tensor(batch["mask"]).to(device, non_blocking=True)
        yield out


def upstream_wait_s(shard) -> float | None:
    """Seconds, in all since ``shard`` was made, that the thread iterating it has waited for Ray
    Data's tasks to produce blocks, as Ray attributes its iterator's blocked time ("production
    wait" in ``shard.stats()``; the rest is the iterating thread's own fetch, batching, collate and
    copy). Read from the iterator's local stats, not through ``stats()``, which also asks the
    split's SplitCoordinator actor for the whole execution's. None for an iterator that keeps no
    such figure (another Ray, or one not made by a streaming split)."""
    try:
        return float(shard._iter_stats.to_summary().iter_stats.blocked_production_wait_time.get())
    except AttributeError:
        return None


def row_groups(paths: list[str]) -> list[dict]:
    """(shard, row group) work items; a row group holds a few hundred images."""
    import pyarrow.parquet as pq

    items = []
    for path in paths:
        filesystem, inner = filesystem_for(path)
        with filesystem.open_input_file(inner) as f:
            n = pq.ParquetFile(f).metadata.num_row_groups
        items.extend({"path": path, "row_group": i} for i in range(n))
    for index, item in enumerate(items):  # the row group's number in the split: its sampling seed
        item["index"] = index
    return items


def read_row_group(batch, columns: list[str], plan: SamplingPlan | None = None):
    """Ray Data task body: read the listed row groups (pyarrow.fs understands URIs); with a
    ``plan`` (training), each is re-sampled for this epoch and carries its augmentation seed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    columns_of_items = (batch.column(name).to_pylist() for name in ("path", "row_group", "index"))
    for path, group, index in zip(*columns_of_items):
        filesystem, inner = filesystem_for(path)
        with filesystem.open_input_file(inner) as f:
            table = pq.ParquetFile(f).read_row_group(int(group), columns=columns)
        tables.append(sample_row_group(table, plan, int(index)))
    return pa.concat_tables(tables)


def build_ray_dataset(
    manifest: Manifest,
    split: str,
    image_size: int | None = None,
    augment: AugmentOptions | None = None,
    num_cpus: float = 1.0,
    keep_ids: bool = False,
    shuffle: bool | None = None,
    decode: bool = True,
    plan: SamplingPlan | None = None,
):
    """Ray Dataset over one split: decoded, resized and (if ``augment``) augmented uint8 batches.

    One Ray Data task per Parquet row group reads and decodes it, in one call for the whole row
    group (the read and the decode map are fused, and Ray sizes a fused task by the decode's
    batch size: a fixed one put every row group of a small split in one task). Consumers batch
    with ``iter_torch_batches(batch_size=...)``. ``read_parquet`` hands small shard sets to a
    single task, which serialises decoding on one CPU; row-group tasks spread it over every CPU in
    the cluster. Stateless tasks, unlike an actor pool, hold no CPU between batches, so training
    workers always get theirs. Training (``shuffle``, default: when augmenting) visits the row
    groups in a new random order every epoch. A sampling ``plan`` (training) re-samples each row
    group per epoch and seeds the row-group order and the augmentation draws with ``plan.seed``
    (``components.data.sampling``).
    """
    import ray.data
    from ray.data import RandomSeedConfig

    size = image_size or manifest.image_size
    columns = ["image", "labels", "mask"] + (list(ID_COLUMNS) if keep_ids else [])
    items = row_groups(manifest.shard_paths(split))
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # Executions are counted from here (one per epoch): the seeds do not depend on what the
    # driver's Ray Data context ran before.
    ds.context._execution_idx = 0
    if augment is not None if shuffle is None else shuffle:
        # Each row group is its own block: reordering blocks reshuffles row groups every epoch
        # without the CPU-hungry all-to-all tasks of random_shuffle (which can starve on a
        # cluster whose CPUs the training workers hold). Seeded, a new order per execution.
        seed = RandomSeedConfig(seed=plan.seed, reseed_after_execution=True) if plan else None
        ds = ds.randomize_block_order(seed=seed)
    if plan is not None:  # rows in the seeded order, not in the order parallel tasks finish (Ray Train
        ds.context.execution_options.preserve_order = True  # carries it over: trainer.ingest_options)
    ds = ds.map_batches(
        read_row_group,
        fn_kwargs={"columns": columns, "plan": plan},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=num_cpus,
    )
    if not decode:  # the consumer decodes on its device (``decode_images``): JPEG bytes on the wire
        return ds.map_batches(encoded_batch, fn_kwargs={"keep_ids": keep_ids}, batch_size=None, batch_format="numpy",
                              num_cpus=num_cpus)  # fmt: skip
    return ds.map_batches(
        decode_batch,
        fn_kwargs={"image_size": size, "augment": augment, "keep_ids": keep_ids},
        batch_size=None,
        batch_format="numpy",
        num_cpus=num_cpus,  # None: the whole row group
    )
