"""Robust input (issue 16): real dataset layouts, bad files and bad settings give one line naming
the file/row/field, and nothing the user had is lost. Every input here is written by the test."""

from __future__ import annotations

import csv
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.data.images import load_resized, read_or_reason
from components.data.manifest import Manifest
from components.data.prepare import PrepareOptions, prepare_dataset
from components.data.readers import read_source
from components.errors import UserError

from . import formats

QUIET = dict(log=lambda *_: None)


def opts(src, **kw):
    return PrepareOptions("cxr-lt-2023", str(src), **{"image_size": 32, "rows_per_shard": 4, **kw})


def rewrite_line(path: Path, line: int, edit) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[line - 1] = edit(lines[line - 1])
    path.write_text("".join(lines))


# -- 1. rows of the wrong width, broken quoting, wrong encoding ----------------------------------


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            lambda s: s.replace(",PA,", ",", 1),
            r"train.csv:3: 31 field\(s\) where the header has 32 \(a value is missing",
        ),
        (lambda s: s.rstrip("\n") + ",1\n", r"train.csv:3: 33 field\(s\) where the header has 32 \(a value too many"),
        (lambda s: s.replace(",PA,", ',"PA,', 1), r"train.csv:3: .*quote"),
    ],
)
def test_a_row_of_the_wrong_width_or_an_open_quote_names_its_line(tmp_path, edit, match):
    formats.cxr_lt_2023(tmp_path)
    rewrite_line(tmp_path / "train.csv", 3, edit)
    with pytest.raises(UserError, match=match):
        read_source("cxr-lt-2023", tmp_path)


def test_trailing_commas_are_not_fields(tmp_path):
    formats.nih(tmp_path)  # header and rows end with a comma, as NIH's Data_Entry_2017.csv does
    entry = tmp_path / "Data_Entry_2017.csv"
    rewrite_line(entry, 3, lambda s: s.rstrip("\n").rstrip(",") + "\n")  # one row without it
    assert len(read_source("nih", tmp_path)) == 4


def test_a_latin1_csv_names_the_file(tmp_path):
    formats.cxr_lt_2023(tmp_path)
    path = tmp_path / "development.csv"
    path.write_bytes(path.read_bytes().replace(b"PA", "Pé".encode("latin-1"), 1))
    with pytest.raises(UserError, match=r"development.csv: not UTF-8 text .* re-save it as UTF-8"):
        read_source("cxr-lt-2023", tmp_path)


# -- 2. bit depth, float images, size limits -----------------------------------------------------


def test_16_bit_png_holding_12_bit_data_is_scaled_by_its_range(tmp_path):
    ramp = np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (64, 1))  # a 12-bit film in a 16-bit PNG
    Image.fromarray(ramp).save(tmp_path / "film.png")
    out = np.asarray(load_resized(str(tmp_path / "film.png"), 64))
    assert out.min() == 0 and out.max() == 255 and abs(out.mean() - 127.5) < 2  # not near black
    flat = np.full((64, 64), 0.25, np.float32)
    flat[:, 32:] = 0.75
    Image.fromarray(flat, mode="F").save(tmp_path / "film.tif")
    out = np.asarray(load_resized(str(tmp_path / "film.tif"), 64))
    assert out[:, :30].max() == 0 and out[:, 34:].min() == 255  # float TIFF: by its range too


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height pixels (its data is never decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize(
    "size,reason",
    [((15000, 15000), "too large"), ((20000, 1), "too small"), ((1, 1), "too small"), ((1000, 40), "degenerate shape")],
)
def test_huge_tiny_and_degenerate_images_are_rejects_with_reasons(tmp_path, size, reason):
    path = tmp_path / "x.png"
    if size[0] * size[1] > 10_000_000:
        bomb_png(path, *size)
    else:
        Image.new("L", size, 128).save(path)
    image, why = read_or_reason(str(path), 32)
    assert image is None and why.startswith(reason), why


def test_a_decompression_bomb_is_a_reject_not_an_abort(tmp_path):
    src = tmp_path / "src"
    formats.cxr_lt_2023(src)
    first = next(csv.DictReader(open(src / "train.csv")))
    bomb_png(src / first["path"], 15000, 15000)
    m = prepare_dataset(opts(src), tmp_path / "out", **QUIET)
    rejects = list(csv.DictReader(open(tmp_path / "out" / "rejects.csv")))
    assert [r["image_id"] for r in rejects] == [first["dicom_id"]] and rejects[0]["reason"].startswith("too large")
    assert m.splits["train"].num_images == 5


def test_small_images_are_enlarged_with_a_warning(tmp_path):
    formats.cxr_lt_2023(tmp_path / "src")  # 64x80 images
    logs = []
    prepare_dataset(opts(tmp_path / "src", image_size=128), tmp_path / "out", log=logs.append)
    assert any("warning: 9 image(s) were smaller than image_size 128 px and were enlarged" in line for line in logs)


# -- 3. prepare never loses what is there --------------------------------------------------------


def test_prepare_over_a_finished_dataset_with_other_options_touches_nothing(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    formats.cxr_lt_2023(src)
    prepare_dataset(opts(src), out, **QUIET)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(UserError, match=r"out .* other options .*image_size"):
        prepare_dataset(opts(src, image_size=48), out, **QUIET)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # manifest.json included
    again = prepare_dataset(opts(str(src) + "/"), out, **QUIET)  # "dir/" is the same source as "dir"
    assert again == Manifest.load(out)


def test_prepare_refuses_a_folder_of_user_files(tmp_path):
    formats.cxr_lt_2023(tmp_path / "src")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "manifest.json").write_text("my notes")
    (out / "rejects.csv").write_text("my table")
    with pytest.raises(UserError, match="is not empty and holds no ralflow dataset"):
        prepare_dataset(opts(tmp_path / "src"), out, **QUIET)
    assert (out / "manifest.json").read_text() == "my notes" and (out / "rejects.csv").read_text() == "my table"


def test_missing_splits_fail_before_any_shard_is_written(tmp_path):
    src = tmp_path / "src"
    formats.cxr_lt_2023(src)
    (src / "train.csv").write_text((src / "train.csv").read_text().splitlines()[0] + "\n")  # header only
    with pytest.raises(UserError, match="no training rows"):
        prepare_dataset(opts(src), tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()
    nih = tmp_path / "nih"
    formats.nih(nih)
    with pytest.raises(UserError, match=r"val_fraction: no validation images \(val_fraction is 0\)"):
        prepare_dataset(PrepareOptions("nih", str(nih), image_size=32, val_fraction=0.0), tmp_path / "o2", **QUIET)
    with pytest.raises(UserError, match=r"none of the 2 training patients fell in the 0.1 drawn for it: raise it"):
        prepare_dataset(PrepareOptions("nih", str(nih), image_size=32), tmp_path / "o2", **QUIET)  # too few to draw
    assert not (tmp_path / "o2").exists()
    formats.cxr_lt_2023(tmp_path / "src2")
    dev = tmp_path / "src2" / "development.csv"
    dev.write_text(dev.read_text().splitlines()[0] + "\n")
    with pytest.raises(UserError, match=r"no validation rows: is its validation CSV missing or empty\?"):
        prepare_dataset(opts(tmp_path / "src2"), tmp_path / "o3", **QUIET)


# -- 6. links and the Kaggle layouts -------------------------------------------------------------


def test_a_linked_images_folder_is_read_and_a_link_leaving_the_root_is_refused(tmp_path):
    root = tmp_path / "nih"
    formats.nih(root)
    (root / "images_002").rename(root / "real")
    (root / "images_002").symlink_to(root / "real")  # a folder link inside the root
    (root / "loop").symlink_to(root)  # a loop: walked once
    t = read_source("nih", root)
    assert Path(t.path[t.image_id.index("00000002_000.png")]).is_file()
    (root / "images_001").rename(tmp_path / "outside")
    (root / "images_001").symlink_to(tmp_path / "outside")  # a folder link that leaves the root
    t = read_source("nih", root)
    image, reason = read_or_reason(t.path[t.image_id.index("00000001_000.png")], 32, root=str(root.resolve()))
    assert image is None and reason.startswith("outside the dataset root (a link to")

    src, outside = tmp_path / "src", tmp_path / "elsewhere.jpg"
    formats.cxr_lt_2023(src)
    first = next(csv.DictReader(open(src / "train.csv")))
    (src / first["path"]).rename(outside)
    (src / first["path"]).symlink_to(outside)  # a file link that leaves the root
    prepare_dataset(opts(src), tmp_path / "out", **QUIET)
    (reject,) = csv.DictReader(open(tmp_path / "out" / "rejects.csv"))
    assert reject["image_id"] == first["dicom_id"] and reject["reason"].startswith("outside the dataset root")


def test_kaggle_nih_sample_and_a_renamed_labels_file(tmp_path):
    formats.nih(tmp_path)
    (tmp_path / "Data_Entry_2017.csv").rename(tmp_path / "sample_labels.csv")
    assert len(read_source("nih", tmp_path)) == 4
    (tmp_path / "sample_labels.csv").rename(tmp_path / "my labels.csv")
    with pytest.raises(UserError, match="Data_Entry_2017.csv: file not found .*labels_csv"):
        read_source("nih", tmp_path)
    assert len(read_source("nih", tmp_path, labels_csv="my labels.csv")) == 4


def test_kaggle_chexpert_mirror_without_its_top_folder(tmp_path):
    formats.chexpert(tmp_path / "orig")
    mirror = tmp_path / "kaggle"
    (tmp_path / "orig" / "CheXpert-v1.0-small").rename(mirror)  # Kaggle: the folder's contents at the root
    t = read_source("chexpert", mirror)
    assert len(t) == 6 and all(Path(p).is_file() for p in t.path)
    assert t.split.count("train") == 4 and t.split.count("val") == 2


# -- 7. settings and paths: one line naming the setting, before any work --------------------------


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"train": {"cpus_per_worker": 0}}, r"train.cpus_per_worker=0.0 is invalid; allowed: > 0"),
        ({"train": {"cpus_per_worker": -1}}, r"train.cpus_per_worker=-1.0 is invalid"),
        ({"data": {"image_size": -5}}, r"data.image_size=-5 is invalid; allowed: 16..4096"),
        ({"data": {"image_size": 0}}, r"data.image_size=0 is invalid"),  # not silently the prepared size
        ({"data": {"prefetch_batches": 0}}, r"data.prefetch_batches=0 is invalid; allowed: >= 1"),
        ({"data": {"shuffle_buffer": -5}}, r"data.shuffle_buffer=-5 is invalid; allowed: >= 0"),
    ],
)
def test_bad_training_settings_fail_at_load(overrides, match):
    from components.config import load_config

    with pytest.raises(UserError, match=match) as err:
        load_config(None, overrides)
    assert err.value.field == match.split("=")[0].replace("\\", "")


def test_shards_whose_labels_disagree_with_the_manifest_are_refused(tmp_path):
    import json

    formats.cxr_lt_2023(tmp_path / "src")
    prepare_dataset(opts(tmp_path / "src"), tmp_path / "out", **QUIET)
    Manifest.load(tmp_path / "out").check_shards()  # consistent
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    m["label_names"] = m["label_names"][:-1]
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match=r"train-00000.parquet: labels have 26 values but manifest.json lists 25"):
        Manifest.load(tmp_path / "out").check_shards()


def test_promote_and_predict_check_their_settings_before_any_work(tmp_path):
    from components.predict import PredictOptions, predict
    from components.promote import PromoteOptions, promote

    with pytest.raises(UserError, match=r"model_name 'a/b:c' is invalid") as err:
        promote(PromoteOptions("a/b:c", tracking_uri=f"sqlite:///{tmp_path}/m.db"))
    assert err.value.field == "model_name" and not (tmp_path / "m.db").exists()
    with pytest.raises(UserError, match=r"out .* is a folder; give the CSV file to write"):
        predict(PredictOptions("models:/x@champion", str(tmp_path), data=str(tmp_path)))
    with pytest.raises(UserError, match=r"actors=0 is invalid"):  # not silently the default
        predict(PredictOptions("models:/x@champion", str(tmp_path / "o.csv"), data=str(tmp_path), actors=0))
    from components.serve import ServeOptions, serve_champion

    for bad, allowed in (({"replicas": 0}, ">= 1"), ({"port": 70000}, "1..65535"), ({"refresh_s": 0}, "> 0")):
        with pytest.raises(UserError, match=f"is invalid; allowed: {re.escape(allowed)}$") as err:
            serve_champion(ServeOptions("cxr", tracking_uri=f"sqlite:///{tmp_path}/m.db", **bad))
        assert err.value.field == next(iter(bad))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def http_answer():
    """A local HTTP server answering /api/version with a chosen status and body."""
    import http.server
    import threading

    reply = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(reply["status"])
            self.end_headers()
            self.wfile.write(reply["body"])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def answer(status: int, body: bytes = b"") -> str:
        reply.update(status=status, body=body)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield answer
    server.shutdown()


def test_submit_says_what_is_wrong_with_the_address(http_answer, monkeypatch, tmp_path):
    from components.submit import check_reachable, jobs_address

    with pytest.raises(UserError, match=r"address 'not a url' is not a URL like http://HOST:8265"):
        jobs_address("not a url")
    assert jobs_address("127.0.0.1:8265") == "http://127.0.0.1:8265"
    with pytest.raises(UserError, match=r"answered HTTP 404 at /api/version: not a Ray dashboard"):
        check_reachable(http_answer(404))
    with pytest.raises(UserError, match=r"answered, but not as a Ray dashboard"):
        check_reachable(http_answer(200, b"<html>MLflow</html>"))
    check_reachable(http_answer(200, b'{"version": "4", "ray_version": "2.60.0"}'))  # a dashboard
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(UserError, match=r"requires its auth token; copy the head node's ~/.ray/auth_token"):
        check_reachable(http_answer(401))
    (tmp_path / "no-token").write_text("secret")
    check_reachable(http_answer(401))  # with a token, ralflow goes on and attaches it


def test_submit_sends_the_job_to_the_address_given_whatever_the_environment_says(http_answer, monkeypatch):
    """Ray's Jobs client prefers RAY_API_SERVER_ADDRESS / RAY_ADDRESS over its argument: an exported
    address of another cluster must not take the job away from --address."""
    from ray.job_submission import JobSubmissionClient

    from components.submit import jobs_client

    elsewhere = "http://127.0.0.1:9"  # nothing listens there: a client that went there would fail
    monkeypatch.setenv("RAY_ADDRESS", elsewhere)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", elsewhere)
    given = http_answer(200, b'{"version": "4", "ray_version": "2.60.0"}')
    client = jobs_client(JobSubmissionClient, given)
    assert client.get_address() == given
    assert os.environ["RAY_ADDRESS"] == os.environ["RAY_API_SERVER_ADDRESS"] == elsewhere  # left as found


def test_a_submitted_job_gets_absolute_paths_and_no_defaults_in_its_temporary_folder(monkeypatch, tmp_path):
    """A job runs in a copy of the code that Ray deletes in time: `--data data` pointed into it,
    and a train without --storage-path (or a tracking URI) kept its checkpoints (or its MLflow
    store) there. Relative paths are made absolute where the user typed them; such defaults are
    refused in the job, naming the flag."""
    from components.config import SUBMITTED_ENV, default_tracking_uri, load_config
    from components.submit import absolute_paths

    here = Path("/home/u/project")
    args = ["--data", "data", "--epochs", "3", "--out=sub.csv", "--config", "cxr-lt-2023-gpu", "--source", "/abs",
            "--storage-path", "s3://b/runs", "--tracking-uri", "sqlite:///mlflow.db", "--config=my.yaml",
            "--search-space", "~/space.yaml", "--model", "data", "--pretrained-path"]  # fmt: skip
    new, notes = absolute_paths(args, here)
    assert new == ["--data", "/home/u/project/data", "--epochs", "3", "--out=/home/u/project/sub.csv", "--config",
                   "cxr-lt-2023-gpu", "--source", "/abs", "--storage-path", "s3://b/runs", "--tracking-uri",
                   "sqlite:////home/u/project/mlflow.db", "--config=/home/u/project/my.yaml",
                   "--search-space", "~/space.yaml", "--model", "data", "--pretrained-path"]  # fmt: skip
    assert notes[0] == "--data data -> /home/u/project/data" and len(notes) == 4

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert load_config(None, {}).tracking.storage_path == str(tmp_path / "ralflow-runs")  # outside a job
    monkeypatch.setenv(SUBMITTED_ENV, "1")
    with pytest.raises(UserError, match=r"^tracking_uri is required in a job sent by `ralflow submit`") as err:
        default_tracking_uri()
    assert err.value.field == "tracking_uri"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")  # the cluster's, as KubeRay and local.sh set
    assert default_tracking_uri() == "http://mlflow:5000"
    with pytest.raises(UserError, match=r"^tracking.storage_path is required .* give a folder every node sees") as err:
        load_config(None, {})
    assert err.value.field == "tracking.storage_path"
    assert load_config(None, {"tracking": {"storage_path": "s3://b/runs"}}).tracking.storage_path == "s3://b/runs"


def test_joining_a_ray_cluster_says_what_is_wrong_with_the_address(cli, tmp_path):
    """Ray waits minutes on an address where nothing listens, and refuses a dashboard URL with a
    message cut short: both fail in seconds with a line that says what to do."""
    import socket

    from components.runtime import check_ray_address

    with pytest.raises(UserError, match=r"^http://h:8265 \(RAY_ADDRESS\) is a Ray Jobs \(dashboard\) address: run on"):
        check_ray_address("http://h:8265 (RAY_ADDRESS)", "http://h:8265")
    check_ray_address("auto", "auto")  # Ray's own search on this machine: nothing to check here
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        check_ray_address("a head", f"127.0.0.1:{listening.getsockname()[1]}")  # something answers: go on
    r = cli("prepare", "--format", "nih", "--source", str(tmp_path), "--out", str(tmp_path / "out"),
            "--address", "127.0.0.1:9", cwd=tmp_path, timeout=120)  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "ralflow prepare: error: cannot reach the Ray cluster at 127.0.0.1:9 (Connection refused): is it up, "
        "and is this its GCS address (head:6379)? (flag --address)"
    )


def test_a_token_here_is_used_for_a_named_cluster_only(monkeypatch, tmp_path):
    """Ray turns token authentication on by itself for a cluster it finds alone, never for an
    explicit address, which a token-auth cluster then refuses: ralflow uses the token there."""
    from components.runtime import use_token_for_cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "unset below")  # so that the test's end restores the variable
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "auth_token"))
    use_token_for_cluster("head:6379")
    assert "RAY_AUTH_MODE" not in os.environ  # no token here: nothing to send
    (tmp_path / "auth_token").write_text("secret")
    use_token_for_cluster(None)
    assert "RAY_AUTH_MODE" not in os.environ  # a local Ray: Ray's own default applies
    use_token_for_cluster("head:6379")
    assert os.environ["RAY_AUTH_MODE"] == "token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    use_token_for_cluster("head:6379")
    assert os.environ["RAY_AUTH_MODE"] == "disabled"  # the user's own choice stands


def test_the_cli_shows_the_flag_of_a_bad_setting(cli, tmp_path):
    r = cli("train", "--data", str(tmp_path), "--cpus-per-worker", "0", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == "ralflow train: error: --cpus-per-worker=0.0 is invalid; allowed: > 0"
    r = cli("submit", "--address", "not a url", "train", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == (
        "ralflow submit: error: --address 'not a url' is not a URL like http://HOST:8265 (the Ray dashboard)"
    )


# -- 8. what people read ---------------------------------------------------------------------------


def test_undefined_metrics_read_n_a_and_worker_nodes_accumulate():
    from components.metrics import fmt
    from components.train.loop import epoch_line, merge_nodes

    assert fmt(float("nan")) == "n/a" and fmt(0.51234) == "0.5123"
    m = {
        "epoch": 1,
        "train_loss": 0.5,
        "val_mAP": 0.4,
        "val_mAP_head": 0.6,
        "val_mAP_medium": 0.3,
        "val_mAP_tail": float("nan"),
        "val_AUROC": 0.8,
        "images_per_s": 100.0,
        "data_wait_frac": 0.1,
        "epoch_time_s": 2.0,
    }
    assert "epoch 1/3 " in epoch_line(m, 3) and "tail n/a" in epoch_line(m, 3)
    assert merge_nodes("", ["b", "a"]) == "a,b" and merge_nodes("a,b", ["c"]) == "a,b,c"  # a restart adds, never drops
