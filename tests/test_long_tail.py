"""What the CXR-LT winners train with, without Ray: re-balanced sampling in the stream, attention
heads, decoupled classifier re-training (cRT) and post-hoc logit adjustment."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from components.calibration import apply_calibration, fit_logit_adjustment, macro_f1
from components.config import load_config
from components.data.manifest import Manifest
from components.data.sampling import AUG_SEED_COLUMN, plan_sampling, sample_row_group
from components.errors import UserError

FREQS = (0.4, 0.2, 0.05, 0.01, 0.003, 0.001)  # head to tail, as in CXR-LT


def long_tail_labels(n=20000, seed=0):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, len(FREQS))) < np.array(FREQS)).astype(np.float32)
    masks = np.ones_like(labels)
    masks[rng.random(labels.shape) < 0.02] = 0  # a few unknown labels: never counted as positive
    return labels, masks


def row_groups_of(labels, masks, rows=500):
    return [
        pa.table(
            {"labels": list(labels[i : i + rows]), "mask": list(masks[i : i + rows]), "row": np.arange(i, i + rows)}
        )
        for i in range(0, len(labels), rows)
    ]


def one_epoch(plan, groups, execution):
    """An epoch as the Ray Data read tasks make it: every row group re-sampled."""
    tables = [sample_row_group(t, plan, index, execution) for index, t in enumerate(groups)]
    return pa.concat_tables(tables)


def observed_frequencies(epoch) -> np.ndarray:
    labels = np.stack(epoch.column("labels").to_numpy(zero_copy_only=False))
    masks = np.stack(epoch.column("mask").to_numpy(zero_copy_only=False))
    return ((labels > 0.5) & (masks > 0)).mean(axis=0)


@pytest.mark.parametrize("mode", ["repeat-factor", "class-aware"])
def test_sampled_class_frequencies_over_an_epoch_match_the_target(mode):
    labels, masks = long_tail_labels()
    plan = plan_sampling(mode, labels, masks, threshold=0.1, seed=7)
    epoch = one_epoch(plan, row_groups_of(labels, masks), execution=0)
    observed, target = observed_frequencies(epoch), np.array(plan.target_freq)
    assert np.all(np.abs(observed - target) <= 0.1 * target + 1e-3), (observed, target)
    assert abs(epoch.num_rows - plan.expected_images) <= 0.02 * plan.expected_images
    natural = np.array(plan.natural_freq)
    assert target[-1] / target[0] > 5 * natural[-1] / natural[0]  # the tail up against the head
    if mode == "repeat-factor":  # LVIS: r_c = max(1, sqrt(t / f_c)); the rarest ~ sqrt(0.1 / 0.001) = 10
        assert plan.class_factor[0] == 1.0 and 8 < plan.class_factor[-1] < 12
        assert plan.expected_images > len(labels)
    else:  # an epoch keeps its size; rare classes get a share near 1/K
        assert plan.expected_images == pytest.approx(len(labels))
        assert target[-1] > 1 / (len(FREQS) + 1) * 0.9


def test_each_epoch_draws_afresh_and_the_same_seed_draws_the_same():
    labels, masks = long_tail_labels(4000)
    groups = row_groups_of(labels, masks)
    plan = plan_sampling("repeat-factor", labels, masks, seed=1)
    first, again = one_epoch(plan, groups, 0), one_epoch(plan, groups, 0)
    assert first.equals(again)
    second = one_epoch(plan, groups, 1)
    assert not first.column("row").equals(second.column("row"))  # another epoch, other copies and order
    other_seed = one_epoch(plan_sampling("repeat-factor", labels, masks, seed=2), groups, 0)
    assert not first.column("row").equals(other_seed.column("row"))
    seeds = first.column(AUG_SEED_COLUMN).to_numpy()
    assert len(set(seeds[:10])) == 1 and len(set(seeds)) == len(groups)  # one augmentation seed per row group
    plain = one_epoch(plan_sampling("none", labels, masks), groups, 0)  # none: each row once, mixed in its group
    rows = plain.column("row").to_numpy()
    assert sorted(rows) == list(range(len(labels))) and not np.array_equal(rows, np.arange(len(labels)))
    assert sorted(rows[:500]) == list(range(500))  # within its row group: a read task holds one


def test_the_head_only_stage_defaults_to_class_aware_sampling():
    assert load_config(None, {}).data.sampling == "repeat-factor"  # the ablation's winner
    assert load_config(None, {"train": {"head_only": True}}).data.sampling == "class-aware"
    assert load_config(None, {"train": {"head_only": True}, "data": {"sampling": "none"}}).data.sampling == "none"
    with pytest.raises(UserError, match="data.sampling='often' is invalid"):
        load_config(None, {"data": {"sampling": "often"}})
    with pytest.raises(UserError, match="model.head='mlp' is invalid"):
        load_config(None, {"model": {"head": "mlp"}})


def prepared_arrays(root, split, size=32):
    """(uint8 images, labels, masks) of a prepared split, decoded as the pipeline does."""
    import pyarrow.parquet as pq

    from components.data.ingest import decode_images
    from components.data.manifest import Manifest

    table = pa.concat_tables(pq.read_table(p) for p in Manifest.load(root).shard_paths(split))
    images = decode_images(table.column("image").to_pylist(), size, None)
    stack = lambda name: torch.tensor(np.stack(table.column(name).to_numpy(zero_copy_only=False)))  # noqa: E731
    return images, stack("labels"), stack("mask")


@pytest.mark.parametrize("head", ["linear", "csra"])
def test_each_head_trains_above_the_prevalence_baseline(head, tiny_dataset):
    from components.data.manifest import Manifest
    from components.metrics import validation_metrics
    from components.train.build import build_parts
    from components.train.loop import evaluate, train_epoch

    manifest = Manifest.load(tiny_dataset)
    cfg = load_config(None, {"model": {"name": "resnet10t", "head": head}, "train": {"epochs": 6}})
    cfg.data.image_size = 32
    torch.manual_seed(0)
    parts = build_parts(cfg, manifest, torch.device("cpu"), 1)
    x, y, m = prepared_arrays(tiny_dataset, "train")
    for epoch in range(cfg.train.epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        batches = [{"image": x[i], "labels": y[i], "mask": m[i]} for i in order.split(32)]
        train_epoch(parts, batches, torch.device("cpu"))
    vx, vy, vm = prepared_arrays(tiny_dataset, "val")
    val = [{"image": vx[i : i + 64].numpy(), "labels": vy[i : i + 64].numpy(), "mask": vm[i : i + 64].numpy()}
           for i in range(0, len(vx), 64)]  # fmt: skip
    scored, targets, masks, *_ = evaluate({"raw": parts.model}, val, torch.device("cpu"), None)
    probs = scored["raw"]
    mAP = validation_metrics(probs, targets, masks, manifest.group_list())["val_mAP"]
    present = targets.sum(0) > 0
    baseline = float(targets[:, present].mean(0).mean())  # a constant's AP is the prevalence
    assert mAP > baseline + 0.03, (head, mAP, baseline)


@pytest.mark.parametrize("head", ["linear", "csra"])
def test_drop_rate_drops_before_either_head_in_training_only(head):
    from components.models import build_model

    x = torch.randn(4, 1, 32, 32)
    torch.manual_seed(0)
    dropping, plain = build_model("resnet10t", 3, head=head, drop_rate=0.5), build_model("resnet10t", 3, head=head)
    for model in (dropping, plain):
        model.train()  # batch norm on batch statistics: the same batch gives the same output
    assert not torch.equal(dropping(x), dropping(x)) and torch.equal(plain(x), plain(x))
    dropping.eval()
    with torch.no_grad():
        assert torch.equal(dropping(x), dropping(x))


@pytest.mark.parametrize("head", ["linear", "csra"])
def test_a_crt_stage_changes_only_the_head(head):
    from components.models.heads import classifier_parameter_names
    from components.train.build import build_parts
    from components.train.loop import train_epoch
    from components.train.stages import InitWeights

    from .test_compute import batches
    from .test_training_units import tiny_manifest

    manifest = tiny_manifest({"a": 30, "b": 10, "c": 3})
    cfg = load_config(None, {"model": {"name": "resnet10t", "head": head}, "train": {"head_only": True}})
    cfg.data.image_size = 32
    torch.manual_seed(0)
    first = build_parts(cfg, manifest, torch.device("cpu"), 1).model.state_dict()
    first = {k: v.clone() for k, v in first.items()}
    torch.manual_seed(1)
    parts = build_parts(cfg, manifest, torch.device("cpu"), 1, init=InitWeights("r1", {}, first))
    head = {
        k
        for k in first
        if any(k.startswith(n.rsplit(".", 1)[0] + ".") for n in classifier_parameter_names(parts.model))
    }
    start = {k: v.clone() for k, v in parts.model.state_dict().items()}
    assert all(torch.equal(start[k], first[k]) for k in first if k not in head)  # the first stage's backbone
    assert all(not torch.equal(start[k], first[k]) for k in head if k.endswith("weight"))  # a fresh head
    train_epoch(parts, batches(3), torch.device("cpu"))
    after = parts.model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], start[k])}
    assert changed and changed <= head, changed - head  # batch-norm statistics included: frozen
    assert len(parts.optimizer.param_groups[0]["params"]) == len(classifier_parameter_names(parts.model))


def test_logit_adjustment_is_chosen_on_validation_and_keeps_each_class_ranking():
    rng = np.random.default_rng(0)
    prior = np.array([0.4, 0.1, 0.01])
    targets = (rng.random((3000, 3)) < prior).astype(np.float32)
    # an under-confident model for rare classes: their probabilities sit below 0.5 even when positive
    logits = np.log(prior / (1 - prior)) + 2.5 * (targets - 0.5) + rng.normal(0, 1, targets.shape)
    probs = 1 / (1 + np.exp(-logits))
    adjustment = fit_logit_adjustment(probs, targets, None, prior)
    assert adjustment["tau"] > 0 and adjustment["macro_f1_at_0.5"] > macro_f1(probs, targets) + 0.05
    fixed = fit_logit_adjustment(probs, targets, None, prior, tau=0.5)
    assert fixed["tau"] == 0.5
    adjusted = apply_calibration({"method": "temperature", "temperature": 1.3, "logit_adjust": adjustment}, probs)
    for c in range(3):  # a shift per class: each class's order, hence its AP, is unchanged
        assert np.array_equal(np.argsort(adjusted[:, c], kind="stable"), np.argsort(probs[:, c], kind="stable"))
    assert adjusted[:, 2].mean() > probs[:, 2].mean()  # the rare class moves up


def test_tune_search_spaces_take_sampling_ema_head_and_tau(tmp_path):
    from components.tune.space import apply_sample, load_search_space, to_tune

    override = tmp_path / "space.yaml"
    override.write_text(
        "ral:\n"
        "  data.sampling: {choice: [none, repeat-factor, class-aware]}\n"
        "  train.ema: {choice: [true, false]}\n"
        "  train.ema_decay: {loguniform: [0.99, 0.9999]}\n"
        "  model.head: {choice: [linear, csra]}\n"
        "  train.logit_adjust_tau: {uniform: [0.0, 2.0]}\n"
    )
    space = load_search_space("ral", str(override))
    assert {"data.sampling", "train.ema_decay", "model.head", "train.logit_adjust_tau", "loss.lamb"} <= set(space)
    assert set(to_tune(space)) == set(space)
    sample = {"data.sampling": "class-aware", "train.ema": True, "train.ema_decay": np.float64(0.999),
              "model.head": "csra", "train.logit_adjust_tau": 0.5}  # fmt: skip
    cfg = apply_sample(load_config(None, {}), sample)
    assert (cfg.data.sampling, cfg.train.ema, cfg.train.ema_decay) == ("class-aware", True, 0.999)
    assert (cfg.model.head, cfg.train.logit_adjust_tau) == ("csra", 0.5)
    with pytest.raises(UserError, match="model.head='mlp' is invalid"):
        from components.config import resolve_defaults

        resolve_defaults(apply_sample(load_config(None, {}), {"model.head": "mlp"}))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A small prepared CXR-LT 2023 dataset: what a sweep's loss is built against."""
    from components.data.prepare import PrepareOptions, prepare_dataset

    from . import formats

    root = tmp_path_factory.mktemp("space")
    formats.cxr_lt_2023(root / "src")
    prepare_dataset(PrepareOptions("cxr-lt-2023", str(root / "src"), image_size=32), root / "data", log=lambda *_: None)
    return root / "data"


@pytest.mark.parametrize(
    "entry,match",
    [
        ("optim.lr: {type: loguniform, low: 0.1}", r"'optim.lr': expected one of .* \(e.g. \{loguniform: \[1.0e-4"),
        (
            "optim.lr: {loguniform: [0, 1]}",
            r"'optim.lr': loguniform takes \[low, high\] with 0 < low < high, got \[0, 1",
        ),
        ("loss.lamb: {uniform: [3]}", r"'loss.lamb': uniform takes \[low, high\] with low < high"),
        ("loss.gamma_neg: {choice: []}", r"'loss.gamma_neg': choice takes a non-empty list"),
        ("loss.nope: {uniform: [0.1, 1]}", r"'loss.nope' = 0.1: loss 'ral' has no parameter\(s\) nope"),
        ("loss.clip: {uniform: [0.0, 2.0]}", r"'loss.clip' = 2.0: loss 'ral': parameter clip=2.0"),  # the high end too
        ("train.nope: {choice: [1, 2]}", r"unknown key 'train.nope'"),
        ("model.head: {choice: [linear, mlp]}", r"'model.head' = 'mlp': model.head='mlp' is invalid"),
        ("optim.lr: {loguniform: [1.0e-4", r"space.yaml: not valid YAML at line 3"),
    ],
)
def test_a_search_space_the_trials_would_refuse_is_refused_before_the_sweep(prepared, tmp_path, entry, match):
    """Seen: `loss.nope` or a choice of `model.head: mlp` started the sweep, and every trial then
    failed in its Ray Train workers with a traceback; now the sweep does not start."""
    from components.train.build import build_loss_for
    from components.tune.space import check_search_space, load_search_space

    manifest = Manifest.load(prepared)
    cfg = load_config(None, {"data": {"path": str(prepared)}, "loss": {"name": "ral"}})
    override = tmp_path / "space.yaml"
    override.write_text(f"ral:\n  {entry}\n")
    with pytest.raises(UserError, match=match):
        check_search_space(load_search_space("ral", str(override)), cfg, lambda probe: build_loss_for(probe, manifest))


def test_every_packaged_search_space_passes_its_own_check(prepared):
    import yaml

    from components.train.build import build_loss_for
    from components.tune.space import DEFAULT_SPACES, check_search_space, load_search_space

    manifest = Manifest.load(prepared)
    losses = list(yaml.safe_load(DEFAULT_SPACES.read_text()))
    assert {"ral", "asl", "bce"} <= set(losses)
    for loss in losses:
        cfg = load_config(None, {"data": {"path": str(prepared)}, "loss": {"name": loss}})
        check_search_space(load_search_space(loss), cfg, lambda probe: build_loss_for(probe, manifest))


def test_packaged_recipes_load_by_name():
    from components.config import recipes

    assert "cxr-lt-2023-gpu" in recipes()
    cfg = load_config("cxr-lt-2023-gpu", {"data": {"path": "/data/cxr-lt-2023"}})
    assert cfg.train.use_gpu and cfg.data.image_size == 512 and cfg.model.pretrained and cfg.data.decode_on == "gpu"
    with pytest.raises(UserError, match="packaged recipes: .*cxr-lt-2023-gpu"):
        load_config("no-such-recipe", {})
