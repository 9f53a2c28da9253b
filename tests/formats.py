"""Tiny datasets in the real on-disk formats of shared/specs/data.md, written by the tests."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from components.data.images import encode_dicom
from components.data.labels import CHEXPERT, CXR_LT_2023_COUNTS, CXR_LT_2024


def write_image(path: Path, size=(64, 80), value=120, fmt="JPEG", seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.random.default_rng(seed).random((size[1], size[0])) * 60 + value).astype(np.uint8)
    Image.fromarray(arr, mode="L").save(path, format=fmt)
    return path


dicom_bytes = encode_dicom  # the tests' DICOM files are written as ralflow writes them


def write_dicom(path: Path, pixels: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(dicom_bytes(pixels, **kw))
    return path


def film12(shape=(64, 80), seed=0) -> np.ndarray:
    """12-bit pixel values (0..4095) with structure: a gradient and noise."""
    h, w = shape
    grad = np.linspace(0, 3000, w)[None, :] + np.linspace(0, 1000, h)[:, None]
    return (grad + np.random.default_rng(seed).random(shape) * 95).astype(np.uint16)


def write_csv(path: Path, header, rows, trailing_comma=False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        if trailing_comma:
            f.write(",".join(header) + ",\n")
            w = csv.writer(f)
        else:
            w = csv.writer(f)
            w.writerow(header)
        w.writerows(rows)
    return path


def cxr_lt_2023(root: Path, n_train=6, n_dev=3, extra_meta=True, shuffle_labels=True, as_dicom=False) -> dict:
    """Label columns deliberately out of the canonical order: readers must go by name. ``as_dicom``:
    the images are 12-bit DICOM files (alternately MONOCHROME1 and 2) and the CSV points at them."""
    labels = list(CXR_LT_2023_COUNTS)
    order = labels[::-1] if shuffle_labels else labels
    meta = ["dicom_id", "subject_id", "study_id", "ViewPosition", "path"] + (
        ["ViewCodeSequence_CodeMeaning"] if extra_meta else []
    )
    truth = {}
    for fname, n, offset in (("train.csv", n_train, 0), ("development.csv", n_dev, 100)):
        rows = []
        for i in range(n):
            subj, study, dicom = 10000000 + offset + i // 2, 50000000 + offset + i, f"d{offset + i:04d}"
            rel = f"files/p{str(subj)[:2]}/p{subj}/s{study}/{dicom}.{'dcm' if as_dicom else 'jpg'}"
            if as_dicom:
                film = film12(seed=offset + i)
                inverted = i % 2 == 1
                write_dicom(root / rel, 4095 - film if inverted else film, photometric=f"MONOCHROME{2 - inverted}")
            else:
                write_image(root / rel, seed=offset + i)
            y = {name: int((i + k) % 5 == 0) for k, name in enumerate(labels)}
            truth[dicom] = [float(y[name]) for name in labels]
            rows.append(
                [dicom, subj, study, "PA", rel]
                + (["postero-anterior"] if extra_meta else [])
                + [y[name] for name in order]
            )
        write_csv(root / fname, meta + order, rows)
    return truth


def cxr_lt_2024(root: Path, n=4) -> None:
    header = ["dicom_id", "subject_id", "study_id", "ViewPosition", "fpath", *CXR_LT_2024]
    rows = []
    for i in range(n):
        rel = f"files/p10/p1000000{i}/s5000000{i}/e{i}.jpg"
        write_image(root / rel, seed=i)
        rows.append([f"e{i}", f"1000000{i}", f"5000000{i}", "AP", rel] + [int(k == i) for k in range(len(CXR_LT_2024))])
    write_csv(root / "train_labeled.csv", header, rows[:3])
    write_csv(root / "development_labeled_task1.csv", header, rows[3:])


def nih(root: Path) -> None:
    header = [
        "Image Index",
        "Finding Labels",
        "Follow-up #",
        "Patient ID",
        "Patient Age",
        "Patient Gender",
        "View Position",
        "OriginalImage[Width",
        "Height]",
        "OriginalImagePixelSpacing[x",
        "y]",
    ]
    entries = [
        ("00000001_000.png", "Cardiomegaly|Effusion", "1"),
        ("00000001_001.png", "No Finding", "1"),
        ("00000002_000.png", "Hernia", "2"),
        ("00000003_000.png", "Pleural_Thickening|Mass|Nodule", "3"),
    ]
    rows = []
    for k, (name, findings, pid) in enumerate(entries):
        folder = "images_001/images" if k < 2 else "images_002/images"
        write_image(root / folder / name, fmt="PNG", seed=k)
        rows.append([name, findings, "0", pid, "58", "M", "PA", "1024", "1024", "0.143", "0.143", ""])
    write_csv(root / "Data_Entry_2017.csv", header, rows, trailing_comma=True)
    (root / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n00000002_000.png\n")
    (root / "test_list.txt").write_text("00000003_000.png\n")


def chexpert(root: Path) -> None:
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT]
    folder = root / "CheXpert-v1.0-small"
    cells = {0: "1.0", 1: "-1.0", 2: "", 3: "0.0"}
    for fname, split, n in (("train.csv", "train", 4), ("valid.csv", "valid", 2)):
        rows = []
        for i in range(n):
            rel = f"CheXpert-v1.0-small/{split}/patient0000{i}/study1/view1_frontal.jpg"
            write_image(root / rel, seed=i)
            rows.append([rel, "Female", "68", "Frontal", "AP"] + [cells[(i + k) % 4] for k in range(len(CHEXPERT))])
        write_csv(folder / fname, header, rows)
