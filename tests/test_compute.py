"""The GPU compute path (issue 11, item 1), checked on CPU: channels-last and torch.compile give
the plain model's logits, checkpoints load whatever the flags, gradient accumulation steps once
per N batches, and gradient checkpointing is switched on in the timm model."""

from __future__ import annotations

import pytest
import torch

from components.config import load_config
from components.data.manifest import Manifest, SplitStats
from components.train.build import build_parts
from components.train.loop import train_epoch

CPU = torch.device("cpu")


def manifest(n=64) -> Manifest:
    names = ["a", "b", "c"]
    return Manifest(
        dataset_sha256="0" * 64, label_names=names, groups=dict.fromkeys(names, "head"), image_size=32,
        splits={"train": SplitStats(n, n, dict.fromkeys(names, 10), dict.fromkeys(names, n))},
        shards=[], source={}, options={}, created_unix=0,
    )  # fmt: skip


def parts_for(seed=0, **train):
    cfg = load_config(None, {"model": {"name": "resnet10t"}, "train": {"epochs": 2, **train}})
    cfg.data.image_size = 32
    torch.manual_seed(seed)
    return build_parts(cfg, manifest(), CPU, 1)


def batches(k=4, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randint(0, 255, (n, 1, 32, 32), dtype=torch.uint8, generator=g),
            "labels": (torch.rand(n, 3, generator=g) < 0.3).float(),
            "mask": torch.ones(n, 3),
        }
        for _ in range(k)
    ]


def logits(parts, x):
    from components.models.inputs import normalize

    x = normalize(x)
    if parts.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    parts.model.eval()
    with torch.no_grad():
        return parts.model(x)


def test_channels_last_gives_the_plain_logits():
    x = batches(1)[0]["image"]
    plain, nhwc = parts_for(), parts_for(channels_last=True)
    assert nhwc.channels_last and not plain.channels_last
    (conv,) = [v for k, v in nhwc.model.state_dict().items() if k.endswith("layer1.0.conv1.weight")]
    # (the 1-channel stem is both layouts at once)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    torch.testing.assert_close(logits(nhwc, x), logits(plain, x), atol=1e-5, rtol=1e-5)


def test_compiled_model_gives_the_plain_logits_and_checkpoints_load_across_flags():
    x = batches(1)[0]["image"]
    plain, fast = parts_for(), parts_for(compile=True, channels_last=True)
    assert type(fast.model).__name__ == "OptimizedModule"
    torch.testing.assert_close(logits(fast, x), logits(plain, x), atol=1e-4, rtol=1e-4)
    state = fast.state_dicts()
    assert not any(k.startswith("_orig_mod.") for k in state["model"])  # the model's own keys
    other = parts_for(seed=1)
    other.load_state_dicts(state)  # compiled + channels-last -> plain
    torch.testing.assert_close(logits(other, x), logits(plain, x), atol=1e-4, rtol=1e-4)
    fast.load_state_dicts(parts_for(seed=2).state_dicts())  # and back
    torch.testing.assert_close(logits(fast, x), logits(parts_for(seed=2), x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("accumulate,batches_in,steps", [(1, 4, 4), (2, 4, 2), (3, 4, 2)])
def test_gradient_accumulation_steps_once_per_n_batches(accumulate, batches_in, steps):
    from components.models.heads import classifier_parameter_names

    parts = parts_for(accumulate_steps=accumulate)
    head = min(classifier_parameter_names(parts.model))  # a classifier weight, whatever the head
    before = parts.model.state_dict()[head].clone()
    out = train_epoch(parts, batches(batches_in), CPU)
    assert out["steps"] == steps and parts.scheduler.last_epoch == steps  # a remainder still steps
    assert out["seen"] == 8 * batches_in and not torch.equal(parts.model.state_dict()[head], before)


def test_gradient_checkpointing_is_switched_on():
    parts = parts_for(grad_checkpointing=True)
    assert parts.model.grad_checkpointing
    assert train_epoch(parts, batches(1), CPU)["steps"] == 1


def test_decoding_in_the_worker_gives_the_ray_data_tasks_images(tmp_path):
    """``data.decode_on: gpu`` on the CPU device: JPEG bytes through Ray Data, decoded (and
    augmented) in the worker, are the images the Ray Data tasks make, for the same draws."""
    import pyarrow.parquet as pq

    from components.data.ingest import AugmentOptions, decode_batch, device_batches, encoded_batch
    from components.data.manifest import Manifest
    from components.data.prepare import PrepareOptions, prepare_dataset

    from . import formats

    formats.cxr_lt_2023(tmp_path / "src", n_train=8)
    opts = PrepareOptions("cxr-lt-2023", str(tmp_path / "src"), image_size=48, rows_per_shard=8)
    prepare_dataset(opts, tmp_path / "data", log=lambda *_: None)
    table = pq.read_table(Manifest.load(tmp_path / "data").shard_paths("train")[0]).to_pydict()
    batch = {k: table[k] for k in ("image", "labels", "mask")}
    for augment in (None, AugmentOptions(hflip=True)):
        torch.manual_seed(0)  # the task draws from the process's generator; the worker from its own
        in_task = decode_batch(batch, 32, augment)
        (in_worker,) = device_batches([encoded_batch(batch)], CPU, 32, augment, torch.Generator().manual_seed(0))
        assert torch.equal(in_worker["image"], torch.as_tensor(in_task["image"]))
        assert torch.equal(in_worker["labels"], torch.as_tensor(in_task["labels"]))


def test_a_last_batch_of_one_image_is_skipped_not_fatal():
    one = batches(1, n=1)
    out = train_epoch(parts_for(), batches(2) + one, CPU)  # batch norm cannot train on one image
    assert (out["steps"], out["seen"]) == (2, 16)


def test_an_epochs_last_batch_smaller_than_the_rest_is_left_out_so_every_step_has_one_shape():
    shapes = []
    parts = parts_for()
    parts.model.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    out = train_epoch(parts, batches(2) + batches(1, n=5), CPU)  # 8, 8, then a last batch of 5
    assert (out["steps"], out["seen"]) == (2, 16)
    assert len(shapes) == 2 and len(set(shapes)) == 1
    out = train_epoch(parts_for(), batches(1, n=5), CPU)  # an epoch of one short batch still trains
    assert (out["steps"], out["seen"]) == (1, 5)


def test_the_host_runs_at_most_one_step_ahead_of_the_gpu():
    """After queueing step k the host waits for step k-1's event, never for step k's own (that
    would leave the device idle between steps); on the CPU nothing is waited for."""
    import types

    from components.train.loop import RunAhead

    calls = []

    class Event:
        made = 0

        def __init__(self):
            Event.made += 1
            self.n = Event.made

        def record(self):
            calls.append(("record", self.n))

        def synchronize(self):
            calls.append(("wait", self.n))

    pace = RunAhead(types.SimpleNamespace(type="cuda"), new_event=Event)
    for _ in range(3):
        pace.queued()
    assert calls == [("record", 1), ("record", 2), ("wait", 1), ("record", 3), ("wait", 2)]
    cpu = RunAhead(CPU, new_event=Event)
    cpu.queued()
    assert Event.made == 3  # no event on the CPU
