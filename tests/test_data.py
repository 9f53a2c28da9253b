"""Data layer: readers on tiny real-format files, label policies, path safety, bad input,
atomic/resumable shards, manifest contents, synth determinism."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from components.data.labels import CHEXPERT, CXR_LT_2023_COUNTS, NIH, LabelPolicy, frequency_groups
from components.data.manifest import Manifest
from components.data.prepare import PrepareOptions, prepare_dataset, sha256_file
from components.data.readers import read_source
from components.data.synth import LABELS, SynthOptions, draw_labels, write_synthetic_cxr_lt
from components.errors import UserError

from . import formats

QUIET = dict(log=lambda *_: None)


def test_cxr_lt_2023_reader_finds_labels_by_name(tmp_path):
    truth = formats.cxr_lt_2023(tmp_path)
    t = read_source("cxr-lt-2023", tmp_path)
    assert t.label_names == tuple(CXR_LT_2023_COUNTS)
    assert t.split.count("train") == 6 and t.split.count("val") == 3
    for i, image_id in enumerate(t.image_id):
        assert t.labels[i] == truth[image_id]
    assert all(Path(p).is_file() and p.startswith(str(tmp_path)) for p in t.path)
    assert t.patient_id[0] == t.patient_id[1]  # two images per patient in the fixture


def test_cxr_lt_2024_reader_uses_fpath(tmp_path):
    formats.cxr_lt_2024(tmp_path)
    t = read_source("cxr-lt-2024", tmp_path)
    assert len(t.label_names) == 40 and "Normal" in t.label_names and "No Finding" not in t.label_names
    assert t.split == ["train", "train", "train", "val"]
    assert t.labels[1][1] == 1.0 and sum(t.labels[1]) == 1.0


def test_nih_reader_pipe_labels_and_lookup(tmp_path):
    formats.nih(tmp_path)
    t = read_source("nih", tmp_path)
    row = t.image_id.index("00000001_000.png")
    assert [n for n, v in zip(NIH, t.labels[row]) if v] == ["Cardiomegaly", "Effusion"]
    assert sum(t.labels[t.image_id.index("00000001_001.png")]) == 0  # No Finding
    assert t.split[t.image_id.index("00000003_000.png")] == "test"
    assert t.path[t.image_id.index("00000002_000.png")].endswith("images_002/images/00000002_000.png")
    # the two images of patient 1 share a split (patient-level split)
    assert t.split[0] == t.split[1]


@pytest.mark.parametrize(
    "policy,uncertain,blank",
    [("ones", (1.0, 1.0), (1.0, 1.0)), ("zeros", (0.0, 1.0), (0.0, 1.0)), ("ignore", (0.0, 0.0), (0.0, 0.0))],
)
def test_chexpert_uncertainty_policies(tmp_path, policy, uncertain, blank):
    formats.chexpert(tmp_path)
    t = read_source("chexpert", tmp_path, LabelPolicy(uncertain=policy, blank=policy))
    assert t.label_names == CHEXPERT and t.split.count("val") == 2
    # fixture row 0: column k holds "1.0", "-1.0", "", "0.0" for k % 4 == 0, 1, 2, 3
    assert (t.labels[0][0], t.mask[0][0]) == (1.0, 1.0)
    assert (t.labels[0][1], t.mask[0][1]) == uncertain
    assert (t.labels[0][2], t.mask[0][2]) == blank
    assert (t.labels[0][3], t.mask[0][3]) == (0.0, 1.0)
    assert t.patient_id[0] == "patient00000"


def test_label_policy_rejects_other_values():
    with pytest.raises(ValueError, match="not one of"):
        LabelPolicy().convert("2")
    with pytest.raises(ValueError, match="not a number"):
        LabelPolicy().convert("yes")


@pytest.mark.parametrize("bad", ["../../etc/passwd", "files/../../outside.jpg", "/etc/passwd"])
def test_paths_escaping_the_root_are_refused(tmp_path, bad):
    formats.cxr_lt_2023(tmp_path)
    rows = list(csv.reader(open(tmp_path / "train.csv")))
    rows[3][4] = bad
    formats.write_csv(tmp_path / "train.csv", rows[0], rows[1:])
    with pytest.raises(UserError, match=r"train.csv:4, column 'path'.*(escapes|absolute)"):
        read_source("cxr-lt-2023", tmp_path)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda rows: [r[:4] + r[5:] for r in rows], r"train.csv: missing column\(s\) 'path'"),
        (
            lambda rows: rows[:2] + [rows[2][:-1] + ["maybe"]] + rows[3:],
            r"train.csv:3, column 'Atelectasis'.*not a number",
        ),
        (
            lambda rows: rows + [rows[1]],
            r"train.csv:8, column 'dicom_id': duplicate id 'd0000' \(first seen at .*train.csv:2\)",
        ),
    ],
)
def test_malformed_csv_fails_before_any_work(tmp_path, edit, match):
    src, out = tmp_path / "src", tmp_path / "out"
    formats.cxr_lt_2023(src)
    rows = list(csv.reader(open(src / "train.csv")))
    rows = edit(rows)
    formats.write_csv(src / "train.csv", rows[0], rows[1:])
    with pytest.raises(UserError, match=match):
        prepare_dataset(PrepareOptions("cxr-lt-2023", str(src), image_size=32), out, **QUIET)
    assert not out.exists() or not list(out.iterdir())


def test_nih_unknown_finding_names_row(tmp_path):
    formats.nih(tmp_path)
    text = (tmp_path / "Data_Entry_2017.csv").read_text().replace("Hernia", "Hernai")
    (tmp_path / "Data_Entry_2017.csv").write_text(text)
    with pytest.raises(UserError, match=r"Data_Entry_2017.csv:4, column 'Finding Labels'.*Hernai"):
        read_source("nih", tmp_path)


def opts(src, **kw):
    return PrepareOptions("cxr-lt-2023", str(src), **{"image_size": 32, "rows_per_shard": 2, "row_group_size": 1, **kw})


def test_bad_images_are_rejected_and_the_rest_kept(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    formats.cxr_lt_2023(src)
    t = read_source("cxr-lt-2023", src)
    os.remove(t.path[1])  # missing
    data = Path(t.path[2]).read_bytes()
    Path(t.path[2]).write_bytes(data[: len(data) // 3])  # truncated
    Path(t.path[4]).write_bytes(b"not an image at all")  # undecodable
    m = prepare_dataset(opts(src), out, **QUIET)
    rejects = list(csv.DictReader(open(out / "rejects.csv")))
    assert [r["image_id"] for r in rejects] == [t.image_id[1], t.image_id[2], t.image_id[4]]
    assert rejects[0]["reason"] == "missing file" and rejects[0]["origin"].endswith("train.csv:3")
    assert rejects[1]["reason"].startswith("undecodable") and rejects[2]["reason"].startswith("undecodable")
    assert m.num_rejects == 3 and m.splits["train"].num_images == 3 and m.splits["val"].num_images == 3
    kept = pq.read_table([out / s.path for s in m.shards]).column("image_id").to_pylist()
    assert sorted(kept) == sorted(set(t.image_id) - {r["image_id"] for r in rejects})
    # --strict fails instead, and leaves no manifest behind
    with pytest.raises(UserError, match=r"train.csv:3.*missing file.*strict"):
        prepare_dataset(opts(src, strict=True), tmp_path / "strict", **QUIET)
    assert not (tmp_path / "strict" / "manifest.json").exists()


def test_manifest_contents_and_shards(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    truth = formats.cxr_lt_2023(src)
    m = prepare_dataset(opts(src), out, **QUIET)
    assert m == Manifest.load(out)
    assert m.label_names == list(CXR_LT_2023_COUNTS) and m.image_size == 32
    train_ids = [k for k in truth if not k.startswith("d01")]
    want_counts = np.array([truth[k] for k in train_ids]).sum(0)
    assert m.class_counts("train") == want_counts.astype(int).tolist()
    assert m.group_list() == frequency_groups(want_counts.tolist(), len(train_ids))
    assert sum(s.num_rows for s in m.shards) == 9 and len(m.shards) == 5  # 3 train + 2 val shards of <= 2
    for s in m.shards:
        f = pq.ParquetFile(out / s.path)
        assert f.metadata.num_rows == s.num_rows and sha256_file(out / s.path) == s.sha256
        assert f.metadata.num_row_groups == s.num_rows  # row_group_size=1
    assert m.options["image_size"] == 32 and m.source["format"] == "cxr-lt-2023"
    row = pq.read_table(out / "train-00000.parquet").to_pylist()[0]
    assert row["labels"] == truth[row["image_id"]] and row["mask"] == [1.0] * 26
    import io

    from PIL import Image

    assert Image.open(io.BytesIO(row["image"])).size == (32, 32)


def test_interrupted_prepare_resumes_to_the_same_dataset(tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    formats.cxr_lt_2023(src)
    full = prepare_dataset(opts(src), out, **QUIET)
    # simulate an interruption: a shard never finished (only its temp file exists), no manifest
    os.remove(out / "train-00001.parquet")
    (out / ".train-00001.parquet.tmp").write_bytes(b"partial garbage")
    os.remove(out / "manifest.json")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    logs = []
    again = prepare_dataset(opts(src), out, log=logs.append)
    assert any("1 already" not in line and "4 already complete" in line for line in logs)
    assert again.dataset_sha256 == full.dataset_sha256
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in full.shards]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet") if p.name in before} == before
    with pytest.raises(UserError, match="other options.*image_size"):
        prepare_dataset(opts(src, image_size=48), out, **QUIET)
    # `ralflow run --source` checks a reused dataset without preparing: the same source spelled
    # otherwise is the same source (a relative one was refused as "other options")
    from components.data.prepare import check_output_folder

    monkeypatch.chdir(tmp_path)
    for spelled in ("src", "./src/", f"file://{src}"):
        check_output_folder(out, opts(spelled))


def test_a_source_edited_since_is_prepared_again_not_served_from_old_shards(tmp_path):
    """Complete shards were kept by name: after a label corrected in the CSV (or rows removed), a
    re-run wrote a manifest of the new source over shards of the old one. Now a shard is current
    only while its rows are what the source says; others are written again, extra ones removed."""
    import csv as csv_module

    src, out = tmp_path / "src", tmp_path / "out"
    formats.cxr_lt_2023(src)
    first = prepare_dataset(opts(src), out, **QUIET)
    rows = list(csv_module.reader((src / "train.csv").open()))
    header, body = rows[0], rows[1:]
    column = header.index("Pneumonia")
    body[4][column] = "1" if body[4][column] == "0" else "0"  # a label corrected in row 5 (shard train-00002)
    formats.write_csv(src / "train.csv", header, body)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    logs = []
    again = prepare_dataset(opts(src), out, log=logs.append)
    assert any("4 already complete, 1 written again (the source's rows or labels changed" in line for line in logs)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    assert [name for name in before if after[name] != before[name]] == ["train-00002.parquet"]
    assert again.dataset_sha256 != first.dataset_sha256
    assert again.splits["train"].class_counts["Pneumonia"] != first.splits["train"].class_counts["Pneumonia"]
    table = pq.read_table(out / "train-00002.parquet", columns=["image_id", "labels"])
    stored = dict(zip(table.column("image_id").to_pylist(), table.column("labels").to_pylist()))
    assert stored[body[4][0]][again.label_names.index("Pneumonia")] == float(body[4][column])

    formats.write_csv(src / "train.csv", header, body[:2])  # rows removed: one training shard left
    logs.clear()
    third = prepare_dataset(opts(src), out, log=logs.append)
    assert sorted(p.name for p in out.glob("train-*.parquet")) == ["train-00000.parquet"]
    assert any("removed 2 shard(s) the source no longer fills: train-00001.parquet, train-00002.parquet" in line
               for line in logs)  # fmt: skip
    assert third.splits["train"].num_images == 2 and Manifest.load(out).verify(full=True) == len(third.shards)


def test_ignore_policy_mask_reaches_the_shards(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    formats.chexpert(src)
    m = prepare_dataset(PrepareOptions("chexpert", str(src), image_size=32, uncertain="ignore"), out, **QUIET)
    rows = pq.read_table(out / "train-00000.parquet").to_pylist()
    assert rows[0]["mask"][1] == 0.0 and rows[0]["mask"][0] == 1.0
    assert m.splits["train"].labeled_counts["No Finding"] < 4


def test_synth_labels_follow_cxr_lt_contract():
    clean, noisy = draw_labels(20000, np.random.default_rng(0), 0.02)
    nf, sd = LABELS.index("No Finding"), LABELS.index("Support Devices")
    others = np.delete(noisy, [nf, sd], axis=1).sum(1)
    assert (others[noisy[:, nf] == 1] == 0).all()  # No Finding only with Support Devices
    assert (np.delete(clean, [nf, sd], axis=1).sum(1)[clean[:, nf] == 0] > 0).all()
    want = np.array(list(CXR_LT_2023_COUNTS.values())) / 264849
    got = clean.mean(0)
    assert np.all(np.abs(got - want) < 0.35 * want + 0.004)  # frequencies near CXR-LT's
    assert 2.0 < clean.sum(1).mean() < 3.0


def test_synth_is_deterministic_and_patient_disjoint(tmp_path):
    a = write_synthetic_cxr_lt(
        tmp_path / "a", SynthOptions(num_images=40, image_size=48, seed=3, workers=1), progress=None
    )
    b = write_synthetic_cxr_lt(
        tmp_path / "b", SynthOptions(num_images=40, image_size=48, seed=3, workers=2), progress=None
    )
    assert a == b
    for f in ("train.csv", "development.csv"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    t = read_source("cxr-lt-2023", tmp_path / "a")
    imgs = sorted((tmp_path / "a").rglob("*.jpg"))
    assert len(imgs) == 40 and all(
        (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes() == p.read_bytes() for p in imgs
    )
    train_p = {p for p, s in zip(t.patient_id, t.split) if s == "train"}
    val_p = {p for p, s in zip(t.patient_id, t.split) if s == "val"}
    assert train_p and val_p and not train_p & val_p


def test_synth_writes_only_into_an_empty_folder_or_its_own(tmp_path):
    """synth's train.csv and development.csv are the real CXR-LT 2023 label files' names: a
    folder holding anything else (a real dataset root, a prepared dataset) is refused untouched."""
    real = tmp_path / "cxr-lt"
    real.mkdir()
    (real / "train.csv").write_text("the real labels\n")
    (real / "files").mkdir()
    with pytest.raises(UserError) as err:
        write_synthetic_cxr_lt(real, SynthOptions(num_images=20, image_size=48, workers=1), progress=None)
    assert err.value.field == "out" and str(err.value).startswith(
        f"out {real} is not empty and was not written by synth (it holds files, train.csv); "
    )
    assert (real / "train.csv").read_text() == "the real labels\n" and list((real / "files").iterdir()) == []
    ours = tmp_path / "synth"
    write_synthetic_cxr_lt(ours, SynthOptions(num_images=20, image_size=48, workers=1), progress=None)
    again = write_synthetic_cxr_lt(ours, SynthOptions(num_images=30, image_size=48, workers=1), progress=None)
    assert again["train"] + again["development"] == 30  # its own folder: written again


def test_a_cancel_during_the_decoders_imports_is_held_until_they_finish():
    """Ray cancels a running task by interrupting the main thread; one landing mid-import would
    leave half-imported modules behind in a worker process Ray reuses. The interrupt is held back
    until the guarded block ends, then raised."""
    import _thread

    from components.data.ingest import deferred_interrupts

    steps = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            _thread.interrupt_main()
            for _ in range(200_000):  # bytecode runs on: an unguarded interrupt would land here
                pass
            steps.append("block finished")
    assert steps == ["block finished"]
    with deferred_interrupts():  # the handler is restored and nothing is left pending
        steps.append("quiet")
    assert steps == ["block finished", "quiet"]


def _params(n, **kw):
    import torch

    base = {"w": 1.0, "h": 1.0, "cx": 0.0, "cy": 0.0, "angle": 0.0, "brightness": 1.0, "contrast": 1.0}
    base.update(kw)
    p = {k: torch.full((n,), float(v)) for k, v in base.items()}
    p["flip"] = torch.full((n,), bool(kw.get("flip", False)))
    return p


def test_batched_augmentation_matches_torchvision_geometry():
    """Each step of the vectorised augmentation against torchvision's own functional ops."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    from components.data.ingest import AugmentOptions, augment_batch, resize_batch

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 1, 64, 64), dtype=torch.uint8, generator=g)
    opts = AugmentOptions()
    assert torch.equal(augment_batch(x, 64, opts, _params(3)), x)  # identity
    wide = AugmentOptions(crop_scale_min=0.25)  # (a crop this small is outside the default range)
    assert torch.equal(augment_batch(x, 32, wide, _params(3, w=0.5, h=0.5)), x[..., 16:48, 16:48])  # centre crop
    assert torch.equal(augment_batch(x, 64, opts, _params(3, flip=True)), torch.flip(x, dims=[-1]))
    rotated = augment_batch(x, 64, opts, _params(3, angle=math.pi / 2))
    assert torch.equal(rotated, torch.rot90(x, 1, dims=(-2, -1))) or torch.equal(
        rotated, torch.rot90(x, -1, dims=(-2, -1))
    )
    # A small rotation: the same image as torchvision's bilinear rotate, within interpolation rounding.
    small = augment_batch(x, 64, opts, _params(3, angle=math.radians(5)))
    ref = torch.stack([TF.rotate(im, 5.0, interpolation=TF.InterpolationMode.BILINEAR) for im in x])
    ref2 = torch.stack([TF.rotate(im, -5.0, interpolation=TF.InterpolationMode.BILINEAR) for im in x])
    inner = (slice(None), slice(None), slice(8, 56), slice(8, 56))  # away from the zero-filled corners
    assert min((small[inner].int() - r[inner].int()).abs().float().mean().item() for r in (ref, ref2)) < 1.0
    # Brightness then contrast, as torchvision's adjust_* on the same image.
    bc = augment_batch(x, 64, opts, _params(3, brightness=1.2, contrast=0.8))
    ref = torch.stack([TF.adjust_contrast(TF.adjust_brightness(im, 1.2), 0.8) for im in x])
    diff = (bc.int() - ref.int()).abs()  # torchvision truncates to uint8 between the two steps
    assert diff.max() <= 2 and diff.float().mean() < 1.0
    # Validation resize: torchvision's antialiased Resize.
    assert (resize_batch(x, 40).int() - TF.resize(x, [40, 40], antialias=True).int()).abs().max() <= 1


def test_augmentation_parameters_stay_in_their_ranges():
    import torch

    from components.data.ingest import AugmentOptions, augment_params

    opts = AugmentOptions(crop_scale_min=0.75, rotation_degrees=7, hflip=False, brightness=0.2, contrast=0.2)
    p = augment_params(20_000, opts, torch.Generator().manual_seed(1))
    area = p["w"] * p["h"]
    assert area.min() >= 0.75 - 1e-6 and area.max() <= 1 + 1e-6 and area.max() > 0.99 and area.min() < 0.76
    assert ((p["w"] / p["h"]) >= 0.9 - 1e-6).all() and ((p["w"] / p["h"]) <= 1.1 + 1e-6).all()
    assert ((p["cx"].abs() + p["w"]) <= 1 + 1e-6).all() and ((p["cy"].abs() + p["h"]) <= 1 + 1e-6).all()  # crop inside
    assert p["angle"].abs().max() <= math.radians(7) + 1e-6 and p["angle"].abs().max() > math.radians(6.9)
    assert not p["flip"].any()
    assert 0.8 - 1e-6 <= p["brightness"].min() < 0.81 and 1.19 < p["brightness"].max() <= 1.2 + 1e-6
    assert augment_params(20_000, AugmentOptions(hflip=True))["flip"].float().mean().item() == pytest.approx(
        0.5, abs=0.02
    )


def test_decode_transform_handles_mixed_sizes_and_keeps_labels(tmp_path):
    import io

    from PIL import Image

    from components.data.ingest import AugmentOptions, DecodeTransform

    def jpeg(w, h):
        buf = io.BytesIO()
        Image.fromarray((np.arange(w * h) % 251).astype(np.uint8).reshape(h, w)).save(buf, format="JPEG")
        return buf.getvalue()

    batch = {"image": [jpeg(48, 48), jpeg(60, 40), jpeg(48, 48)], "labels": [[1.0, 0.0]] * 3, "mask": [[1.0, 1.0]] * 3}
    for augment in (None, AugmentOptions()):
        out = DecodeTransform(32, augment)(batch)
        assert out["image"].shape == (3, 1, 32, 32) and out["image"].dtype == np.uint8
        assert out["labels"].tolist() == [[1.0, 0.0]] * 3 and out["mask"].dtype == np.float32


def test_decode_transform_chunks_fit_the_cache_budget_and_do_not_change_the_result():
    import io

    from PIL import Image

    from components.data.ingest import DecodeTransform

    t = DecodeTransform(224, None)
    assert t.chunk_size(256) == 6 and t.chunk_size(512) == 3 and t.chunk_size(4096) == 1
    rng = np.random.default_rng(0)

    def jpeg():
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(buf, format="JPEG")
        return buf.getvalue()

    batch = {"image": [jpeg() for _ in range(13)], "labels": [[1.0]] * 13, "mask": [[1.0]] * 13}
    whole = DecodeTransform(40, None)  # 13 images in one resize
    chunked = DecodeTransform(40, None)
    chunked.CACHE_BYTES = 4 * (64 * 64 + 3 * 40 * 40) * 4  # 4 images per chunk: 4 + 4 + 4 + 1
    assert whole.chunk_size(64) >= 13 and chunked.chunk_size(64) == 4
    np.testing.assert_array_equal(chunked(batch)["image"], whole(batch)["image"])


def test_a_pipeline_rerun_with_other_sizes_is_refused_not_served_the_old_data(tmp_path, monkeypatch):
    """`ralflow run` reuses the data of its workdir; asked for other sizes it said "already
    written, reusing" and trained on the old images. Now it names what differs, before any Ray."""
    import components.runtime as runtime
    from components.pipeline import PipelineOptions, run_pipeline

    work = tmp_path / "work"
    write_synthetic_cxr_lt(work / "synth", SynthOptions(num_images=60, image_size=32, seed=0), progress=None)
    said = []
    monkeypatch.setattr(runtime, "init_ray", lambda *a, **k: said.append("ray"))
    same_synth = {"workdir": str(work), "num_images": 60, "synth_size": 32, "seed": 0}
    with pytest.raises(UserError, match=r"synthetic data written with other options \{'num_images': \(60, 80\)\}"):
        run_pipeline(PipelineOptions(**{**same_synth, "num_images": 80}), log=said.append)
    assert "ray" not in said and "synth: already written, reusing" not in said
    prepare_dataset(PrepareOptions("cxr-lt-2023", str(work / "synth"), image_size=32, rows_per_shard=512),
                    work / "data", log=lambda *_: None)  # fmt: skip
    with pytest.raises(UserError, match=r"prepared with other options \{'image_size': \(32, 40\)\}"):
        run_pipeline(PipelineOptions(**same_synth, image_size=40), log=said.append)
    assert "synth: already written, reusing" in said and "prepare: dataset already complete, reusing" not in said


def test_paths_may_be_file_uris_and_object_store_uris_only_where_they_are_read(tmp_path, monkeypatch):
    """`ralflow synth --out file:///x` wrote a folder named `file:` in the working directory, and
    `prepare --source file:///x` failed inside a Ray task. A `file://` URI is its local path;
    a prepared dataset is read through pyarrow at any URI; what must write or read local files
    refuses an object-store URI, naming the flag, before anything is written."""
    import pyarrow as pa

    from components.config import load_config, resolve_defaults
    from components.data.ingest import read_row_group, row_groups
    from components.data.sampling import read_split_labels
    from components.predict import PredictOptions, predict

    monkeypatch.chdir(tmp_path)  # where `file:` would have appeared
    src, data = tmp_path / "src", tmp_path / "data"
    write_synthetic_cxr_lt(f"file://{src}", SynthOptions(num_images=40, image_size=32, seed=0), progress=None)
    prepare_dataset(PrepareOptions("cxr-lt-2023", f"file://{src}", image_size=32), f"file://{data}", **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "src"]

    local, uri = Manifest.load(data), Manifest.load(f"file://{data}")  # through pyarrow's URI path
    assert uri.dataset_sha256 == local.dataset_sha256 and uri.root == f"file://{data}"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert uri.verify() == len(uri.shards)  # hashed once, remembered in this user's cache (not in a bucket)
    assert uri.verify() == 0 and uri.verify(full=True) == len(uri.shards)
    shard = data / uri.shards[0].path
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # another version of it
    assert uri.verify() == 1
    assert len(list((tmp_path / "cache" / "ralflow" / "verified").iterdir())) == 1
    paths = uri.shard_paths("train")
    assert all(p.startswith("file:///") for p in paths)
    items = row_groups(paths)
    batch = pa.table({k: [item[k] for item in items] for k in ("path", "row_group", "index")})
    read = read_row_group(batch, ["image_id", "labels"])
    assert read.num_rows == local.splits["train"].num_images
    np.testing.assert_array_equal(read_split_labels(paths)[0], read_split_labels(local.shard_paths("train"))[0])
    with pytest.raises(UserError, match="no manifest.json"):
        Manifest.load(f"file://{tmp_path}/nowhere")

    where = {
        "data": {"path": f"file://{data}"},
        "tracking": {"storage_path": "runs"},
        "model": {"pretrained_path": "w.pt"},
    }
    cfg = resolve_defaults(load_config(None, where))
    assert (cfg.data.path, cfg.tracking.storage_path) == (str(data), str(tmp_path / "runs"))  # one run identity
    assert cfg.model.pretrained_path == str(tmp_path / "w.pt")  # workers run elsewhere: relative failed there
    cfg = resolve_defaults(load_config(None, {"data": {"path": "s3://bucket/data/"}}))
    assert cfg.data.path == "s3://bucket/data"

    for call, field in [
        (lambda: write_synthetic_cxr_lt("s3://bucket/synth", SynthOptions(num_images=40), progress=None), "out"),
        (lambda: prepare_dataset(PrepareOptions("cxr-lt-2023", "gs://bucket/src"), tmp_path / "d2", **QUIET), "source"),
        (lambda: prepare_dataset(PrepareOptions("cxr-lt-2023", str(src)), "s3://bucket/d2", **QUIET), "out"),
        (lambda: predict(PredictOptions(["runs:/0/model"], "s3://bucket/sub.csv", data=str(data))), "out"),
        (lambda: predict(PredictOptions(["runs:/0/model"], "sub.csv", source="gs://bucket/src")), "source"),
        (
            lambda: resolve_defaults(load_config(None, {"model": {"pretrained_path": "s3://b/w.pt"}})),
            "model.pretrained_path",
        ),
    ]:
        with pytest.raises(UserError, match="must be a local or mounted path, not a URI") as err:
            call()
        assert err.value.field == field
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "data", "src"]


def test_a_file_where_a_folder_goes_is_refused_naming_the_flag(tmp_path):
    """`ralflow synth --out FILE` and `ralflow run --workdir FILE` ended in a FileExistsError
    traceback; `train --data FILE` said it could not read FILE/manifest.json."""
    from components.pipeline import PipelineOptions, run_pipeline

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for call, field in [
        (lambda: write_synthetic_cxr_lt(a_file, SynthOptions(num_images=40), progress=None), "out"),
        (lambda: prepare_dataset(PrepareOptions("cxr-lt-2023", str(tmp_path)), a_file, **QUIET), "out"),
        (lambda: run_pipeline(PipelineOptions(workdir=str(a_file)), log=lambda *_: None), "workdir"),
    ]:
        with pytest.raises(UserError, match=f"^{field} {a_file} is a file, not a folder$") as err:
            call()
        assert err.value.field == field
    with pytest.raises(UserError, match=f"^{a_file}: no manifest.json"):
        Manifest.load(a_file)
    assert a_file.read_text() == "mine"
