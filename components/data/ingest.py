"""Prepared Parquet dataset -> Ray Dataset of model-ready batches.

Decode and augmentation run in Ray Data ``map_batches`` tasks on CPUs (anywhere in the
cluster), never in the training loop: workers only see ready float tensors via
``iter_torch_batches``. Chest X-rays are not mirror-symmetric (heart on the left), so
horizontal flip is off by default.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .prepare import load_manifest

# Grayscale normalisation (8-bit films scaled to [0, 1], then centred).
MEAN, STD = 0.5, 0.25


@dataclass(frozen=True)
class AugmentOptions:
    crop_scale_min: float = 0.75      # RandomResizedCrop area range [min, 1]
    rotation_degrees: float = 7.0
    hflip: bool = False
    brightness: float = 0.2
    contrast: float = 0.2


def normalize(images):
    """uint8 images (from the pipeline) -> normalised float32, on whatever device they are.

    Batches travel through Ray's object store as uint8 (4x less data than float32) and are
    normalised where they are consumed, on the GPU in a GPU run."""
    return images.float().sub_(MEAN * 255.0).div_(STD * 255.0)


class DecodeTransform:
    """Batch callable: JPEG bytes -> (B, 1, S, S) uint8, plus labels/mask as (B, C) float32."""

    def __init__(self, image_size: int, augment: AugmentOptions | None, keep_ids: bool = False) -> None:
        from torchvision.transforms import v2

        self.image_size = image_size
        self.keep_ids = keep_ids  # string ids cannot go through iter_torch_batches
        if augment is None:
            self.transform = v2.Resize((image_size, image_size), antialias=True)
        else:
            steps = [
                v2.RandomResizedCrop((image_size, image_size), scale=(augment.crop_scale_min, 1.0), ratio=(0.9, 1.1), antialias=True),
                v2.RandomRotation(augment.rotation_degrees),
            ]
            if augment.hflip:
                steps.append(v2.RandomHorizontalFlip())
            if augment.brightness or augment.contrast:
                steps.append(v2.ColorJitter(brightness=augment.brightness, contrast=augment.contrast))
            self.transform = v2.Compose(steps)

    def __call__(self, batch: dict) -> dict:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in batch["image"]]
        images = decode_jpeg(datas, mode=ImageReadMode.GRAY)
        out = torch.empty((len(images), 1, self.image_size, self.image_size), dtype=torch.uint8)
        for i, im in enumerate(images):
            out[i] = self.transform(im)
        result = {"image": out.numpy(), "labels": _stack(batch["labels"]), "mask": _stack(batch["mask"])}
        if self.keep_ids:
            result["image_id"] = np.asarray(batch["image_id"])
        return result


@functools.lru_cache(maxsize=8)
def _transform(image_size: int, augment: AugmentOptions | None, keep_ids: bool) -> DecodeTransform:
    return DecodeTransform(image_size, augment, keep_ids)


def decode_batch(batch: dict, image_size: int, augment: AugmentOptions | None, keep_ids: bool = False) -> dict:
    """Stateless task form of DecodeTransform (the transform is cached per process)."""
    return _transform(image_size, augment, keep_ids)(batch)


def _stack(column) -> np.ndarray:
    arr = np.asarray(column)
    if arr.dtype == object:
        arr = np.stack([np.asarray(v, dtype=np.float32) for v in column])
    return arr.astype(np.float32, copy=False)


def shard_paths(data_dir: str | Path, split: str) -> list[str]:
    manifest = load_manifest(data_dir)
    paths = [str(Path(data_dir) / s["path"]) for s in manifest["shards"] if s["split"] == split and s["num_rows"] > 0]
    if not paths:
        from ..errors import UserError

        raise UserError(f"{data_dir}: the prepared dataset has no '{split}' images")
    return paths


def row_groups(paths: list[str]) -> list[dict]:
    """(shard, row group) work items; a row group holds a few hundred images."""
    import pyarrow.parquet as pq
    from pyarrow import fs as pafs

    items = []
    for path in paths:
        filesystem, inner = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
        with filesystem.open_input_file(inner) as f:
            n = pq.ParquetFile(f).metadata.num_row_groups
        items.extend({"path": path, "row_group": i} for i in range(n))
    return items


def read_row_group(batch, columns: list[str]):
    """Ray Data task body: read the listed row groups (pyarrow.fs understands URIs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyarrow import fs as pafs

    tables = []
    for path, group in zip(batch.column("path").to_pylist(), batch.column("row_group").to_pylist()):
        filesystem, inner = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
        with filesystem.open_input_file(inner) as f:
            tables.append(pq.ParquetFile(f).read_row_group(int(group), columns=columns))
    return pa.concat_tables(tables)


def build_ray_dataset(
    data_dir: str | Path,
    split: str,
    image_size: int | None = None,
    augment: AugmentOptions | None = None,
    batch_size: int = 64,
    num_cpus: float = 1.0,
    keep_ids: bool = False,
    shuffle: bool | None = None,
):
    """Ray Dataset over one split: decoded, resized and (if ``augment``) augmented uint8 batches.

    One Ray Data task per Parquet row group reads and decodes it (the read and the decode map
    are fused). Ray 2.60's ``read_parquet`` hands small shard sets to a single task, which
    serialises decoding on one CPU; row-group tasks spread it over every CPU in the cluster
    (measured in bench/ingest.py). Stateless tasks, unlike an actor pool, hold no CPU between
    batches, so training workers always get theirs. Training (``shuffle``, default: when
    augmenting) visits the row groups in a new random order every epoch.
    """
    import ray.data

    size = image_size or load_manifest(data_dir)["image_size"]
    columns = ["image", "labels", "mask"] + (["image_id"] if keep_ids else [])
    items = row_groups(shard_paths(data_dir, split))
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    if augment is not None if shuffle is None else shuffle:
        # Each row group is its own block: reordering blocks reshuffles row groups every epoch
        # without the CPU-hungry all-to-all tasks of random_shuffle (which can starve on a
        # cluster whose CPUs the training workers hold).
        ds = ds.randomize_block_order()
    ds = ds.map_batches(read_row_group, fn_kwargs={"columns": columns}, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus)
    return ds.map_batches(
        decode_batch, fn_kwargs={"image_size": size, "augment": augment, "keep_ids": keep_ids},
        batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus,
    )
