"""What the CXR-LT winners add, one at a time, on the synthetic CXR-LT stand-in at one budget:
RAL defaults, then each of EMA, re-sampling (repeat-factor, class-aware), the CSRA head, a cRT
stage, post-hoc logit adjustment, and a pretrained start; two seeds each.

    python bench/ablation.py [--num-images 3000] [--synth-size 128] [--image-size 64] [--epochs 8]
                             [--rows ral rfs rfs-csra ...]   (default: every row)

Every row trains with `ralflow train`'s library call (local mode: the driver trains, Ray Data
decodes) and reports the best epoch's validation mAP: macro, head, medium and tail, as the mean
over the seeds with the spread (half the difference between the two seeds). Rows:

- ``RAL alone``: RAL with its defaults, linear head, no EMA, no re-sampling (``--sampling none``;
  repeat-factor became the default after this ablation).
- ``+ EMA``, ``+ repeat-factor``, ``+ class-aware``, ``+ CSRA head``: that one setting changed.
- ``+ repeat-factor + CSRA head``: both (the question the CSRA row leaves: does it add to re-sampling?).
- ``+ cRT``: a second stage from the same seed's RAL-alone run (``--init-from RUN
  --train-head-only``: backbone frozen, head re-initialised, class-aware sampling) for
  ``--crt-epochs``.
- ``+ logit adjustment``: the RAL-alone runs themselves (it is post-hoc: the same seed trains
  the same model), whose validation outputs choose tau; the macro F1 at 0.5 column shows what it
  changes, since a shift per class leaves every class's AP as it is.
- ``pretrained start``: a model pretrained on a disjoint synthetic set (other images, seed 100),
  its classifier dropped as for another label set, loaded with ``model.pretrained_path`` and
  fine-tuned with RAL alone.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GROUPS = ("mAP", "mAP_head", "mAP_medium", "mAP_tail")
ROWS = {  # --rows key: the row's title in the table
    "ral": "RAL alone",
    "la": "+ logit adjustment",
    "ema": "+ EMA",
    "rfs": "+ repeat-factor",
    "cas": "+ class-aware",
    "csra": "+ CSRA head",
    "rfs-csra": "+ repeat-factor + CSRA head",
    "crt": "+ cRT (head only, class-aware)",
    "pretrained": "pretrained start (disjoint synthetic set)",
}
ONE_CHANGE = {  # key: the settings that row changes from RAL alone
    "ema": {"train": {"ema": True, "ema_decay": 0.998}},
    "rfs": {"data": {"sampling": "repeat-factor"}},
    "cas": {"data": {"sampling": "class-aware"}},
    "csra": {"model": {"head": "csra"}},
    "rfs-csra": {"data": {"sampling": "repeat-factor"}, "model": {"head": "csra"}},
}


def make_dataset(work: Path, name: str, num_images: int, synth_size: int, image_size: int, seed: int) -> Path:
    from components.data.prepare import PrepareOptions, prepare_dataset
    from components.data.synth import SynthOptions, write_synthetic_cxr_lt

    src, data = work / f"{name}-src", work / name
    if not (data / "manifest.json").exists():
        write_synthetic_cxr_lt(
            src, SynthOptions(num_images=num_images, image_size=synth_size, seed=seed), progress=None
        )
        prepare_dataset(PrepareOptions("cxr-lt-2023", str(src), image_size=image_size), data, log=lambda *_: None)
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=3000)
    p.add_argument("--synth-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--model", default="resnet10t")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--crt-epochs", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--workdir", default=None, help="keep everything here (default: a temporary folder)")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="the rows to train")
    a = p.parse_args()

    import mlflow
    import torch

    from components.config import load_config
    from components.runtime import init_ray
    from components.train.trainer import run_training

    t0 = time.perf_counter()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="ralflow-ablation-"))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    init_ray(None, log=lambda *_: None)
    data = make_dataset(work, "data", a.num_images, a.synth_size, a.image_size, seed=0)

    def train(name: str, seed: int, dataset: Path = data, epochs: int | None = None, **sections) -> dict:
        overrides = {
            "data": {"path": str(dataset), "sampling": "none"},
            "model": {"name": a.model, "head": "linear"},  # RAL alone: timm's classifier (csra is a row)
            "train": {"epochs": epochs or a.epochs, "seed": seed, "num_workers": 0, "batch_size": 32},
            "tracking": {"tracking_uri": uri, "storage_path": str(work / "runs"), "experiment": "ablation",
                         "run_name": f"{name}-seed{seed}"},
        }  # fmt: skip
        for section, values in sections.items():
            overrides.setdefault(section, {}).update(values)
        said = []
        t = time.perf_counter()
        out = run_training(load_config(None, overrides), log=said.append)
        f1 = [re.findall(r"macro F1 at 0.5: ([0-9.]+) -> ([0-9.]+)", line) for line in said]
        out["f1"] = next((tuple(map(float, m[0])) for m in f1 if m), None)
        print(f"  {name} seed {seed}: val mAP {out['best_val_mAP']:.4f} ({time.perf_counter() - t:.0f}s)", flush=True)
        return out

    rows: dict[str, list[dict]] = {key: [] for key in ROWS if key in a.rows}
    for seed in a.seeds:
        if rows.keys() & {"ral", "la", "crt"}:
            base = train("ral", seed, train={"logit_adjust": True})
            if "ral" in rows:
                rows["ral"].append({**base, "f1_shown": base["f1"][0] if base["f1"] else None})
            if "la" in rows:
                rows["la"].append({**base, "f1_shown": base["f1"][1] if base["f1"] else None})
        for key, sections in ONE_CHANGE.items():
            if key in rows:
                rows[key].append(train(key, seed, **sections))
        if "crt" in rows:
            crt = {"init_from": base["run_id"], "head_only": True}
            rows["crt"].append(train("crt", seed, epochs=a.crt_epochs, train=crt, data={"sampling": "class-aware"}))

    if "pretrained" in rows:  # a backbone trained on other images, its classifier dropped
        other = make_dataset(work, "pretrain-data", a.num_images, a.synth_size, a.image_size, seed=100)
        pre = train("pretrain", 0, dataset=other)
        mlflow.set_tracking_uri(uri)
        weights = mlflow.artifacts.download_artifacts(
            f"runs:/{pre['run_id']}/model/artifacts/weights.pt", dst_path=str(work)
        )
        state = torch.load(weights, map_location="cpu", weights_only=True)
        torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, work / "pretrained-backbone.pt")
        for seed in a.seeds:
            start = {"pretrained_path": str(work / "pretrained-backbone.pt")}
            rows["pretrained"].append(train("finetune", seed, model=start))

    from components.data.manifest import Manifest

    m = Manifest.load(data)
    print(
        f"\n{m.split('train').num_images} train / {m.split('val').num_images} validation images, {a.model} at "
        f"{a.image_size} px, {a.epochs} epochs (cRT: {a.crt_epochs} more), seeds {', '.join(map(str, a.seeds))}; "
        f"{time.perf_counter() - t0:.0f}s in all. Best-epoch validation mAP, mean ± spread over the seeds:\n"
    )
    print("| setting | macro mAP | head | medium | tail | macro F1 at 0.5 |")
    print("|---|---:|---:|---:|---:|---:|")
    for key, outs in rows.items():
        cells = []
        for g in GROUPS:
            v = np.array([o[f"best_val_{g}"] for o in outs], np.float64)
            cells.append(f"{v.mean():.4f} ± {(v.max() - v.min()) / 2:.4f}")
        f1 = [o.get("f1_shown") for o in outs]
        cells.append(f"{np.mean(f1):.4f}" if all(x is not None for x in f1) else "")
        print(f"| {ROWS[key]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
