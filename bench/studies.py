"""Study-level prediction on the multi-view synthetic set, from one command: validation mAP of
image-level scoring vs study aggregation (view-mean, mean, max), without and with TTA
(hflip), for each of two models and their 2-model ensemble.

    python bench/studies.py [--num-images 3000] [--synth-size 128] [--image-size 96] [--epochs 6]

It writes a synthetic CXR-LT stand-in with multi-view studies, prepares it, trains two models
(seeds 0 and 1, RAL defaults, `ralflow train`'s library call) and scores the validation split with
`ralflow predict`'s library call once per (models, TTA) setting; every aggregation is then
applied to those same image probabilities with `components.studies.aggregate`, the function
`predict --aggregate` uses.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def val_table(data: Path):
    """image id -> (study, view, labels, mask) of the prepared validation split."""
    import pyarrow.parquet as pq

    from components.data.manifest import Manifest

    manifest = Manifest.load(data)
    out = {}
    for path in manifest.shard_paths("val"):
        t = pq.read_table(path, columns=["image_id", "study_id", "view", "labels", "mask"]).to_pylist()
        out.update({r["image_id"]: (r["study_id"], r["view"], r["labels"], r["mask"]) for r in t})
    return out, manifest.group_list()


def read_probs(path: Path) -> dict:
    with open(path) as f:
        rows = list(csv.reader(f))[1:]
    return {r[0]: np.array([float(v) for v in r[1:]]) for r in rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=3000)
    p.add_argument("--synth-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--model", default="resnet10t")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--workdir", default=None, help="keep everything here (default: a temporary folder)")
    a = p.parse_args()

    from components.config import load_config
    from components.data.prepare import PrepareOptions, prepare_dataset
    from components.data.synth import SynthOptions, write_synthetic_cxr_lt
    from components.metrics import multilabel_metrics
    from components.predict import PredictOptions, predict
    from components.runtime import init_ray
    from components.studies import aggregate
    from components.train.trainer import run_training

    t0 = time.perf_counter()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="ralflow-studies-"))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    quiet = lambda *args, **kw: None  # noqa: E731
    summary = write_synthetic_cxr_lt(
        work / "src", SynthOptions(num_images=a.num_images, image_size=a.synth_size, seed=0), progress=None
    )
    init_ray(None, log=quiet)
    prepare_dataset(PrepareOptions("cxr-lt-2023", str(work / "src"), image_size=a.image_size), work / "data", log=quiet)
    runs = []
    for seed in (0, 1):
        cfg = load_config(
            None,
            {
                "data": {"path": str(work / "data")},
                "model": {"name": a.model},
                "train": {"epochs": a.epochs, "seed": seed, "num_workers": 1, "cpus_per_worker": 1},
                "tracking": {"tracking_uri": uri, "storage_path": str(work / "runs"), "experiment": "studies"},
            },
        )
        out = run_training(cfg, log=quiet)
        runs.append(out["run_id"])
        took = time.perf_counter() - t0
        print(f"trained model {seed + 1}: val mAP {out['best_val_mAP']:.4f} ({took:.0f}s)", flush=True)

    table, groups = val_table(work / "data")
    models = {"model 1": runs[:1], "model 2": runs[1:], "ensemble 1+2": runs}
    results = {}
    for name, ids in models.items():
        for tta in ("none", "hflip"):
            csv_out = work / f"{name.replace(' ', '-')}-{tta}.csv"
            predict(
                PredictOptions(
                    [f"runs:/{r}/model" for r in ids],
                    str(csv_out),
                    data=str(work / "data"),
                    split="val",
                    tracking_uri=uri,
                    tta=tta,
                ),  # fmt: skip
                log=quiet,
            )
            probs = read_probs(csv_out)
            keys = list(probs)
            p = np.stack([probs[k] for k in keys])
            studies = [table[k][0] for k in keys]
            views = [table[k][1] for k in keys]
            y = np.array([table[k][2] for k in keys], np.float32)
            m = np.array([table[k][3] for k in keys], np.float32)
            for how in ("none", "view-mean", "mean", "max"):
                results[(name, tta, how)] = multilabel_metrics(aggregate(p, studies, views, how), y, groups, mask=m)

    n_val = len(table)
    n_studies = len({v[0] for v in table.values()})
    print(
        f"\n{summary['train']} train / {n_val} validation images ({n_studies} validation studies, "
        f"{summary['lateral_fraction']:.0%} laterals), {a.model} at {a.image_size} px, {a.epochs} epochs, "
        f"{time.perf_counter() - t0:.0f}s in all. Validation mAP (tail mAP in brackets):\n"
    )
    print("| models | TTA | image-level | view-mean | mean | max |")
    print("|---|---|---:|---:|---:|---:|")
    for name in models:
        for tta in ("none", "hflip"):
            cells = [f"{results[(name, tta, h)]['mAP']:.4f} ({results[(name, tta, h)]['mAP_tail']:.4f})"
                     for h in ("none", "view-mean", "mean", "max")]  # fmt: skip
            print(f"| {name} | {tta} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
