"""Readers for the real dataset formats (``shared/specs/data.md``): CXR-LT 2023, CXR-LT 2024,
NIH ChestX-ray14 and CheXpert. Each returns one :class:`SourceTable` with every row's id,
patient, study, view, absolute image path, split, labels and mask in the label contract.

CSV problems (missing column, a row with too few or too many fields, a quote left open, a file
that is not UTF-8, non-numeric label, duplicate id, a path escaping the root) raise
:class:`UserError` naming the file, row (1-based line number) and column, before any image work.
The training labels file may carry another name (``labels_csv``, e.g. Kaggle's NIH sample).
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..paths import local_path
from .labels import CXR_LT_2024, LabelPolicy, label_set

FORMATS = ("cxr-lt-2023", "cxr-lt-2024", "nih", "chexpert")
SPLITS = ("train", "val", "test")


@dataclass
class SourceTable:
    label_names: tuple[str, ...]
    image_id: list[str] = field(default_factory=list)
    patient_id: list[str] = field(default_factory=list)
    study_id: list[str] = field(default_factory=list)
    view: list[str] = field(default_factory=list)
    path: list[str] = field(default_factory=list)  # absolute, inside the root
    rel_path: list[str] = field(default_factory=list)  # as written in the source
    split: list[str] = field(default_factory=list)
    origin: list[str] = field(default_factory=list)  # "file:line" for error reports
    labels: list[list[float]] = field(default_factory=list)
    mask: list[list[float]] = field(default_factory=list)

    def add(self, *, image_id, patient_id, study_id, view, path, rel_path, split, origin, labels, mask):
        self.image_id.append(image_id)
        self.patient_id.append(patient_id)
        self.study_id.append(study_id)
        self.view.append(view)
        self.path.append(path)
        self.rel_path.append(rel_path)
        self.split.append(split)
        self.origin.append(origin)
        self.labels.append(labels)
        self.mask.append(mask)

    def __len__(self) -> int:
        return len(self.image_id)

    def label_matrix(self) -> np.ndarray:
        return np.asarray(self.labels, dtype=np.float32).reshape(len(self), len(self.label_names))


# -- helpers ---------------------------------------------------------------------------------


def resolve_under(root: Path, rel: str, where: str) -> str:
    """Absolute path of ``rel`` under ``root``; a path that escapes the root is refused."""
    if not rel or not rel.strip():
        raise UserError(f"{where}: empty image path")
    rel = rel.strip()
    if os.path.isabs(rel):
        raise UserError(f"{where}: image path {rel!r} is absolute; paths must be relative to the dataset root {root}")
    full = os.path.normpath(os.path.join(root, rel))
    if os.path.commonpath([full, str(root)]) != str(root):
        raise UserError(f"{where}: image path {rel!r} escapes the dataset root {root}")
    return full


def read_csv(path: Path, required: list[str]) -> tuple[list[str], list[tuple[int, dict]]]:
    """Rows as (line number, dict); fails naming the file, line and column when the file does not
    have the shape of a CSV table (fields missing or extra, an unterminated quote, not UTF-8)."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    line = 1
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)
            try:
                header = [h.strip() for h in next(reader)]
            except StopIteration:
                raise UserError(f"{path}: empty file (no header line)") from None
            missing = [c for c in required if c not in header]
            if missing:
                raise UserError(f"{path}: missing column(s) {', '.join(repr(m) for m in missing)}")
            # Trailing commas (an empty last header field, as in NIH's Data_Entry_2017.csv) are
            # not data: a row may have them or not, but no other field may be missing or extra.
            width = len(header)
            while width and not header[width - 1]:
                width -= 1
            rows, line = [], reader.line_num
            for values in reader:
                start, line = line + 1, reader.line_num
                if not values or all(not v.strip() for v in values):
                    continue
                if any("\n" in v or "\r" in v for v in values):
                    raise UserError(f"{path}:{start}: a quoted field runs over several lines (a quote left open?)")
                while len(values) > width and not values[-1].strip():
                    values = values[:-1]
                if len(values) != width:
                    what = "a value is missing" if len(values) < width else "a value too many"
                    raise UserError(
                        f"{path}:{start}: {len(values)} field(s) where the header has {width} "
                        f"({what}; check commas and quotes)"
                    )
                rows.append((start, {h: v for h, v in zip(header, values) if h}))
    except csv.Error as exc:  # the row that starts after the last complete one
        raise UserError(f"{path}:{line + 1}: not a valid CSV row ({exc}; a quote left open?)") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); re-save it as UTF-8") from None
    return header, rows


def convert_labels(row: dict, names, policy: LabelPolicy, where: str) -> tuple[list[float], list[float]]:
    labels, mask = [], []
    for name in names:
        try:
            t, m = policy.convert(row.get(name, ""))
        except ValueError as exc:
            raise UserError(f"{where}, column {name!r}: {exc}") from None
        labels.append(t)
        mask.append(m)
    return labels, mask


def check_unique_ids(table: SourceTable, column: str) -> None:
    seen: dict[str, str] = {}
    for image_id, origin in zip(table.image_id, table.origin):
        if image_id in seen:
            raise UserError(f"{origin}, column {column!r}: duplicate id {image_id!r} (first seen at {seen[image_id]})")
        seen[image_id] = origin


def patient_split(patient: str, val_fraction: float, seed: int) -> str:
    """Deterministic patient-level split: the same patient always lands in the same split."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{patient}".encode()).digest()[:8], "big") / 2**64
    return "val" if h < val_fraction else "train"


# -- formats ---------------------------------------------------------------------------------

CXR_LT_META = (
    "dicom_id",
    "subject_id",
    "study_id",
    "ViewPosition",
    "path",
    "fpath",
    "ViewCodeSequence_CodeMeaning",
    "split",
)


def _read_cxr_lt(
    root: Path,
    files: list[tuple[str, str]],
    path_col: str,
    names,
    policy,
    labeled=True,
    table: SourceTable | None = None,
) -> SourceTable:
    for filename, split in files:
        path = root / filename
        if not path.is_file():
            continue
        required = ["dicom_id", "subject_id", "study_id", path_col] + (list(names) if labeled else [])
        _, rows = read_csv(path, required)
        for line, row in rows:
            where = f"{path}:{line}"
            if labeled:
                labels, mask = convert_labels(row, names, policy, where)
            else:  # test split: labels withheld -> everything masked
                labels, mask = [0.0] * len(names), [0.0] * len(names)
            table.add(
                image_id=row["dicom_id"].strip(),
                patient_id=row["subject_id"].strip(),
                study_id=row["study_id"].strip(),
                view=row.get("ViewPosition", "").strip(),
                path=resolve_under(root, row[path_col], f"{where}, column {path_col!r}"),
                rel_path=row[path_col].strip(),
                split=split,
                origin=where,
                labels=labels,
                mask=mask,
            )
    return table


def read_cxr_lt_2023(root: Path, policy: LabelPolicy, labels_csv: str | None = None, **_) -> SourceTable:
    names = label_set("cxr-lt-2023")
    train = labels_csv or "train.csv"
    if not (root / train).is_file():
        raise UserError(f"{root}: no {train} (expected the CXR-LT 2023 files train.csv, development.csv)")
    table = SourceTable(names)
    _read_cxr_lt(root, [(train, "train"), ("development.csv", "val")], "path", names, policy, table=table)
    _read_cxr_lt(root, [("test.csv", "test")], "path", names, policy, labeled=False, table=table)
    check_unique_ids(table, "dicom_id")
    return table


def read_cxr_lt_2024(root: Path, policy: LabelPolicy, labels_csv: str | None = None, **_) -> SourceTable:
    train = root / (labels_csv or "train_labeled.csv")
    if not train.is_file():
        raise UserError(f"{root}: no {train.name} (expected the CXR-LT 2024 files)")
    header, _ = read_csv(train, ["dicom_id", "subject_id", "study_id", "fpath"])
    # Label columns are found by name: every non-metadata column, in the canonical order first.
    present = [h for h in header if h and h not in CXR_LT_META]
    names = tuple([n for n in CXR_LT_2024 if n in present] + [n for n in present if n not in CXR_LT_2024])
    table = SourceTable(names)
    _read_cxr_lt(
        root,
        [(str(train), "train"), ("development_labeled_task1.csv", "val")],
        "fpath",
        names,
        policy,
        table=table,
    )
    check_unique_ids(table, "dicom_id")
    return table


# The NIH labels file as NIH ships it, and as Kaggle's 5% sample names it.
NIH_LABEL_FILES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv", "sample_labels.csv")


def read_nih(
    root: Path, policy: LabelPolicy, val_fraction: float = 0.1, split_seed: int = 0, labels_csv: str | None = None, **_
) -> SourceTable:
    names = label_set("nih")
    found = [f for f in NIH_LABEL_FILES if (root / f).is_file()]
    entry = root / (labels_csv or (found[0] if found else NIH_LABEL_FILES[0]))
    if not entry.is_file():
        raise UserError(
            f"{entry}: file not found (expected one of {', '.join(NIH_LABEL_FILES)}, or name it with labels_csv)"
        )
    _, rows = read_csv(entry, ["Image Index", "Finding Labels", "Patient ID"])
    test_list = root / "test_list.txt"
    test_names = set(test_list.read_text().split()) if test_list.is_file() else set()
    index = _index_images(root)
    table = SourceTable(names)
    known = set(names) | {"No Finding"}
    for line, row in rows:
        where = f"{entry}:{line}"
        image = row["Image Index"].strip()
        findings = [f.strip() for f in row["Finding Labels"].split("|") if f.strip()]
        unknown = [f for f in findings if f not in known]
        if unknown or not findings:
            raise UserError(
                f"{where}, column 'Finding Labels': unknown finding(s) {unknown or findings!r}; "
                f"expected {' | '.join(sorted(known))}"
            )
        labels = [1.0 if n in findings else 0.0 for n in names]
        patient = row["Patient ID"].strip()
        split = "test" if image in test_names else patient_split(patient, val_fraction, split_seed)
        rel = index.get(image, image)
        table.add(
            image_id=image,
            patient_id=patient,
            study_id=row.get("Follow-up #", "").strip(),
            view=row.get("View Position", "").strip(),
            path=resolve_under(root, rel, f"{where}, column 'Image Index'"),
            rel_path=rel,
            split=split,
            origin=where,
            labels=labels,
            mask=[1.0] * len(names),
        )
    check_unique_ids(table, "Image Index")
    return table


def _index_images(root: Path) -> dict[str, str]:
    """File name -> path relative to root, for NIH's images_0XX/images/ (or flat images/) layout.
    Folders reached through links are followed, each real folder once (links may loop); images
    whose real path leaves the root are then rejected with that reason when prepared."""
    out, seen = {}, set()
    for dirpath, dirnames, files in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []  # reached again through a link: a loop, or a second way in
            continue
        seen.add(real)
        for f in files:
            if f.lower().endswith((".png", ".jpg", ".jpeg", ".dcm")):
                out.setdefault(f, os.path.relpath(os.path.join(dirpath, f), root))
    return out


CHEXPERT_FOLDERS = ("CheXpert-v1.0-small", "CheXpert-v1.0")


def read_chexpert(root: Path, policy: LabelPolicy, labels_csv: str | None = None, **_) -> SourceTable:
    names = label_set("chexpert")
    folder = next((root / d for d in CHEXPERT_FOLDERS if (root / d).is_dir()), None)
    kaggle = folder is None and (root / (labels_csv or "train.csv")).is_file()  # the Kaggle mirror: no top folder
    if kaggle:
        folder = root
    if folder is None:
        raise UserError(
            f"{root}: no CheXpert-v1.0-small/ or CheXpert-v1.0/ folder, nor train.csv "
            "(source is the folder that contains them)",
            field="source",
        )
    table = SourceTable(names)
    for filename, split in ((labels_csv or "train.csv", "train"), ("valid.csv", "val")):
        path = folder / filename
        if not path.is_file():
            if split == "train":
                raise UserError(f"{path}: file not found")
            continue
        _, rows = read_csv(path, ["Path", *names])
        for line, row in rows:
            where = f"{path}:{line}"
            labels, mask = convert_labels(row, names, policy, where)
            rel = row["Path"].strip()
            if kaggle and rel.split("/", 1)[0] in CHEXPERT_FOLDERS:  # paths keep the folder the mirror dropped
                rel = rel.split("/", 1)[1] if "/" in rel else rel
            parts = rel.split("/")
            patient = next((p for p in parts if p.startswith("patient")), "")
            study = next((p for p in parts if p.startswith("study")), "")
            view = row.get("AP/PA", "").strip() or row.get("Frontal/Lateral", "").strip()
            table.add(
                image_id=rel,
                patient_id=patient,
                study_id=f"{patient}/{study}",
                view=view,
                path=resolve_under(root, rel, f"{where}, column 'Path'"),
                rel_path=rel,
                split=split,
                origin=where,
                labels=labels,
                mask=mask,
            )
    check_unique_ids(table, "Path")
    return table


# Formats without a validation split of their own: it is drawn from the training patients (val_fraction).
DRAWN_VAL = ("nih",)
READERS = {"cxr-lt-2023": read_cxr_lt_2023, "cxr-lt-2024": read_cxr_lt_2024, "nih": read_nih, "chexpert": read_chexpert}


def read_source(fmt: str, source: str | Path, policy: LabelPolicy | None = None, **options) -> SourceTable:
    if fmt not in READERS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    root = local_path(source, "source").resolve()
    if not root.is_dir():
        raise UserError(f"source {source}: not a directory", field="source")
    table = READERS[fmt](root, policy or LabelPolicy(), **options)
    if not table.image_id:
        raise UserError(f"{root}: no rows found for format {fmt}")
    return table
