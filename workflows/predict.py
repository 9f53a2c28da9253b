"""Batch prediction with Ray Data: a pool of actors holding the model (`models:/<name>@champion`
or any MLflow model URI) scores a prepared dataset, or a CXR-LT-format CSV + image root, and
writes the CXR-LT submission CSV (dicom_id + one probability column per class, in label order).
When labels are present the metrics are printed and logged. Unreadable images are reported in
<out>.rejects.csv, not fatal."""
from __future__ import annotations

import sys

from workflows.common import main_for

DESCRIPTION = "Batch inference with Ray Data using a registered model; writes the CXR-LT submission CSV."


def add_arguments(parser) -> None:
    parser.add_argument("--model-uri", required=True, help="e.g. models:/ralflow-cxr@champion or runs:/<id>/model")
    parser.add_argument("--data", help="prepared dataset folder (manifest.json)")
    parser.add_argument("--split", help="split of the prepared dataset (default: test if present, else val)")
    parser.add_argument("--source", help="instead of --data: a dataset root with its CSV files and images")
    parser.add_argument("--format", default="cxr-lt-2023", help="format of --source")
    parser.add_argument("--out", required=True, help="submission CSV to write")
    parser.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default sqlite:///<cwd>/mlflow.db)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--actors", type=int, help="model replicas (default: 1 per GPU, else half the CPUs)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else local Ray)")


class Predictor:
    """Ray Data actor: loads the MLflow model once, scores uint8 image batches."""

    def __init__(self, model_uri: str, tracking_uri: str) -> None:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        self.model = mlflow.pyfunc.load_model(model_uri)

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        import torch

        from components.data.ingest import normalize

        x = normalize(torch.from_numpy(np.array(batch["image"]))).numpy()  # a writable copy: Ray's is read-only
        out = {k: v for k, v in batch.items() if k != "image"}
        out["probs"] = np.asarray(self.model.predict(x), dtype=np.float32)
        return out


def load_source_batch(batch: dict, image_size: int) -> dict:
    """Ray Data task: read + resize images listed in a CSV; unreadable ones are flagged, not fatal."""
    import numpy as np

    from components.data.images import load_resized

    images, ok, reasons = [], [], []
    for path in batch["path"]:
        try:
            images.append(np.asarray(load_resized(str(path), image_size), dtype=np.uint8)[None])
            ok.append(True)
            reasons.append("")
        except FileNotFoundError:
            images.append(np.zeros((1, image_size, image_size), np.uint8))
            ok.append(False)
            reasons.append("missing file")
        except (OSError, ValueError, SyntaxError) as exc:
            images.append(np.zeros((1, image_size, image_size), np.uint8))
            ok.append(False)
            reasons.append(f"undecodable: {type(exc).__name__}")
    return {"image_id": batch["image_id"], "image": np.stack(images), "labels": np.stack(batch["labels"]).astype(np.float32),
            "mask": np.stack(batch["mask"]).astype(np.float32), "ok": np.array(ok), "reason": np.array(reasons, dtype=object),
            "origin": batch["origin"]}


def run(args) -> int:
    import csv
    import os
    from pathlib import Path

    import mlflow
    import numpy as np
    import ray
    import ray.data

    from components.config import Config, resolve_defaults
    from components.errors import UserError
    from components.metrics import multilabel_metrics
    from components.tracking import check_tracking_uri
    from workflows.raylib import init_ray

    if bool(args.data) == bool(args.source):
        raise UserError("give exactly one of --data (a prepared dataset) or --source (a CSV dataset root)")
    uri = args.tracking_uri or resolve_defaults(Config()).tracking.tracking_uri
    check_tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        info = mlflow.models.get_model_info(args.model_uri)
    except Exception as exc:  # unknown alias/name/run: the message names it
        raise UserError(f"--model-uri {args.model_uri}: {str(exc).splitlines()[0]}") from None
    meta = info.metadata or {}
    label_names, image_size = meta.get("label_names"), meta.get("image_size")
    if not label_names or not image_size:
        raise UserError(f"--model-uri {args.model_uri}: not a ralflow model (no label_names/image_size metadata)")
    init_ray(args.address)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # submission in dataset order
    groups = None
    if args.data:
        from components.data.ingest import build_ray_dataset
        from components.data.prepare import load_manifest

        manifest = load_manifest(args.data)
        if manifest["label_names"] != label_names:
            raise UserError(f"{args.data}: label set differs from the model's ({len(manifest['label_names'])} vs {len(label_names)} labels)")
        split = args.split or ("test" if "test" in manifest["splits"] else "val")
        ds = build_ray_dataset(args.data, split, image_size, None, keep_ids=True, num_cpus=0.5)
        groups = [manifest["groups"][n] for n in label_names]
        print(f"predict: {manifest['splits'][split]['num_images']} images from split '{split}' of {args.data}")
    else:
        from components.data.readers import read_source

        table = read_source(args.format, args.source)
        if list(table.label_names) != label_names:
            raise UserError(f"{args.source}: label set of format {args.format} differs from the model's")
        split = args.split or ("test" if "test" in table.split else "val")
        rows = [{"image_id": i, "path": p, "labels": l, "mask": m, "origin": o}
                for i, p, l, m, o, s in zip(table.image_id, table.path, table.labels, table.mask, table.origin, table.split) if s == split]
        if not rows:
            raise UserError(f"{args.source}: no rows in split '{split}'")
        ds = ray.data.from_items(rows).map_batches(load_source_batch, fn_kwargs={"image_size": image_size},
                                                   batch_size=args.batch_size, batch_format="numpy", num_cpus=0.5)
        print(f"predict: {len(rows)} images from split '{split}' of {args.source}")
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = args.actors or (gpus or max(1, int(ray.cluster_resources().get("CPU", 2)) // 2))
    scored = ds.map_batches(Predictor, fn_constructor_kwargs={"model_uri": args.model_uri, "tracking_uri": uri},
                            batch_size=args.batch_size, batch_format="numpy", concurrency=actors,
                            num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)
    ids, probs, labels, masks, rejects = [], [], [], [], []
    for batch in scored.iter_batches(batch_size=args.batch_size, batch_format="numpy"):
        ok = batch["ok"] if "ok" in batch else np.ones(len(batch["image_id"]), bool)
        for i in np.flatnonzero(~ok):
            rejects.append({"origin": batch["origin"][i], "image_id": batch["image_id"][i], "reason": batch["reason"][i]})
        ids.extend(batch["image_id"][ok].tolist())
        probs.append(batch["probs"][ok])
        labels.append(batch["labels"][ok])
        masks.append(batch["mask"][ok])
    probs, labels, masks = np.concatenate(probs), np.concatenate(labels), np.concatenate(masks)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dicom_id", *label_names])
        for image_id, row in zip(ids, probs):
            w.writerow([image_id, *[f"{v:.6f}" for v in row]])
    os.replace(tmp, out)
    print(f"predict: wrote {len(ids)} rows x {len(label_names)} classes to {out}")
    if rejects:
        rej = out.with_name(out.stem + ".rejects.csv")
        with open(rej, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["origin", "image_id", "reason"])
            w.writeheader()
            w.writerows(rejects)
        print(f"predict: {len(rejects)} image(s) could not be read; listed in {rej}", file=sys.stderr)
    if masks.sum() > 0:
        m = multilabel_metrics(probs, labels, groups, mask=masks)
        summary = {k: v for k, v in m.items() if k != "per_class_ap"}
        print("predict: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
        exp = mlflow.set_experiment("ralflow-predict")
        with mlflow.start_run(experiment_id=exp.experiment_id, run_name=f"predict-{split}",
                              tags={"ralflow.model_uri": args.model_uri, "ralflow.kind": "predict"}):
            mlflow.log_metrics({f"{split}_{k}": float(v) for k, v in summary.items() if np.isfinite(v)})
            mlflow.log_artifact(str(out))
    return 0


if __name__ == "__main__":
    sys.exit(main_for(__name__))
