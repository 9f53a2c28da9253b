"""Serve the champion (issue 14): the registered model is self-contained (loads in a fresh process
from its own code and takes PNG/JPEG/DICOM bytes or uint8 pixels of any size, with the same
probabilities as `ralflow predict`), `mlflow models serve` and `ralflow serve` answer real HTTP
requests with real image files, serve follows a newly promoted champion, and a broken DICOM gets
a 4xx with its reason while the service keeps serving."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from components.data.labels import CXR_LT_2023_COUNTS

from . import formats
from .conftest import ROOT, default_sigint, run_cli

pytestmark = pytest.mark.ray

LABELS = list(CXR_LT_2023_COUNTS)
SIZE = 40
THRESHOLDS = {name: 0.5 for name in LABELS}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Two logged models (different weights); the first registered as ``cxr@champion``."""
    import torch

    from components.models import build_model
    from components.tracking import ModelRegistry, TrackedRun

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlflow.db"
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        run = TrackedRun.create(uri, "serving", f"model-{seed}")
        # the second carries what training fits on validation: a calibration and per-class thresholds
        extra = {"calibration": {"method": "temperature", "temperature": 2.0}, "thresholds": THRESHOLDS} if seed else {}
        weights = build_model("resnet10t", len(LABELS), 1).state_dict()
        run.log_model(weights, "resnet10t", 1, SIZE, LABELS, "# card", **extra)
        run.finish()
        runs.append(run.run_id)
    registry = ModelRegistry(uri)
    registry.set_alias("cxr", "champion", registry.register("cxr", runs[0], {}))
    return uri, runs


@pytest.fixture(scope="module")
def dicom_source(tmp_path_factory):
    """A CXR-LT 2023 layout whose CSV paths point at 12-bit DICOM files, MONOCHROME1 and 2."""
    root = tmp_path_factory.mktemp("dicom") / "src"
    formats.cxr_lt_2023(root, as_dicom=True)
    with open(root / "development.csv") as f:
        files = {row["dicom_id"]: root / row["path"] for row in csv.DictReader(f)}
    return root, files


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def read_submission(path: Path) -> dict[str, np.ndarray]:
    with open(path) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["dicom_id", *LABELS]
    return {r[0]: np.array([float(v) for v in r[1:]]) for r in rows[1:]}


FRESH_PROCESS = """
import io, json, sys
import mlflow, numpy as np, pandas as pd
from PIL import Image

uri, files = sys.argv[1], json.loads(sys.argv[2])
mlflow.set_tracking_uri(uri)
model = mlflow.pyfunc.load_model("models:/cxr@champion")
from components.data.images import load_gray  # now importable: the model's own copy of the package
from components.models.pyfunc import decode_column

size = model.unwrap_python_model().image_size
out = {}
for dicom_id, path in files.items():
    data = open(path, "rb").read()
    gray = np.asarray(load_gray(data))  # the film as 8-bit pixels, 64x80: not the model's size
    png = io.BytesIO()
    Image.fromarray(gray, mode="L").save(png, format="PNG")
    table = pd.DataFrame({"image": [data, png.getvalue(), gray]})  # DICOM bytes, PNG bytes, pixels
    pixels = decode_column(list(table["image"]), size)  # what the model takes from each form
    same = bool((pixels[0] == pixels[1]).all() and (pixels[0] == pixels[2]).all())
    out[dicom_id] = {"probs": model.predict(table).tolist(), "same_pixels": same}
print(json.dumps({"films": out, "components": sys.modules["components"].__file__}))
"""


def test_the_registered_model_loads_alone_and_matches_predict(registry, dicom_source, ray_address, tmp_path):
    uri, _ = registry
    root, files = dicom_source
    out = tmp_path / "submission.csv"
    r = run_cli("predict", "--address", ray_address, "--model-uri", "models:/cxr@champion", "--source", str(root),
                "--tracking-uri", uri, "--out", str(out), "--actors", "1")  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    predicted = read_submission(out)
    assert set(predicted) == set(files)

    # A fresh process whose Python path has no ralflow: the model brings its own code.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    script = tmp_path / "fresh.py"
    script.write_text(FRESH_PROCESS)
    r = subprocess.run([sys.executable, str(script), uri, json.dumps({k: str(v) for k, v in files.items()})],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    fresh = json.loads(r.stdout.strip().splitlines()[-1])
    assert "/code/components/" in fresh["components"]  # imported from the model's own copy
    for dicom_id, film in fresh["films"].items():
        assert film["same_pixels"]  # DICOM bytes, PNG bytes and pixels: one image to the model
        from_dicom, from_png, from_pixels = film["probs"]
        assert np.allclose(from_dicom, predicted[dicom_id], atol=2e-6)  # predict writes 6 decimals
        # The three are rows of one batch, and oneDNN's CPU kernels may differ in the last bit
        # between rows of a batch (seen: 6e-8), so the same pixels give the same probabilities
        # to float precision, not always to the bit.
        assert np.allclose(from_dicom, from_png, rtol=0, atol=1e-6)
        assert np.allclose(from_dicom, from_pixels, rtol=0, atol=1e-6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes, content_type="application/octet-stream"):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-4000:]
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    raise AssertionError(f"{url} did not answer in {timeout}s: {log.read_text()[-4000:]}")


def test_mlflow_models_serve_answers_a_rest_request_with_an_image(registry, dicom_source, tmp_path):
    import mlflow
    import pandas as pd

    uri, _ = registry
    _, files = dicom_source
    port, log = free_port(), tmp_path / "mlflow-serve.log"
    # `mlflow models serve` starts uvicorn by name: the environment's bin folder must be on PATH
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    cmd = [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", "models:/cxr@champion",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", proc, log)
        data = next(iter(files.values())).read_bytes()
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(data).decode()]]}}
        status, answer = post(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(), "application/json")
        assert status == 200, answer
        mlflow.set_tracking_uri(uri)
        local = mlflow.pyfunc.load_model("models:/cxr@champion").predict(pd.DataFrame({"image": [data]}))
        assert np.allclose(answer["predictions"], local, atol=1e-6)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_ralflow_serve_answers_follows_the_champion_and_survives_a_broken_dicom(
    registry, dicom_source, ray_address, tmp_path
):
    import mlflow
    import pandas as pd

    from components.tracking import ModelRegistry

    uri, runs = registry
    _, files = dicom_source
    port, log = free_port(), tmp_path / "serve.log"
    cmd = [str(Path(sys.executable).with_name("ralflow")), "serve", "--address", ray_address, "--model-name", "cxr",
           "--tracking-uri", uri, "--port", str(port), "--refresh-s", "1", "--cpus-per-replica", "0.5"]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=default_sigint)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/health", proc, log)
        with urllib.request.urlopen(f"{base}/health") as resp:
            assert json.loads(resp.read())["version"] == "1"
        mlflow.set_tracking_uri(uri)
        v1 = mlflow.pyfunc.load_model("models:/cxr/1")
        films = [p.read_bytes() for p in files.values()]
        with ThreadPoolExecutor(8) as pool:  # concurrent requests: batched by the replica
            answers = list(pool.map(lambda b: post(f"{base}/predict", b), films * 3))
        expected = v1.predict(pd.DataFrame({"image": films}))
        for i, (status, answer) in enumerate(answers):
            assert status == 200 and answer["version"] == "1", answer
            assert list(answer["findings"]) == LABELS
            assert np.allclose(list(answer["findings"].values()), expected[i % len(films)], atol=2e-6)
        import requests  # a form upload (curl -F, requests' files=, a browser form) was "undecodable"

        form = requests.post(f"{base}/predict", files={"file": ("film.dcm", films[0])}, timeout=60)
        assert form.status_code == 200 and np.allclose(list(form.json()["findings"].values()), expected[0], atol=2e-6)
        two = requests.post(f"{base}/predict", files={"a": ("1.dcm", films[0]), "b": ("2.dcm", films[1])}, timeout=60)
        assert two.status_code == 400 and two.json() == {"error": "a form upload must hold one image file, got 2"}

        broken = formats.dicom_bytes(formats.film12(), pixel_data=False)
        status, answer = post(f"{base}/predict", broken)
        assert status == 422 and answer["error"] == "DICOM without pixel data (no PixelData element)"
        status, answer = post(f"{base}/predict", b"\x89PNG\r\n\x1a\n truncated")
        assert status == 422 and answer["error"].startswith("undecodable")
        assert post(f"{base}/predict", films[0])[0] == 200  # still serving

        # Serve already runs on this cluster with its proxy on `port`: another port is refused, not
        # promised in a URL nothing answers; the running service is untouched
        other = free_port()
        r = run_cli("serve", "--address", ray_address, "--model-name", "cxr", "--tracking-uri", uri,
                    "--port", str(other), "--detach")  # fmt: skip
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
            f"ralflow serve: error: --port={other}: Serve already runs on this Ray cluster with its HTTP proxy on "
            f"port {port}, and keeps it: use --port {port}, or stop Serve there first (`serve shutdown`)"
        )
        assert post(f"{base}/predict", films[0])[0] == 200

        registry_ = ModelRegistry(uri)  # promote another model: served without a restart
        registry_.set_alias("cxr", "champion", registry_.register("cxr", runs[1], {}))
        deadline = time.monotonic() + 60
        while post(f"{base}/predict", films[0])[1]["version"] != "2":
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        v2 = mlflow.pyfunc.load_model("models:/cxr/2").predict(pd.DataFrame({"image": films[:1]}))
        answer = post(f"{base}/predict", films[0])[1]
        assert np.allclose(list(answer["findings"].values()), v2[0], atol=2e-6)
        assert answer["decisions"] == {k: bool(p >= 0.5) for k, p in answer["findings"].items()}  # v2 has thresholds
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()  # never leave a replica holding the shared cluster's CPUs
            raise
    assert code == 130, log.read_text()[-3000:]
    with pytest.raises((urllib.error.URLError, OSError)):
        urllib.request.urlopen(f"{base}/health", timeout=5)  # Serve shut down with the command


def test_serve_on_a_local_ray_refuses_a_busy_port_detach_and_replicas_it_cannot_hold(registry):
    uri, _ = registry
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        r = run_cli("serve", "--model-name", "cxr", "--tracking-uri", uri, "--port", str(port))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"ralflow serve: error: --port={port}: 127.0.0.1:{port} is already in use; choose another --port, "
        "or stop what listens there"
    ]  # one line: no Ray started, no proxy tracebacks
    r = run_cli("serve", "--model-name", "cxr", "--tracking-uri", uri, "--detach")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "ralflow serve: error: detach needs a Ray cluster (--address or RAY_ADDRESS): local Ray ends with this process"
    ]
    # replicas the local Ray cannot hold: refused, where Serve would wait for them forever
    r = run_cli("serve", "--model-name", "cxr", "--tracking-uri", uri, "--port", str(free_port()), "--replicas", "3",
                "--cpus-per-replica", "1000", "--gpu", timeout=120)  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert re.fullmatch(
        r"ralflow serve: error: --replicas=3: 3 replica\(s\) x 1000 CPU \+ 1 GPU each need 3000 CPU \(the cluster "
        r"has \d+\), 3 GPU \(the cluster has \d+\) on this machine; lower --replicas or --cpus-per-replica, use "
        r"--no-gpu, or serve on a cluster \(--address\)",
        r.stderr.strip().splitlines()[-1],
    )


def test_predict_scores_studies_with_tta_and_an_ensemble_in_one_pass(registry, ray_address, tmp_path):
    from components.data.synth import SynthOptions, write_synthetic_cxr_lt

    uri, runs = registry
    write_synthetic_cxr_lt(
        tmp_path / "src", SynthOptions(num_images=100, image_size=64, seed=5, val_fraction=0.5), progress=None
    )
    out = tmp_path / "studies.csv"
    r = run_cli("predict", "--address", ray_address, "--source", str(tmp_path / "src"), "--tracking-uri", uri,
                "--model-uri", f"runs:/{runs[1]}/model", "--model-uri", "models:/cxr@champion", "--model-weight", "2",
                "--model-weight", "1", "--tta", "hflip,scale", "--aggregate", "view-mean", "--findings",
                "--out", str(out), "--actors", "1")  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "mAP_image" in r.stdout  # the study aggregation's effect is reported
    predicted = read_submission(out)
    with open(tmp_path / "src" / "development.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(predicted) == sorted(r["dicom_id"] for r in rows)  # still one row per dicom_id
    by_study: dict = {}
    for row in rows:
        by_study.setdefault(row["study_id"], []).append(predicted[row["dicom_id"]])
    assert any(len(v) > 1 for v in by_study.values())
    for probs in by_study.values():  # view-mean: every image of a study carries the study's row
        assert all(np.array_equal(p, probs[0]) for p in probs)
    with open(out.with_name("studies.findings.csv")) as f:
        findings = {r[0]: [int(v) for v in r[1:]] for r in list(csv.reader(f))[1:]}
    assert all(findings[k] == [int(p >= 0.5) for p in v] for k, v in predicted.items())  # the first model's cuts
