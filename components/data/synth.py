"""Synthetic stand-in for CXR-LT 2023, written in the real format (CSV columns, MIMIC-like folder
tree, JPEG files) so the real reader path is exercised end to end.

Images are chest-X-ray-like grayscale pictures (body outline, lung fields, mediastinum, spine,
noise, varying exposure). Each of the 26 findings adds a localized visual signature of its own
(position, shape, texture, strength), some weak enough to be hard; labels follow the CXR-LT 2023
training frequencies with realistic co-occurrence ("No Finding" only with "Support Devices").

Labels belong to a *study*, as in MIMIC-CXR: a study has 1-3 images that share its labels, a
frontal film (PA or AP), often a lateral, sometimes a second frontal, at MIMIC-like view
proportions (about 7 frontal to 3 lateral). Laterals are drawn as lateral views: one lung field,
the heart in front, the spine behind, each finding at its own depth and fainter.
Everything is a deterministic function of the seed.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import changed_options, setting
from ..errors import UserError
from ..paths import local_folder
from .labels import CXR_LT_2023_COUNTS, CXR_LT_2023_NUM_TRAIN

LABELS = tuple(CXR_LT_2023_COUNTS)
NO_FINDING = LABELS.index("No Finding")
SUPPORT_DEVICES = LABELS.index("Support Devices")
META_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition", "path")
LATERAL_VIEWS = ("LATERAL", "LL", "RL")  # ViewPosition values of side views in MIMIC-CXR
P_LATERAL, P_SECOND_FRONTAL = 0.55, 0.1  # per study: a lateral; another frontal

# Findings that tend to co-occur (a shared latent factor per group), as on real chest films.
CO_OCCURRENCE_GROUPS = (
    ("Cardiomegaly", "Edema", "Pleural Effusion", "Enlarged Cardiomediastinum"),
    ("Atelectasis", "Lung Opacity", "Consolidation", "Pneumonia", "Infiltration"),
    ("Mass", "Nodule", "Lung Lesion"),
    ("Pneumothorax", "Subcutaneous Emphysema", "Pneumomediastinum", "Fracture"),
    ("Calcification of the Aorta", "Tortuous Aorta", "Emphysema", "Fibrosis"),
)


@dataclass(frozen=True)
class SynthOptions:
    num_images: int = setting(2000, help="images to write")
    image_size: int = setting(256, help="image side in pixels")
    seed: int = setting(0, help="random seed (the dataset is deterministic given it)")
    label_noise: float = setting(0.02, help="rate of missed (and spurious) labels in the CSV")
    val_fraction: float = setting(0.2, help="patients in development.csv")
    jpeg_quality: int = setting(90, help="JPEG quality")
    workers: int = setting(0, help="processes (0 = all CPUs)")


def draw_labels(n: int, rng: np.random.Generator, label_noise: float) -> tuple[np.ndarray, np.ndarray]:
    """(clean, noisy) 0/1 label matrices (n, 26) at the CXR-LT 2023 training frequencies."""
    prev = np.array([CXR_LT_2023_COUNTS[k] for k in LABELS]) / CXR_LT_2023_NUM_TRAIN
    p_nf = prev[NO_FINDING]
    # Among abnormal images the other findings are more frequent by 1 / (1 - p_nf).
    p_abn = np.clip(prev / (1 - p_nf), 1e-4, 0.95)
    z = rng.standard_normal((n, len(LABELS)))
    for group in CO_OCCURRENCE_GROUPS:
        idx = [LABELS.index(g) for g in group]
        shared = rng.standard_normal((n, 1))
        z[:, idx] = 0.6 * shared + 0.8 * z[:, idx]  # unit variance, correlation 0.36
    from statistics import NormalDist

    thresholds = np.array([NormalDist().inv_cdf(1 - p) for p in p_abn])
    y = (z > thresholds).astype(np.float32)
    normal = rng.random(n) < p_nf
    y[normal] = 0
    # Support devices appear on normal films too.
    y[normal, SUPPORT_DEVICES] = (rng.random(normal.sum()) < prev[SUPPORT_DEVICES]).astype(np.float32)
    y[:, NO_FINDING] = normal.astype(np.float32)
    # An abnormal image with nothing drawn gets its single most likely finding.
    empty = ~normal & (np.delete(y, [NO_FINDING, SUPPORT_DEVICES], axis=1).sum(1) == 0)
    cand = np.array([i for i in range(len(LABELS)) if i not in (NO_FINDING, SUPPORT_DEVICES)])
    pick = cand[np.argmax(z[empty][:, cand] - thresholds[cand], axis=1)]
    y[np.flatnonzero(empty), pick] = 1
    noisy = y.copy()
    if label_noise > 0:
        drop = (rng.random(y.shape) < label_noise) & (y == 1)  # missed findings
        add = (rng.random(y.shape) < label_noise * prev) & (y == 0) & ~normal[:, None]  # spurious ones
        noisy[drop] = 0
        noisy[add] = 1
        noisy[:, NO_FINDING] = y[:, NO_FINDING]  # keep the "No Finding" contract intact
    return y, noisy


class ChestRenderer:
    """Draws one synthetic chest film; finding signatures are fixed per class."""

    def __init__(self, size: int, seed: int = 12345) -> None:
        self.size = size
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        self.xx, self.yy = xx, yy
        g = np.random.default_rng(seed)
        # per-class signature: centre (inside a lung field or the mediastinum), radius, kind, strength
        self.sig = []
        for c in range(len(LABELS)):
            side = g.choice([0.33, 0.67])
            cx, cy = side + g.uniform(-0.08, 0.08), g.uniform(0.3, 0.75)
            kind = c % 4  # 0 blob, 1 ring, 2 stripes, 3 speckle
            strength = g.uniform(0.10, 0.35)
            radius = g.uniform(0.05, 0.12)
            self.sig.append((cx, cy, radius, kind, strength, g.uniform(20, 40)))

    def render(self, labels: np.ndarray, rng: np.random.Generator, lateral: bool = False) -> np.ndarray:
        if lateral:
            return self.render_lateral(labels, rng)
        xx, yy = self.xx, self.yy
        jx, jy = rng.normal(0, 0.015, 2)
        body = np.exp(-((((xx - 0.5 - jx) / 0.42) ** 2 + ((yy - 0.55 - jy) / 0.55) ** 2) ** 3))
        img = 0.15 + 0.55 * body
        heart_w = 0.11 * (1.5 if labels[LABELS.index("Cardiomegaly")] else 1.0)
        for side in (0.32, 0.68):  # lung fields (dark)
            lung = np.exp(-((((xx - side - jx) / 0.13) ** 2 + ((yy - 0.5 - jy) / 0.27) ** 2) ** 2))
            img -= 0.35 * lung
        img += 0.25 * np.exp(-(((xx - 0.5 - jx) / 0.05) ** 2))  # spine / mediastinum
        img += 0.2 * np.exp(-((((xx - 0.53 - jx) / heart_w) ** 2 + ((yy - 0.68 - jy) / 0.12) ** 2) ** 2))  # heart
        for c in np.flatnonzero(labels):
            if c in (NO_FINDING, LABELS.index("Cardiomegaly")):
                continue
            cx, cy, r, kind, strength, freq = self.sig[c]
            img += strength * self._patch(cx + jx, cy + jy, r, kind, freq, rng)
        return self._expose(img, rng)

    def render_lateral(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The side view: one lung field, heart in front (left), spine behind (right); each finding
        at a fixed depth of its own, at the same height as on the frontal film, and fainter."""
        xx, yy = self.xx, self.yy
        jx, jy = rng.normal(0, 0.015, 2)
        body = np.exp(-((((xx - 0.5 - jx) / 0.32) ** 2 + ((yy - 0.55 - jy) / 0.55) ** 2) ** 3))
        img = 0.15 + 0.55 * body
        img -= 0.4 * np.exp(-((((xx - 0.52 - jx) / 0.17) ** 2 + ((yy - 0.48 - jy) / 0.27) ** 2) ** 2))  # lungs
        img += 0.3 * np.exp(-(((xx - 0.76 - jx) / 0.045) ** 2)) * (yy > 0.2)  # spine, behind
        heart_r = 0.12 * (1.4 if labels[LABELS.index("Cardiomegaly")] else 1.0)
        img += 0.22 * np.exp(-((((xx - 0.36 - jx) / heart_r) ** 2 + ((yy - 0.66 - jy) / 0.12) ** 2) ** 2))
        for c in np.flatnonzero(labels):
            if c in (NO_FINDING, LABELS.index("Cardiomegaly")):
                continue
            _, cy, r, kind, strength, freq = self.sig[c]
            depth = 0.34 + 0.36 * ((c * 0.6180339) % 1.0)  # front (0.34) to back (0.70)
            img += 0.7 * strength * self._patch(depth + jx, cy + jy, r, kind, freq, rng)
        return self._expose(img, rng)

    def _patch(self, cx, cy, r, kind, freq, rng) -> np.ndarray:
        xx, yy = self.xx, self.yy
        cx, cy = cx + rng.normal(0, 0.02), cy + rng.normal(0, 0.02)
        r = r * rng.uniform(0.8, 1.25)
        d2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / r**2
        if kind == 0:
            return np.exp(-d2)
        if kind == 1:
            return np.exp(-((np.sqrt(d2) - 0.8) ** 2) / 0.05)
        if kind == 2:
            return np.exp(-d2) * (0.5 + 0.5 * np.sin(freq * (xx + yy)))
        return np.exp(-d2) * (rng.random(xx.shape) > 0.7)

    @staticmethod
    def _expose(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        exposure = rng.uniform(0.8, 1.2)
        gamma = rng.uniform(0.85, 1.15)
        img = np.clip(img * exposure, 0, 1) ** gamma
        img += rng.normal(0, 0.03, img.shape)
        return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _render_chunk(args) -> None:
    size, quality, seed, items = args
    renderer = ChestRenderer(size)
    for index, path, labels, view in items:
        rng = np.random.default_rng([seed, index])
        arr = renderer.render(labels, rng, lateral=view in LATERAL_VIEWS)
        buf = io.BytesIO()
        Image.fromarray(arr, mode="L").save(buf, format="JPEG", quality=quality)
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)


# Left in a folder synth wrote: a later synth may write there again; any other folder it refuses.
SYNTH_MARKER = ".ralflow-synth.json"


def check_synth_folder(out: Path, opts: SynthOptions | None = None) -> None:
    """A folder with other files is not written into: synth's train.csv and development.csv are
    the names of the real CXR-LT 2023 label files, which it would replace. With ``opts``, data
    synth wrote there may be reused only for the same options (``workers`` aside: how fast, not
    what): a re-run asking for other sizes must not get the old images silently."""
    if not out.is_dir():
        return
    try:
        before = json.loads((out / SYNTH_MARKER).read_text())
    except FileNotFoundError:
        held = sorted((p.name for p in out.iterdir()), key=lambda n: (n.startswith("."), n))  # hidden ones last
        if held:
            raise UserError(
                f"out {out} is not empty and was not written by synth (it holds {', '.join(held[:3])}"
                f"{', ...' if len(held) > 3 else ''}); synth writes train.csv, development.csv and files/ there: "
                "use a new or empty folder",
                field="out",
            ) from None
        return
    except (OSError, ValueError):
        before = {}  # unreadable: its options are unknown, so nothing matches them
    if opts is None:
        return
    wanted = {k: v for k, v in dataclasses.asdict(opts).items() if k != "workers"}
    if diff := changed_options(before, wanted):
        raise UserError(
            f"{out} holds synthetic data written with other options {diff} (old, new); "
            "use another folder, or the options it was written with",
            field="out",  # the folder is what to change; `ralflow run` names its sizes otherwise
        )


def write_synthetic_cxr_lt(out: str | Path, opts: SynthOptions, progress=print) -> dict:
    """Write ``train.csv``, ``development.csv`` and JPEGs under ``out``; return a summary."""
    if opts.num_images < 10:
        raise UserError(f"num_images must be >= 10, got {opts.num_images}", field="num_images")
    if not 32 <= opts.image_size <= 2048:
        raise UserError(f"image_size must be in [32, 2048], got {opts.image_size}", field="image_size")
    if not 0 <= opts.label_noise < 0.5:
        raise ValueError(f"label noise must be in [0, 0.5), got {opts.label_noise}")
    out = local_folder(out, "out")
    check_synth_folder(out)
    out.mkdir(parents=True, exist_ok=True)  # marked first: a synth cut short may write here again
    (out / SYNTH_MARKER).write_text(json.dumps(dataclasses.asdict(opts)) + "\n")
    rng = np.random.default_rng(opts.seed)
    n = opts.num_images
    clean, noisy = draw_labels(n, rng, opts.label_noise)  # one row per study (at most n studies)
    # Patients with 1-4 studies; studies with 1-3 images (views) that share the study's labels.
    subjects, studies, views, study_index = [], [], [], []
    subject = 10_000_000 + int(rng.integers(0, 1_000_000))
    k = 0
    while len(subjects) < n:
        subject += int(rng.integers(1, 50))
        study = 50_000_000 + int(rng.integers(0, 40_000_000))
        for j in range(int(rng.integers(1, 5))):
            study_views = [str(rng.choice(["PA", "AP"], p=[0.45, 0.55]))]
            if rng.random() < P_LATERAL:
                study_views.append("LATERAL")
            if rng.random() < P_SECOND_FRONTAL:
                study_views.append("AP")
            for view in study_views:
                subjects.append(subject)
                studies.append(study + j)
                views.append(view)
                study_index.append(k)
            k += 1
    subjects, studies, views, study_index = subjects[:n], studies[:n], views[:n], study_index[:n]
    uniq = sorted(set(subjects))
    val_patients = set(np.array(uniq)[rng.random(len(uniq)) < opts.val_fraction].tolist())
    rows = {"train": [], "development": []}
    items = []
    for i in range(n):
        dicom = f"{rng.integers(0, 16**8):08x}-{rng.integers(0, 16**8):08x}-{rng.integers(0, 16**8):08x}-{i:06d}"
        rel = f"files/p{str(subjects[i])[:2]}/p{subjects[i]}/s{studies[i]}/{dicom}.jpg"
        split = "development" if subjects[i] in val_patients else "train"
        s = study_index[i]
        rows[split].append([dicom, subjects[i], studies[i], views[i], rel, *noisy[s].astype(int).tolist()])
        items.append((i, str(out / rel), clean[s], views[i]))  # the picture shows the truth; the CSV is noisy
    for _, p, _, _ in items:
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    workers = opts.workers or os.cpu_count() or 1
    chunk = max(1, min(200, n // (workers * 4) or 1))
    chunks = [(opts.image_size, opts.jpeg_quality, opts.seed, items[i : i + chunk]) for i in range(0, n, chunk)]
    done = 0
    if workers == 1:
        for c in chunks:
            _render_chunk(c)
            done += len(c[3])
    else:
        with ProcessPoolExecutor(workers) as pool:
            for c, _ in zip(chunks, pool.map(_render_chunk, chunks)):
                done += len(c[3])
                if progress and (done == n or done % max(chunk, n // 10) < chunk):
                    progress(f"synth: {done}/{n} images")
    header = [*META_COLUMNS, *LABELS]
    for split, split_rows in rows.items():
        tmp = out / f"{split}.csv.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(split_rows)
        os.replace(tmp, out / f"{split}.csv")
    prevalence = noisy[sorted(set(study_index))].mean(0)
    return {
        "studies": len(set(study_index)),
        "lateral_fraction": float(np.mean([v in LATERAL_VIEWS for v in views])),
        "train": len(rows["train"]),
        "development": len(rows["development"]),
        "labels_per_study": float(noisy[sorted(set(study_index))].sum(1).mean()),
        "prevalence": dict(zip(LABELS, prevalence.round(4).tolist())),
    }
