"""Training pieces that need no Ray: config layering, LR schedule, loss statistics, metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from components.config import load_config
from components.data.manifest import Manifest, SplitStats
from components.errors import UserError
from components.metrics import multilabel_metrics, validation_metrics
from components.train.build import amp_dtype, loss_params_for, lr_factor
from components.train.loop import gather_to_all


def overrides_from_args(*argv):
    """What the train command's flags set, as load_config takes it."""
    import argparse

    from components.flags import add_config_flags, config_overrides

    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    return config_overrides(parser.parse_args(list(argv)))


def tiny_manifest(counts: dict, num_images: int = 100, groups: dict | None = None) -> Manifest:
    names = list(counts)
    return Manifest(
        dataset_sha256="0" * 64,
        label_names=names,
        groups=groups or dict.fromkeys(names, "head"),
        image_size=32,
        splits={"train": SplitStats(num_images, num_images, counts, dict.fromkeys(names, num_images))},
        shards=[],
        source={},
        options={},
        created_unix=0,
    )


def test_yaml_then_flags_override_typed_defaults(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(
        "model: {name: resnet10t}\nloss: {name: asl, params: {gamma_neg: 2}}\ntrain: {epochs: 7, batch_size: 8}\n"
    )
    flags = ("--loss-param", "clip=0.1", "--epochs", "3", "--data", str(tmp_path))
    cfg = load_config(str(y), overrides_from_args(*flags))
    assert cfg.model.name == "resnet10t" and cfg.train.batch_size == 8  # from YAML
    assert cfg.train.epochs == 3  # flag beats YAML
    assert cfg.loss.params == {"gamma_neg": 2, "clip": 0.1}  # merged
    assert cfg.train.num_workers == 2  # typed default
    assert cfg.tracking.tracking_uri.startswith("sqlite:///") and cfg.tracking.tracking_uri.endswith("mlflow.db")
    again = load_config(str(y), overrides_from_args(*flags))
    assert cfg.default_run_name("a" * 64) == again.default_run_name("a" * 64)  # stable


def test_run_name_changes_with_what_defines_the_run(tmp_path):
    a = load_config(None, {"loss": {"name": "ral"}})
    b = load_config(None, {"loss": {"name": "ral", "params": {"lamb": 2.0}}})
    c = load_config(None, {"loss": {"name": "ral"}, "tracking": {"experiment": "other"}})
    name = lambda cfg, sha="a" * 64: cfg.default_run_name(sha)  # noqa: E731
    assert name(a) != name(b) and name(a) == name(c)  # the config, not where it is tracked
    assert name(a) != name(a, "b" * 64)  # a dataset rebuilt in the same folder is another run
    faster = load_config(None, {"loss": {"name": "ral"}, "data": {"prefetch_batches": 4, "prestart_workers": False}})
    assert name(faster) == name(a)  # how fast the data comes is not what the run trains


@pytest.mark.parametrize(
    "text,match",
    [
        ("modle: {name: x}\n", r"unknown section 'modle' \(did you mean 'model'\?; known: data, loss, model"),
        ("train: {epoch: 3}\n", r"unknown key 'train.epoch' \(did you mean 'train.epochs'\?; known: accumulate_steps"),
        ("train: {zzz: 3}\n", r"unknown key 'train.zzz' \(known: accumulate_steps, amp, "),  # nothing close: no guess
        ("train: [1, 2]\n", "must be a mapping"),
        ("train: {amp: fp8}\n", "train.amp='fp8'"),
        ("optim: {lr: abc}\n", "optim.lr='abc' is not a number"),
        ("train: {epochs: 2.5}\n", "train.epochs=2.5 is not an integer"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, match):
    y = tmp_path / "c.yaml"
    y.write_text(text)
    with pytest.raises(UserError, match=match):
        load_config(str(y))


def test_the_tracking_uri_defaults_to_mlflows_environment_variable_then_a_local_store(tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI (set on every pod by the KubeRay manifests) is MLflow's own default: a
    job submitted there without --tracking-uri must report to that server, not to a pod's disk."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert load_config(None, {}).tracking.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert load_config(None, {}).tracking.tracking_uri == "http://mlflow.internal:5000"
    flag = {"tracking": {"tracking_uri": f"sqlite:///{tmp_path}/other.db"}}
    assert load_config(None, flag).tracking.tracking_uri == f"sqlite:///{tmp_path}/other.db"  # the flag wins


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, 10, 5, 1.0, 0.01) for s in range(0, 51)]
    assert f[0] < 0.01 and f[5] == pytest.approx(0.5) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone decay after warmup
    assert f[50] == pytest.approx(0.01)


def test_loss_statistics_come_from_the_manifest():
    from components.config import Config

    manifest = tiny_manifest({"a": 40, "b": 2})
    cfg = Config()
    cfg.loss.name = "db"
    assert loss_params_for(cfg, manifest) == {"class_counts": [40, 2], "num_samples": 100}
    cfg.loss.name, cfg.loss.params = "cb", {"beta": 0.99}
    assert loss_params_for(cfg, manifest) == {"beta": 0.99, "class_counts": [40, 2]}


def test_a_bad_loss_or_loss_parameter_names_its_own_flag():
    """A bad --loss-param was reported as the loss's fault ("loss: loss 'ral': ... (flag --loss)")."""
    from components.config import Config
    from components.train.build import build_loss_for

    manifest, cfg = tiny_manifest({"a": 40, "b": 2}), Config()
    for name, params, field, message in (
        ("nope", {}, "loss.name", "unknown loss 'nope'; registered losses: bce"),
        ("ral", {"gamma_neg": "abc"}, "loss.params", "loss 'ral': parameter gamma_neg='abc' is invalid"),
        ("ral", {"nope": 1}, "loss.params", r"loss 'ral' has no parameter\(s\) nope"),
    ):
        cfg.loss.name, cfg.loss.params = name, params
        with pytest.raises(UserError, match=f"^{message}") as err:
            build_loss_for(cfg, manifest)
        assert err.value.field == field


def test_amp_policy():
    import torch

    assert amp_dtype("auto", "cpu") is None and amp_dtype("off", "cuda") is None
    assert amp_dtype("fp16", "cuda") is torch.float16 and amp_dtype("bf16", "cpu") is torch.bfloat16


def test_metrics_do_not_depend_on_how_predictions_are_split():
    rng = np.random.default_rng(0)
    y = (rng.random((90, 5)) < 0.3).astype(np.float32)
    p = np.clip(y * 0.3 + rng.random((90, 5)) * 0.7, 0, 1)
    groups = ["head", "head", "medium", "tail", "tail"]
    whole = validation_metrics(p, y, np.ones_like(y), groups)
    perm = rng.permutation(90)
    parts = [perm[:37], perm[37:]]  # e.g. two workers' shards, any order

    def cat(a):
        return np.concatenate([a[i] for i in parts])

    split = validation_metrics(cat(p), cat(y), np.ones_like(y), groups)
    assert split == whole
    assert gather_to_all(p)[0] is p  # not distributed: identity
    # the prevalence baseline is what a useless model scores
    base = multilabel_metrics(np.tile(y.mean(0), (90, 1)), y)["mAP"]
    assert base == pytest.approx(float(np.mean(y.mean(0))), rel=1e-6)
    assert whole["val_mAP"] > base


def test_per_class_chart_and_table(tmp_path):
    from components.tracking import per_class_chart, per_class_table

    names, ap, counts, groups = ["A", "B, b"], [0.5, math.nan], [100, 0], ["head", "tail"]
    per_class_chart(names, ap, counts, groups, tmp_path / "c.png", "t")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        per_class_table(names, ap, counts, groups)
        == 'label,group,train_count,ap\n"A",head,100,0.500000\n"B, b",tail,0,\n'
    )


def test_unreachable_tracking_server_fails_fast(cli, tiny_dataset, tmp_path):
    import time

    t0 = time.monotonic()
    r = cli(
        "train",
        "--data",
        str(tiny_dataset),
        "--tracking-uri",
        "http://127.0.0.1:9",
        "--storage-path",
        str(tmp_path),
        cwd=tmp_path,
    )
    assert r.returncode == 2
    assert "cannot reach the MLflow tracking server at http://127.0.0.1:9" in r.stderr
    assert "Traceback" not in r.stderr and time.monotonic() - t0 < 60
    assert "ray: started" not in r.stdout + r.stderr  # checked before a local Ray is started for the run
    assert not list(tmp_path.glob("*"))  # nothing started, nothing written


def test_train_without_manifest_is_clear(cli, tmp_path):
    r = cli("train", "--data", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 2 and "no manifest.json" in r.stderr


def test_resume_picks_the_newest_complete_checkpoint_of_this_run(tmp_path):
    """A checkpoint written just before a worker failure is in storage but unknown to Ray: resume
    from it, never from another run's folder or a half-written file."""
    import torch

    from components.train.checkpoints import CHECKPOINT_FILE, newest_checkpoint_state

    def write(epoch: int, run_id: str, corrupt: bool = False):
        d = tmp_path / f"epoch-{epoch:04d}"
        d.mkdir()
        torch.save({"run_id": run_id, "epoch": epoch}, d / CHECKPOINT_FILE)
        if corrupt:
            (d / CHECKPOINT_FILE).write_bytes((d / CHECKPOINT_FILE).read_bytes()[:40])

    assert newest_checkpoint_state(str(tmp_path), "a", None, "cpu") is None  # fresh start
    write(0, "a"), write(1, "a"), write(2, "b"), write(3, "a", corrupt=True)
    (tmp_path / "epoch-notes").mkdir()
    assert newest_checkpoint_state(str(tmp_path), "a", None, "cpu")["epoch"] == 1
    assert newest_checkpoint_state(str(tmp_path), None, None, "cpu")["epoch"] == 2
    assert newest_checkpoint_state(str(tmp_path / "missing"), "a", None, "cpu") is None
    import ray.train

    registered = ray.train.Checkpoint.from_directory(str(tmp_path / "epoch-0000"))  # Ray's, when storage has none
    assert newest_checkpoint_state(str(tmp_path / "missing"), "a", registered, "cpu")["epoch"] == 0


@pytest.mark.parametrize("local_data", [True, False])
def test_a_tune_trial_applies_the_embedded_ray_data_setting_before_building_its_datasets(
    monkeypatch, local_data, tmp_path
):
    """A trial runs in its own process with Ray Data's default DataContext; on ralflow's embedded
    Ray the sweep passes on the setting `ralflow train` uses, and the trial applies it first."""
    import types

    import ray.tune
    from ray.data import DataContext

    import components.tune.sweep as sweep

    ctx = DataContext.get_current()
    monkeypatch.setattr(ctx, "op_resource_reservation_enabled", True)
    seen = {}

    class Stop(Exception):
        pass

    def opened_run(cfg, manifest, say, extra_tags, storage_dir, stopping):  # before the trainer and datasets
        seen["reservation"] = DataContext.get_current().op_resource_reservation_enabled
        seen["run_name"] = cfg.tracking.run_name
        seen["lamb"] = cfg.loss.params["lamb"]
        raise Stop

    monkeypatch.setattr(sweep, "opened_run", opened_run)
    monkeypatch.setattr(ray.tune, "get_context", lambda: types.SimpleNamespace(get_trial_id=lambda: "t0001"))
    base = load_config(None, {"tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}})
    trial = sweep.make_trial_fn(base, None, "parent", "sweep-x", "/tmp/unused", local_data=local_data)
    with pytest.raises(Stop):
        trial({"loss.lamb": 2.0})
    assert seen == {"reservation": not local_data, "run_name": "sweep-x-t0001", "lamb": 2.0}
    assert base.loss.params == {}  # each trial samples into its own copy of the sweep's config


def test_ema_weights_follow_training_and_come_back_from_a_checkpoint():
    import torch

    from components.train.build import build_parts
    from components.train.loop import train_epoch

    from .test_compute import batches

    manifest = tiny_manifest({"a": 30, "b": 10, "c": 3})
    cfg = load_config(None, {"model": {"name": "resnet10t"}, "train": {"ema": True, "ema_decay": 0.9, "epochs": 2}})
    cfg.data.image_size = 32
    device = torch.device("cpu")
    torch.manual_seed(0)
    parts = build_parts(cfg, manifest, device, 1)
    before = {k: v.clone() for k, v in parts.ema.module.state_dict().items()}
    train_epoch(parts, batches(), device)
    raw, ema = parts.model.state_dict(), parts.ema.module.state_dict()
    (key,) = [k for k in raw if k.endswith("conv1.0.weight")]  # the stem, whatever the head
    assert not torch.equal(ema[key], before[key]) and not torch.equal(ema[key], raw[key])  # an average: between

    state = parts.state_dicts()
    assert torch.equal(state["ema"][key], ema[key])
    torch.manual_seed(1)
    resumed = build_parts(cfg, manifest, device, 1)
    assert not torch.equal(resumed.ema.module.state_dict()[key], ema[key])
    resumed.load_state_dicts(state)
    assert all(torch.equal(resumed.ema.module.state_dict()[k], v) for k, v in ema.items())  # restored exactly
    del state["ema"]  # a checkpoint written before EMA was turned on: the average starts from its weights
    resumed.load_state_dicts(state)
    assert torch.equal(resumed.ema.module.state_dict()[key], raw[key])


def test_an_epoch_reports_its_loss_and_how_long_it_waited_for_its_first_batch():
    import time

    import torch

    from components.train.build import build_parts
    from components.train.loop import train_epoch

    from .test_compute import batches

    manifest = tiny_manifest({"a": 30, "b": 10, "c": 3})
    cfg = load_config(None, {"model": {"name": "resnet10t"}})
    cfg.data.image_size = 32
    parts = build_parts(cfg, manifest, torch.device("cpu"), 1)
    assert not parts.loss_fn.check_targets  # prepared labels: no host sync per step for the check

    def slow_start(items):
        time.sleep(0.3)  # a pipeline starting cold
        yield from items

    stats = train_epoch(parts, slow_start(batches(k=3)), torch.device("cpu"))
    assert stats["seen"] == 24 and stats["steps"] == 3
    assert stats["first_wait"] >= 0.3 and stats["data_wait"] >= stats["first_wait"]
    assert math.isfinite(stats["loss_sum"]) and stats["loss_sum"] > 0  # summed on the device, read once


def test_raw_and_ema_weights_are_scored_in_one_pass_over_the_validation_split():
    import torch

    from components.train.loop import evaluate

    from .test_compute import batches

    torch.manual_seed(0)
    models = {"raw": torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 3)),
              "ema": torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 3))}  # fmt: skip
    val = batches(k=3)
    reads = []

    def once():  # a stream that can be read only once, as a Ray Data epoch
        for b in val:
            reads.append(1)
            yield {**b, "study_id": np.array(["s"] * len(b["labels"]))}

    probs, targets, masks, studies, views = evaluate(models, once(), torch.device("cpu"), None)
    assert len(reads) == 3 and targets.shape == (24, 3) and list(studies) == ["s"] * 24
    for name, model in models.items():  # each model's scores as if it had the pass to itself
        alone, *_ = evaluate({name: model}, iter(val), torch.device("cpu"), None)
        assert probs[name].shape == (24, 3) and np.array_equal(probs[name], alone[name])
    assert not np.array_equal(probs["raw"], probs["ema"])
    assert all(m.training for m in models.values())  # back in training mode afterwards
    empty, *rest = evaluate(models, iter(()), torch.device("cpu"), None)
    assert set(empty) == {"raw", "ema"} and all(a.size == 0 for a in rest)


def test_the_next_epochs_data_starts_before_this_epoch_is_validated(monkeypatch):
    from components.train import loop

    events = []

    class Ahead:
        def __init__(self, epoch):
            self.epoch = epoch

        def close(self):
            events.append(("close", self.epoch))

    def train_batches(cfg, shard, device, epoch, rank):
        events.append(("start data", epoch))
        return Ahead(epoch)

    def validate(job, parts, epoch, *args):
        events.append(("validate", epoch))
        if epoch == 1:
            raise RuntimeError("validation failed")

    monkeypatch.setattr(loop, "train_batches", train_batches)
    monkeypatch.setattr(loop, "train_epoch", lambda parts, batches, *a: events.append(("train", batches.epoch)))
    monkeypatch.setattr(loop, "validate_and_report", validate)
    monkeypatch.setattr(loop, "fault_drill", lambda *a: None)
    job = loop.TrainJob(load_config(None, {"train": {"epochs": 3, "stall_warn_s": 0}}), None, None, "", False)

    def epoch(e, batches):
        return loop.train_and_validate_epoch(job, None, e, batches, 0, 1, "cpu", "train shard", "val shard")

    ahead = epoch(0, None)  # nothing made ahead (no warm start): this epoch's data is started first
    assert events == [("start data", 0), ("train", 0), ("start data", 1), ("validate", 0)] and ahead.epoch == 1
    events.clear()
    with pytest.raises(RuntimeError, match="validation failed"):
        epoch(1, ahead)
    assert events == [("train", 1), ("start data", 2), ("validate", 1), ("close", 2)]  # the reader stops
    events.clear()
    assert epoch(2, Ahead(2)) is None and events == [("train", 2), ("validate", 2)]  # the last: nothing after


def test_the_better_of_raw_and_ema_weights_is_the_epochs_model():
    from components.train.loop import select_weights
    from components.train.trainer import model_weights

    raw = {"val_mAP": 0.30, "val_outputs": "raw outputs", "per_class_ap": [0.3]}
    ema = {"val_mAP": 0.34, "val_outputs": "ema outputs", "per_class_ap": [0.34]}
    picked = select_weights({"raw": raw, "ema": ema})
    assert (picked["val_mAP"], picked["val_outputs"], picked["ema_selected"]) == (0.34, "ema outputs", 1.0)
    assert (picked["val_mAP_raw"], picked["val_mAP_ema"]) == (0.30, 0.34)
    picked = select_weights({"raw": {**raw, "val_mAP": 0.4}, "ema": ema})
    assert (picked["val_mAP"], picked["ema_selected"]) == (0.4, 0.0)
    assert select_weights({"raw": raw}) is raw  # EMA off: nothing compared, nothing added
    state = {"model": "raw weights", "ema": "ema weights", "metrics": {"ema_selected": 1.0}}
    assert model_weights(state) == "ema weights"
    assert model_weights({**state, "metrics": {"ema_selected": 0.0}}) == "raw weights"


def test_prefetcher_fetches_ahead_in_order_and_stops_when_left():
    import threading
    import time

    from components.data.prefetch import Prefetcher

    fetched, made = threading.Event(), []

    def batches(n):
        for i in range(n):
            fetched.set()
            made.append(i)
            yield i

    ready = Prefetcher(batches(10), ahead=2)
    assert fetched.wait(5)  # the data side started while nothing iterated yet (the model being built)
    time.sleep(0.3)
    assert len(made) <= 3  # bounded: `ahead` in the queue and one waiting to go in
    assert list(ready) == list(range(10))

    made.clear()
    left = Prefetcher(batches(10**6), ahead=2)
    for i in left:
        if i == 3:
            break  # a training step failed: the generator closes, the thread stops
    left._thread.join(5)
    assert not left._thread.is_alive() and len(made) < 10

    def broken():
        yield 0
        raise RuntimeError("no data")

    with pytest.raises(RuntimeError, match="no data"):  # raised where the batches are consumed, after the first
        list(Prefetcher(broken()))
    assert list(Prefetcher(iter(()))) == []


class RecordingShard:
    """A Ray Train dataset shard that records how it was asked for batches."""

    def __init__(self, batches):
        self.batches, self.calls = batches, []

    def iter_batches(self, **kwargs):
        self.calls.append(("iter_batches", kwargs))
        return iter(self.batches)

    def iter_torch_batches(self, **kwargs):
        self.calls.append(("iter_torch_batches", kwargs))
        return iter(self.batches)


def test_train_batches_asks_ray_data_for_the_configured_prefetch_and_seeded_shuffle(tmp_path):
    import pyarrow.parquet as pq
    import torch

    from components.data.ingest import encoded_batch
    from components.data.manifest import Manifest
    from components.data.prepare import PrepareOptions, prepare_dataset
    from components.train.loop import train_batches

    from . import formats

    formats.cxr_lt_2023(tmp_path / "src", n_train=8)
    prepare_dataset(PrepareOptions("cxr-lt-2023", str(tmp_path / "src"), image_size=48), tmp_path / "data",
                    log=lambda *_: None)  # fmt: skip
    table = pq.read_table(Manifest.load(tmp_path / "data").shard_paths("train")[0]).to_pydict()
    raw = encoded_batch({k: table[k] for k in ("image", "labels", "mask")})

    def cfg(**data):
        return load_config(None, {"data": {"path": str(tmp_path / "data"), "image_size": 32, **data}})

    CPU = torch.device("cpu")
    shard = RecordingShard([{"image": torch.zeros(2, 1, 32, 32, dtype=torch.uint8)}])
    assert len(list(train_batches(cfg(prefetch_batches=3), shard, CPU, epoch=0, rank=0))) == 1
    (name, kwargs), = shard.calls  # fmt: skip
    assert name == "iter_torch_batches" and kwargs["prefetch_batches"] == 3
    assert "local_shuffle_buffer_size" not in kwargs  # off by default

    seeds = []
    for epoch, rank in ((0, 0), (0, 0), (1, 0), (0, 1)):
        shard = RecordingShard([raw])
        (batch,) = train_batches(cfg(shuffle_buffer=64, decode_on="gpu"), shard, CPU, epoch=epoch, rank=rank)
        (name, kwargs), = shard.calls  # fmt: skip
        assert name == "iter_batches" and kwargs["local_shuffle_buffer_size"] == 64
        seeds.append((kwargs["local_shuffle_seed"], batch["image"]))
    assert seeds[0][0] == seeds[1][0] and torch.equal(seeds[0][1], seeds[1][1])  # same seed, epoch, rank: same
    assert len({s for s, _ in seeds}) == 3  # another epoch or rank: another shuffle and other augmentations
    assert not torch.equal(seeds[0][1], seeds[2][1]) and not torch.equal(seeds[0][1], seeds[3][1])
