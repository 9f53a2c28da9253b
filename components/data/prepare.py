"""Prepared dataset = Parquet shards of pre-resized JPEG bytes + labels + ``manifest.json``.

Shards are planned deterministically from the source table (per split, in source order,
``rows_per_shard`` rows each), written under a temporary name and renamed when complete, so a
re-run after an interruption skips finished shards and produces the same bytes. Unreadable
images are skipped and listed in ``rejects.csv`` (or fail the run with ``strict``).
``manifest.json`` is written last: its presence means the dataset is complete.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import changed_options, setting
from ..errors import UserError
from ..paths import local_folder, local_path
from .images import RESIZE_MODES, encode_jpeg, read_or_reason
from .labels import UNCERTAIN_POLICIES, LabelPolicy, frequency_groups
from .manifest import (
    MANIFEST,
    Manifest,
    ShardInfo,
    SplitStats,
    dataset_checksum,
    read_json_object,
    write_text_atomically,
)
from .readers import DRAWN_VAL, FORMATS, SourceTable, read_source

STATE = ".prepare-options.json"
REJECTS = "rejects.csv"


@dataclass(frozen=True)
class PrepareOptions:
    format: str = setting(choices=FORMATS, help="source dataset format")
    source: str = setting(help="dataset root holding its CSV files and images")
    image_size: int = setting(512, help="stored image side in pixels")
    resize: str = setting("pad", choices=RESIZE_MODES, help="keep aspect: pad to square, or center-crop")
    jpeg_quality: int = setting(90, help="JPEG quality of the stored images")
    rows_per_shard: int = setting(1024, help="images per Parquet shard")
    row_group_size: int = setting(256, help="images per Parquet row group (one Ray Data task)")
    uncertain: str = setting("zeros", choices=UNCERTAIN_POLICIES, help="CheXpert -1 policy")
    blank: str = setting("zeros", choices=UNCERTAIN_POLICIES, help="CheXpert blank policy")
    val_fraction: float = setting(0.1, help="patient-level validation split where the format has none")
    split_seed: int = setting(0, help="seed of that split")
    head_threshold: float = setting(0.10, help="head class: >= this training frequency")
    tail_threshold: float = setting(0.01, help="tail class: < this training frequency")
    strict: bool = setting(False, help="fail on the first unreadable image instead of rejecting it")
    labels_csv: str | None = setting(None, help="the labels CSV under another name (e.g. Kaggle's sample_labels.csv)")

    def shard_options(self) -> dict:
        """The options that shape the shards (``strict`` only decides whether rejects fail the run):
        a dataset resumes or is reused only with the same ones. The source as one absolute path
        ("dir/", "./dir" and "file:///…/dir" are the same source)."""
        options = {k: v for k, v in dataclasses.asdict(self).items() if k != "strict"}
        return {**options, "source": str(local_path(self.source, "source").resolve())}

    def validate(self) -> None:
        checks = [
            (self.format in FORMATS, "format", f"one of {', '.join(FORMATS)}"),
            (32 <= self.image_size <= 4096, "image_size", "32..4096"),
            (self.resize in RESIZE_MODES, "resize", " | ".join(RESIZE_MODES)),
            (1 <= self.jpeg_quality <= 100, "jpeg_quality", "1..100"),
            (self.rows_per_shard >= 1, "rows_per_shard", ">= 1"),
            (self.row_group_size >= 1, "row_group_size", ">= 1"),
            (self.uncertain in UNCERTAIN_POLICIES, "uncertain", " | ".join(UNCERTAIN_POLICIES)),
            (self.blank in UNCERTAIN_POLICIES, "blank", " | ".join(UNCERTAIN_POLICIES)),
            (0 <= self.val_fraction < 1, "val_fraction", "0 <= f < 1"),
            (
                0 < self.tail_threshold <= self.head_threshold < 1,
                "tail_threshold",
                "0 < tail_threshold <= head_threshold < 1",
            ),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise UserError(f"{name}={getattr(self, name)!r} is invalid; allowed: {allowed}", field=name)


def shard_schema(num_classes: int) -> pa.Schema:
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("patient_id", pa.string()),
            ("study_id", pa.string()),
            ("view", pa.string()),
            ("split", pa.string()),
            ("source_path", pa.string()),
            ("image", pa.binary()),
            ("labels", pa.list_(pa.float32(), num_classes)),
            ("mask", pa.list_(pa.float32(), num_classes)),
        ]
    )


def plan_shards(table: SourceTable, rows_per_shard: int) -> list[dict]:
    """Deterministic shard plan: each entry names the shard and carries its rows' fields."""
    plan = []
    for split in ("train", "val", "test"):
        idx = [i for i, s in enumerate(table.split) if s == split]
        for k, start in enumerate(range(0, len(idx), rows_per_shard)):
            rows = idx[start : start + rows_per_shard]
            plan.append(
                {
                    "name": f"{split}-{k:05d}.parquet",
                    "split": split,
                    "rows": [
                        {
                            "image_id": table.image_id[i],
                            "patient_id": table.patient_id[i],
                            "study_id": table.study_id[i],
                            "view": table.view[i],
                            "path": table.path[i],
                            "source_path": table.rel_path[i],
                            "origin": table.origin[i],
                            "labels": table.labels[i],
                            "mask": table.mask[i],
                        }
                        for i in rows
                    ],
                }
            )
    return plan


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# What a shard stores of each planned row besides its image: a shard is current only while these
# are what the source says now (a label corrected in the CSV, a row added or removed).
ROW_FIELDS = ("image_id", "patient_id", "study_id", "view", "source_path", "labels", "mask")


def rows_fingerprint(rows: list[dict]) -> str:
    values = [[row[k] for k in ROW_FIELDS] for row in rows]
    return hashlib.sha256(json.dumps(values, default=lambda v: v.tolist()).encode()).hexdigest()


def shard_record(out_dir: Path, name: str) -> Path:
    """Beside each shard: its rejects, upscaled count and rows' fingerprint, written after it."""
    return out_dir / f".{name}.rejects.json"


def finished_shard(out_dir: Path, shard: dict) -> dict | None:
    """The record of a shard written before from the same planned rows, or None: not written,
    cut short, or written from another version of the source (then it is written again)."""
    final, record = out_dir / shard["name"], shard_record(out_dir, shard["name"])
    if not (final.exists() and record.exists()):  # both renamed into place => complete
        return None
    done = read_json_object(record)
    if done is None or done.get("rows_sha256") != rows_fingerprint(shard["rows"]):
        return None
    return done


def remove_unplanned_shards(out: Path, planned: set[str], log=print) -> None:
    """Shards an earlier version of the source needed and this one does not (rows removed): not
    in the manifest, so never read, but a copy of the folder would carry them along."""
    ours = re.compile(r"(train|val|test)-\d{5}\.parquet")  # plan_shards' names
    extra = sorted(p for p in out.glob("*.parquet") if ours.fullmatch(p.name) and p.name not in planned)
    for path in extra:
        path.unlink()
        shard_record(out, path.name).unlink(missing_ok=True)
    if extra:
        log(f"prepare: removed {len(extra)} shard(s) the source no longer fills: {', '.join(p.name for p in extra)}")


def write_shard(shard: dict, out: str, opts: PrepareOptions, num_classes: int) -> dict:
    """Process one planned shard (skipped if already complete); returns its summary."""
    out_dir = Path(out)
    final = out_dir / shard["name"]
    if (done := finished_shard(out_dir, shard)) is not None:
        rows = pq.ParquetFile(final).metadata.num_rows
        return {"name": shard["name"], "split": shard["split"], "skipped": True, "rows": rows,
                "rejects": done["rejects"], "upscaled": done["upscaled"]}  # fmt: skip
    cols = {k: [] for k in shard_schema(num_classes).names}
    rejects, upscaled = [], 0
    root = os.path.realpath(opts.source)
    for row in shard["rows"]:
        im, reason = read_or_reason(row["path"], opts.image_size, opts.resize, root)
        if im is None:
            rejects.append(
                {"origin": row["origin"], "image_id": row["image_id"], "path": row["source_path"], "reason": reason}
            )
            continue
        upscaled += im.info.get("upscaled", False)
        for k in ("image_id", "patient_id", "study_id", "view", "source_path", "labels", "mask"):
            cols[k].append(row[k])
        cols["split"].append(shard["split"])
        cols["image"].append(encode_jpeg(im, opts.jpeg_quality))
    tbl = pa.table(cols, schema=shard_schema(num_classes))
    tmp = out_dir / f".{shard['name']}.tmp"
    pq.write_table(tbl, tmp, row_group_size=opts.row_group_size, compression="zstd")
    os.replace(tmp, final)
    record = {"rejects": rejects, "upscaled": upscaled, "rows_sha256": rows_fingerprint(shard["rows"])}
    write_text_atomically(shard_record(out_dir, shard["name"]), json.dumps(record))
    return {
        "name": shard["name"],
        "split": shard["split"],
        "skipped": False,
        "rows": tbl.num_rows,
        "rejects": rejects,
        "upscaled": upscaled,
    }


def check_output_folder(out: Path, opts: PrepareOptions) -> None:
    """Before anything is read or written: ``out`` must be new, empty, or a dataset (finished or
    not) prepared from the same options. Nothing in it is touched when it is not."""
    if not out.exists():
        return
    previous = read_json_object(out / STATE) or (read_json_object(out / MANIFEST) or {}).get("options")
    if not previous:  # no options file, and no manifest of a dataset written before it existed
        if any(out.iterdir()):
            raise UserError(
                f"out {out} is not empty and holds no ralflow dataset; use a new or empty folder", field="out"
            )
        return
    previous["source"] = str(Path(previous.get("source", "")).expanduser().resolve())
    if diff := changed_options(previous, opts.shard_options()):
        raise UserError(
            f"out {out} holds a dataset prepared with other options {diff} (old, new); use another folder", field="out"
        )


def check_splits(table: SourceTable, opts: PrepareOptions) -> None:
    """Training needs training and validation images: refuse before writing any shard."""
    if "train" not in table.split:
        raise UserError(f"source {opts.source}: no training rows (is the training CSV empty?)", field="source")
    if "val" not in table.split:
        if opts.val_fraction == 0:
            why = "val_fraction is 0"
        elif opts.format in DRAWN_VAL:
            patients = len({p for p, s in zip(table.patient_id, table.split) if s == "train"})
            why = f"none of the {patients} training patients fell in the {opts.val_fraction:g} drawn for it: raise it"
        else:
            why = "the source has no validation rows: is its validation CSV missing or empty?"
        raise UserError(f"val_fraction: no validation images ({why}); training needs some", field="val_fraction")


def build_manifest(table: SourceTable, opts: PrepareOptions, results: list[dict], out: Path) -> Manifest:
    names = list(table.label_names)
    rejected = {r["image_id"] for res in results for r in res["rejects"]}
    labels = table.label_matrix()
    mask = np.asarray(table.mask, dtype=np.float32).reshape(labels.shape)
    kept = np.array([i not in rejected for i in table.image_id])
    splits = {}
    for split in ("train", "val", "test"):
        sel = kept & (np.array(table.split) == split)
        if sel.any():
            splits[split] = SplitStats(
                num_images=int(sel.sum()),
                num_patients=len({p for p, s in zip(table.patient_id, sel) if s}),
                class_counts=dict(zip(names, (labels[sel] * mask[sel]).sum(0).astype(int).tolist())),
                labeled_counts=dict(zip(names, mask[sel].sum(0).astype(int).tolist())),
            )
    if "train" not in splits:
        raise UserError(f"{opts.source}: no usable training images (all rejected or no train split)")
    train = splits["train"]
    groups = frequency_groups(
        [train.class_counts[n] for n in names], train.num_images, opts.head_threshold, opts.tail_threshold
    )
    shards = [
        ShardInfo(path=res["name"], split=res["split"], num_rows=res["rows"], sha256=sha256_file(out / res["name"]))
        for res in sorted(results, key=lambda r: r["name"])
    ]
    dataset_sha = dataset_checksum(names, [s.sha256 for s in shards])
    return Manifest(
        dataset_sha256=dataset_sha,
        label_names=names,
        groups=dict(zip(names, groups)),
        image_size=opts.image_size,
        splits=splits,
        shards=shards,
        num_rejects=len(rejected),
        source={"format": opts.format, "root": str(Path(opts.source).resolve())},
        options=dataclasses.asdict(opts),
        created_unix=int(time.time()),
        root=str(out),
    )


def prepare_dataset(opts: PrepareOptions, out: str | Path, map_shards: Callable | None = None, log=print) -> Manifest:
    """Read the source, write the shards (``map_shards(fn, shards)`` runs them in parallel;
    default: in this process), then ``rejects.csv`` and ``manifest.json``. Returns the manifest."""
    opts = dataclasses.replace(opts, source=opts.shard_options()["source"])
    opts.validate()
    out = local_folder(
        out,
        "out",
        "; prepare a local or mounted folder, then copy it there: training and prediction read --data from a URI",
    )
    check_output_folder(out, opts)
    policy = LabelPolicy(opts.uncertain, opts.blank)
    table = read_source(
        opts.format,
        opts.source,
        policy,
        val_fraction=opts.val_fraction,
        split_seed=opts.split_seed,
        labels_csv=opts.labels_csv,
    )
    counts = {s: table.split.count(s) for s in ("train", "val", "test") if s in table.split}
    log(f"prepare: read {len(table)} rows from {opts.format} source {opts.source} {counts}")
    check_splits(table, opts)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / STATE).is_file():
        write_text_atomically(out / STATE, json.dumps(opts.shard_options()))
    (out / MANIFEST).unlink(missing_ok=True)  # incomplete until rewritten at the end
    plan = plan_shards(table, opts.rows_per_shard)
    done = sum(finished_shard(out, s) is not None for s in plan)
    stale = sum((out / s["name"]).exists() for s in plan) - done
    log(
        f"prepare: {len(plan)} shard(s) of <= {opts.rows_per_shard} rows, {done} already complete"
        + (f", {stale} written again (the source's rows or labels changed since)" if stale else "")
    )
    n_cls = len(table.label_names)
    if map_shards is None:
        results = [write_shard(s, str(out), opts, n_cls) for s in plan]
    else:
        results = map_shards(lambda s: write_shard(s, str(out), opts, n_cls), plan)
    remove_unplanned_shards(out, {s["name"] for s in plan}, log)
    rejects = [r for res in sorted(results, key=lambda r: r["name"]) for r in res["rejects"]]
    if rejects and opts.strict:
        r = rejects[0]
        raise UserError(
            f"{r['origin']}: image {r['path']!r}: {r['reason']} "
            f"(strict: {len(rejects)} unreadable image(s); no manifest written)"
        )
    if rejects:
        tmp = out / f".{REJECTS}.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["origin", "image_id", "path", "reason"])
            w.writeheader()
            w.writerows(rejects)
        os.replace(tmp, out / REJECTS)
    else:
        (out / REJECTS).unlink(missing_ok=True)
    manifest = build_manifest(table, opts, results, out)
    manifest.write(out)
    if upscaled := sum(r["upscaled"] for r in results):
        log(
            f"prepare: warning: {upscaled} image(s) were smaller than image_size {opts.image_size} px and were enlarged"
        )
    written = sum(not r["skipped"] for r in results)
    log(
        f"prepare: wrote {written} shard(s), skipped {len(results) - written} complete; "
        f"{sum(s.num_images for s in manifest.splits.values())} images kept, {len(rejects)} rejected"
        + (f" (see {out / REJECTS})" if rejects else "")
    )
    return manifest
