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


class DecodeTransform:
    """Batch callable: JPEG bytes -> (B, 1, S, S) float32, plus labels/mask as (B, C) float32."""

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
        out = torch.empty((len(images), 1, self.image_size, self.image_size), dtype=torch.float32)
        for i, im in enumerate(images):
            out[i] = self.transform(im).float().div_(255.0)
        out.sub_(MEAN).div_(STD)
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


def build_ray_dataset(
    data_dir: str | Path,
    split: str,
    image_size: int | None = None,
    augment: AugmentOptions | None = None,
    batch_size: int = 64,
    num_cpus: float = 1.0,
    keep_ids: bool = False,
):
    """Ray Dataset over one split: decoded, resized and (if ``augment``) augmented batches.

    Decoding runs as stateless Ray Data tasks fused with the Parquet read: unlike an actor
    pool they hold no CPU between batches, so reads and training workers always get one.
    """
    import ray.data

    size = image_size or load_manifest(data_dir)["image_size"]
    columns = ["image", "labels", "mask"] + (["image_id"] if keep_ids else [])
    ds = ray.data.read_parquet(shard_paths(data_dir, split), columns=columns)
    return ds.map_batches(
        decode_batch, fn_kwargs={"image_size": size, "augment": augment, "keep_ids": keep_ids},
        batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus,
    )
