"""The model's input contract, in one place for training, the registered model, prediction and
the benches: 8-bit grayscale pixel values (uint8, 0..255) in, normalised float32 to the network.

Batches travel through Ray's object store as uint8 (4x less data than float32) and are
normalised where they are consumed, on the GPU in a GPU run. The registered model applies the
same contract itself, so its callers pass raw pixels of any size.
"""

from __future__ import annotations

import numpy as np

# 8-bit films scaled to [0, 1], then centred.
MEAN, STD = 0.5, 0.25


def normalize(images):
    """uint8 image tensor -> normalised float32, on whatever device it is."""
    return images.float().sub_(MEAN * 255.0).div_(STD * 255.0)


def to_model_input(images, image_size: int, in_chans: int = 1, device="cpu"):
    """A batch of uint8 images, (N, H, W) or (N, C, H, W) of any size, as the network's input:
    (N, in_chans, image_size, image_size) normalised float32 on ``device``."""
    import torch

    from ..data.ingest import resize_batch

    x = torch.as_tensor(np.array(images, copy=True)) if isinstance(images, np.ndarray) else torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 pixel values 0..255, got {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(f"images must be (N, H, W) or (N, {in_chans}, H, W), got shape {tuple(x.shape)}")
    if tuple(x.shape[-2:]) != (image_size, image_size):
        x = resize_batch(x, image_size)
    return normalize(x.to(device, non_blocking=True))
