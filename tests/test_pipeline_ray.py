"""`ralflow run` end to end on the embedded default (its own local Ray, a SQLite store), then
`ralflow predict` from models:/<name>@champion in a fresh process, from a prepared dataset and
from a CXR-LT CSV + image root with an unreadable image."""

from __future__ import annotations

import csv
import os
import re

import pytest

from components.tracking import client

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def read_submission(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def test_run_then_predict_from_champion(tmp_path, cli, ray_address):
    work = tmp_path / "work"
    sizes = ["--workdir", str(work), "--num-images", "240", "--synth-size", "64", "--image-size", "32",
             "--num-samples", "1", "--max-epochs", "1", "--batch-size", "32"]  # fmt: skip
    r = cli("run", *sizes, cwd=tmp_path, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert "already exists" not in r.stdout + r.stderr  # a first promote in a fresh store says nothing of the kind
    for needle in (
        "[1/5]",
        "[5/5]",
        "ralflow run finished",
        "best params",
        "mAP by group",
        "ralflow-cxr v1 @champion",
        f"mlflow ui --backend-store-uri sqlite:///{work / 'mlflow.db'}",
    ):
        assert needle in r.stdout, needle
    from components.data.labels import CXR_LT_2023_COUNTS
    from components.data.manifest import Manifest

    header, rows = read_submission(work / "submission.csv")
    manifest = Manifest.load(work / "data")
    assert header == ["dicom_id", *CXR_LT_2023_COUNTS] and len(rows) == manifest.splits["val"].num_images
    uri = f"sqlite:///{work / 'mlflow.db'}"

    def trial_runs() -> set[str]:
        c = client(uri)
        return {x.info.run_id for x in c.search_runs([c.get_experiment_by_name("ralflow").experiment_id])}

    trained = trial_runs()

    # Re-running the finished pipeline resumes each stage, the finished sweep included: nothing is
    # redone, and the champion, loaded by alias in this fresh process, scores the same numbers.
    r = cli("run", *sizes, "--address", ray_address, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    for needle in ("synth: already written", "prepare: dataset already complete", "(resumed)", "the champion)"):
        assert needle in r.stdout, needle
    assert not re.search(r"Trial \S+ started", r.stdout), r.stdout[-3000:]
    assert trial_runs() == trained
    header2, rows2 = read_submission(work / "submission.csv")
    assert header2 == header and rows2 == rows  # same model, same images: the same numbers
    assert all(0.0 <= float(v) <= 1.0 for row in rows2 for v in row[1:])

    def predict_champion(*source, out):
        return cli("predict", "--model-uri", "models:/ralflow-cxr@champion", *source, "--out", str(out),
                   "--tracking-uri", uri, "--address", ray_address, cwd=tmp_path, timeout=600)  # fmt: skip

    # decode_on gpu (here on the CPU device): JPEG bytes to the model's actor, decoded there alike
    r = predict_champion("--data", str(work / "data"), "--decode-on", "gpu", out=tmp_path / "in_actor.csv")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert read_submission(tmp_path / "in_actor.csv")[1] == rows

    # from the CSV + image root, with one development image gone: reported, not fatal
    dev = list(csv.DictReader(open(work / "synth" / "development.csv")))
    os.remove(work / "synth" / dev[0]["path"])
    out3 = tmp_path / "from_csv.csv"
    r = predict_champion("--source", str(work / "synth"), out=out3)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _, rows3 = read_submission(out3)
    assert len(rows3) == len(dev) - 1 and dev[0]["dicom_id"] not in {x[0] for x in rows3}
    rejects = list(csv.DictReader(open(tmp_path / "from_csv.rejects.csv")))
    assert [x["image_id"] for x in rejects] == [dev[0]["dicom_id"]] and rejects[0]["reason"] == "missing file"
    assert "could not be read" in r.stderr


def test_predict_unknown_alias_is_one_line_error(tmp_path, cli):
    r = cli(
        "predict",
        "--model-uri",
        "models:/nope@champion",
        "--data",
        str(tmp_path),
        "--out",
        str(tmp_path / "x.csv"),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/m.db",
        cwd=tmp_path,
    )
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
        "ralflow predict: error: --model-uri models:/nope@champion"
    )
