"""Study-level prediction (issue 13), the parts that need no Ray: multi-view synthetic studies,
study aggregation, TTA and ensembles, calibration and thresholds (and their trip through the
registry)."""

from __future__ import annotations

import csv
from collections import defaultdict

import numpy as np
import pytest

from components.calibration import apply_calibration, decide, fit_calibration, fit_thresholds
from components.errors import UserError
from components.metrics import multilabel_metrics
from components.studies import aggregate

LABELS = [f"c{i}" for i in range(4)]


def test_synthetic_studies_share_labels_across_views_and_include_laterals(tmp_path):
    from PIL import Image

    from components.data.synth import SynthOptions, write_synthetic_cxr_lt

    summary = write_synthetic_cxr_lt(tmp_path, SynthOptions(num_images=120, image_size=64, seed=3), progress=None)
    rows = list(csv.DictReader(open(tmp_path / "train.csv"))) + list(csv.DictReader(open(tmp_path / "development.csv")))
    studies = defaultdict(list)
    for r in rows:
        studies[r["study_id"]].append(r)
    labels = list(rows[0])[5:]
    assert summary["studies"] == len(studies) < len(rows)  # several images per study
    assert {len(v) for v in studies.values()} <= {1, 2, 3} and max(len(v) for v in studies.values()) >= 2
    for views in studies.values():
        assert len({tuple(r[k] for k in labels) for r in views}) == 1  # one study, one set of labels
        assert views[0]["ViewPosition"] in ("PA", "AP")  # every study has its frontal film
    laterals = [r for r in rows if r["ViewPosition"] == "LATERAL"]
    assert 0.2 < len(laterals) / len(rows) < 0.45  # MIMIC-like: about 3 in 10 films are laterals

    def brightest_column(row) -> float:  # where the spine is: the middle on a frontal, behind on a lateral
        a = np.asarray(Image.open(tmp_path / row["path"]), np.float32)[16:56]
        return float(np.argmax(np.convolve(a.mean(0), np.ones(5) / 5, "same")) / a.shape[1])

    assert np.median([brightest_column(r) for r in laterals]) > 0.65
    assert 0.4 < np.median([brightest_column(r) for r in rows if r["ViewPosition"] != "LATERAL"]) < 0.6


def test_study_aggregation():
    p = np.array([[0.1, 0.2], [0.3, 0.2], [0.9, 0.8], [0.5, 0.5], [0.7, 0.1]])
    studies, views = ["a", "a", "a", "b", "c"], ["PA", "AP", "LATERAL", "PA", "LL"]
    assert np.allclose(aggregate(p, studies, views, "none"), p)
    vm = aggregate(p, studies, views, "view-mean")
    assert vm.shape == p.shape and (vm[0] == vm[1]).all() and (vm[1] == vm[2]).all()  # identical within a study
    assert np.allclose(vm[0], [(0.2 + 0.9) / 2, (0.2 + 0.8) / 2])  # frontal mean and lateral, then their mean
    assert np.allclose(vm[3:], p[3:])  # one-image studies, frontal or lateral only, keep their row
    assert np.allclose(aggregate(p, studies, views, "mean")[0], p[:3].mean(0))
    assert np.allclose(aggregate(p, studies, views, "max")[0], p[:3].max(0))
    with pytest.raises(ValueError, match="allowed: none | mean | max | view-mean"):
        aggregate(p, studies, views, "median")


def classifier(seed: int, size: int = 48):
    """The registered model's class, holding a random network, as load_context would set it up."""
    import torch

    from components.models import build_model
    from components.models.pyfunc import ChestXrayClassifier

    torch.manual_seed(seed)
    m = ChestXrayClassifier()
    m.label_names, m.image_size, m.in_chans = LABELS, size, 1
    m.model, m.device = build_model("resnet10t", len(LABELS), 1).eval(), torch.device("cpu")
    m.calibration, m.thresholds = {"method": "none"}, None
    return m


def test_tta_and_ensembles():
    from components.predict import ensemble_probs, tta_pixels, tta_views

    model, other = classifier(0), classifier(1)
    rng = np.random.default_rng(0)
    half = rng.integers(0, 255, (3, 48, 24), dtype=np.uint8)
    symmetric = np.concatenate([half, half[..., ::-1]], axis=2)
    plain = ensemble_probs([model], [1.0], ["identity"], "prob", symmetric)
    assert np.allclose(ensemble_probs([model], [1.0], tta_views("hflip"), "prob", symmetric), plain, atol=1e-6)
    skewed = rng.integers(0, 255, (3, 48, 48), dtype=np.uint8)
    assert not np.allclose(
        ensemble_probs([model], [1.0], tta_views("hflip,scale"), "prob", skewed),
        ensemble_probs([model], [1.0], ["identity"], "prob", skewed),
    )
    assert tta_pixels(skewed, "scale").shape == skewed.shape and tta_views("scale,hflip,scale") == [
        "identity", "scale", "hflip"]  # fmt: skip
    with pytest.raises(UserError, match=r"tta both is invalid; allowed: none, hflip, scale, or a comma-separated list"):
        tta_views("both")  # the error shows how to ask for both
    for mode in ("prob", "logit"):  # a model with itself is the model; a zero weight drops a model
        alone = ensemble_probs([model], [1.0], ["identity"], mode, skewed)
        assert np.allclose(ensemble_probs([model, model], [1.0, 1.0], ["identity"], mode, skewed), alone, atol=1e-6)
        assert np.allclose(ensemble_probs([model, other], [1.0, 0.0], ["identity"], mode, skewed), alone, atol=1e-6)
    both = ensemble_probs([model, other], [1.0, 1.0], ["identity"], "prob", skewed)
    mean = (model.predict_pixels(skewed) + other.predict_pixels(skewed)) / 2
    assert np.allclose(both, mean, atol=1e-6)


def validation_set(n=400, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, classes)) < [0.4, 0.2, 0.1, 0.05]).astype(np.float32)
    raw = 1 / (1 + np.exp(-(2.5 * (y - 0.5) + rng.normal(0, 1.2, y.shape)) * 3))  # right order, overconfident
    return raw.astype(np.float32), y


@pytest.mark.parametrize("method", ["temperature", "isotonic"])
def test_calibration_changes_probabilities_not_rankings(method):
    raw, y = validation_set()
    cal = fit_calibration(method, raw, y)
    out = apply_calibration(cal, raw)
    assert not np.allclose(out, raw, atol=1e-3)
    for c in range(raw.shape[1]):  # every class keeps its order, so AP cannot move
        assert (np.argsort(out[:, c], kind="stable") == np.argsort(raw[:, c], kind="stable")).all()
    assert multilabel_metrics(out, y)["mAP"] == pytest.approx(multilabel_metrics(raw, y)["mAP"], abs=1e-12)

    def nll(p):
        p = np.clip(p, 1e-6, 1 - 1e-6)
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())

    assert nll(out) < nll(raw)  # better calibrated on what it was fitted on
    if method == "temperature":
        assert cal["temperature"] > 1  # the scores were overconfident


@pytest.mark.parametrize("method", ["max-f1", "youden"])
def test_thresholds_change_decisions(method):
    from sklearn.metrics import f1_score

    raw, y = validation_set()
    cuts = fit_thresholds(method, raw, y)
    assert len(cuts) == raw.shape[1] and all(0 < t <= 1 for t in cuts)
    fitted, naive = decide(raw, cuts), decide(raw, [0.5] * raw.shape[1])
    assert not (fitted == naive).all()
    if method == "max-f1":
        assert f1_score(y, fitted, average="macro") >= f1_score(y, naive, average="macro")
    assert fit_thresholds(method, raw, np.zeros_like(y)) == [0.5] * 4  # no positive: the neutral default


def test_calibration_and_thresholds_round_trip_through_the_registry(tmp_path):
    import mlflow
    import pandas as pd

    from components.models import build_model
    from components.tracking import ModelRegistry, TrackedRun

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    raw, y = validation_set(classes=len(LABELS))
    cal = fit_calibration("temperature", raw, y)
    thresholds = dict(zip(LABELS, fit_thresholds("max-f1", apply_calibration(cal, raw), y)))
    runs = {}
    for name, extra in (("plain", {}), ("calibrated", {"calibration": cal, "thresholds": thresholds})):
        import torch

        torch.manual_seed(0)  # the same weights in both
        run = TrackedRun.create(uri, "cal", name)
        run.log_model(build_model("resnet10t", len(LABELS), 1).state_dict(), "resnet10t", 1, 48, LABELS, **extra)
        runs[name] = run.run_id
    registry = ModelRegistry(uri)
    registry.set_alias("cal", "champion", registry.register("cal", runs["calibrated"], {}))
    mlflow.set_tracking_uri(uri)
    champion = mlflow.pyfunc.load_model("models:/cal@champion")
    assert champion.metadata.metadata["thresholds"] == thresholds
    assert champion.metadata.metadata["calibration"] == "temperature"
    images = pd.DataFrame({"image": list(np.random.default_rng(1).integers(0, 255, (6, 64, 64), dtype=np.uint8))})
    plain = mlflow.pyfunc.load_model(f"runs:/{runs['plain']}/model").predict(images)
    calibrated = champion.predict(images)
    assert np.allclose(calibrated, apply_calibration(cal, plain), atol=1e-6)
    decisions = champion.unwrap_python_model().decide(calibrated)
    assert (decisions == decide(calibrated, [thresholds[k] for k in LABELS])).all()
