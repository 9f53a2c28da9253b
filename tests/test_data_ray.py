"""synth -> prepare (Ray Data) -> Ray Dataset, end to end on the shared local Ray cluster."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.ray


def test_synth_prepare_ingest_end_to_end(tmp_path, cli, ray_address):
    src, out = tmp_path / "synth", tmp_path / "prepared"
    r = cli("synth", "--out", str(src), "--num-images", "120", "--image-size", "64", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert "synth: wrote" in r.stdout
    r = cli(
        "--format",
        "cxr-lt-2023",
        "--source",
        str(src),
        "--out",
        str(out),
        "--image-size",
        "48",
        "--rows-per-shard",
        "32",
        "--address",
        ray_address,
        module="workflows.prepare",
    )
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    n_train, n_val = manifest["splits"]["train"]["num_images"], manifest["splits"]["val"]["num_images"]
    assert n_train + n_val == 120 and len(manifest["shards"]) >= 4

    import torch

    from components.data.ingest import AugmentOptions, build_ray_dataset, upstream_wait_s
    from components.data.manifest import Manifest
    from components.models.inputs import normalize

    train = build_ray_dataset(Manifest.load(out), "train", image_size=40, augment=AugmentOptions())
    (split,) = train.streaming_split(1, equal=True)  # as a Ray Train worker gets it
    assert upstream_wait_s(split) == 0.0 and upstream_wait_s(object()) is None
    seen, labels = 0, []
    for batch in split.iter_torch_batches(batch_size=16):
        assert batch["image"].shape[1:] == (1, 40, 40) and batch["labels"].shape[1] == 26
        assert batch["image"].dtype == torch.uint8 and batch["mask"].min() == 1
        assert normalize(batch["image"]).dtype == torch.float32
        seen += len(batch["image"])
        labels.append(batch["labels"].numpy())
    assert seen == n_train
    assert upstream_wait_s(split) > 0  # the first block cannot be there before a task has made it
    counts = np.concatenate(labels).sum(0)
    assert counts.astype(int).tolist() == list(manifest["splits"]["train"]["class_counts"].values())
    # validation variant: deterministic (no augmentation)
    val = build_ray_dataset(Manifest.load(out), "val", keep_ids=True)
    a = val.take_batch(4)
    b = val.take_batch(4)
    assert np.array_equal(a["image"], b["image"]) and a["image"].shape[1:] == (1, 48, 48)
    assert len(set(a["image_id"])) == 4


def test_prepare_bad_source_is_one_line_error(tmp_path, cli):
    r = cli("prepare", "--format", "nih", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--local")
    assert r.returncode == 2
    assert r.stderr.strip() == f"ralflow prepare: error: --source {tmp_path / 'nope'}: not a directory"


def test_local_ray_keeps_idle_workers_between_epochs(ray_address):
    import ray._private.state

    from components.runtime import SYSTEM_CONFIG

    config = ray._private.state.state.get_system_config()
    assert {k: config.get(k) for k in SYSTEM_CONFIG} == SYSTEM_CONFIG
