"""Batch prediction with Ray Data: a pool of actors holding the model (``models:/<name>@champion``
or any MLflow model URI) scores a prepared dataset, or a CXR-LT-format CSV + image root, and
writes the CXR-LT submission CSV (dicom_id + one probability column per class, in label order).
When labels are present the metrics are printed and logged. Unreadable images are listed in
``<out>.rejects.csv``, not fatal."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .config import DECODE_ON, TRACKING_URI_DEFAULT, setting
from .errors import UserError
from .studies import AGGREGATES, aggregate

TTA_CHOICES = ("hflip", "scale")
ENSEMBLE_MODES = ("prob", "logit")
SCALE_TTA = 0.875  # "scale": the centre 87.5% of the film, resized back (a 1.14x zoom)


# CPUs of each task that reads and decodes images: what the model's actors leave must hold one.
DECODE_CPUS = 0.5


@dataclass
class PredictOptions:
    model_uri: list[str] = setting(
        help="e.g. models:/ralflow-cxr@champion or runs:/<id>/model; repeat it for an ensemble"
    )
    out: str = setting(help="submission CSV to write")
    data: str | None = setting(None, help="prepared dataset (manifest.json): a folder, or a URI such as s3://b/data")
    split: str | None = setting(None, help="split to score (default: test if present, else val)")
    source: str | None = setting(None, help="instead of --data: a dataset root with its CSV files and images")
    format: str = setting("cxr-lt-2023", help="format of --source")
    tracking_uri: str | None = setting(None, help=f"MLflow tracking/registry URI {TRACKING_URI_DEFAULT}")
    batch_size: int = setting(64, help="images per model call")
    actors: int | None = setting(None, help="model replicas (default: 1 per GPU, else half the CPUs)")
    model_weight: list[float] | None = setting(None, help="one weight per --model-uri (default: equal)")
    ensemble: str = setting("prob", choices=ENSEMBLE_MODES, help="average the models' probabilities or logits")
    tta: str = setting(
        "none", help="test-time augmentation, averaged with the plain image: none, hflip, scale, or both as hflip,scale"
    )
    aggregate: str = setting("none", choices=AGGREGATES, help="score each image with its study's probabilities")
    findings: bool = setting(False, help="also write <out>.findings.csv: 0/1 per finding at the model's thresholds")
    decode_on: str = setting(
        "cpu",
        choices=DECODE_ON,
        help="with --data: decode in Ray Data tasks (cpu) or in the model's actor, on its GPU",
    )

    def __post_init__(self) -> None:
        if isinstance(self.model_uri, str):
            self.model_uri = [self.model_uri]


def tta_views(tta: str) -> list[str]:
    """The views each image is scored in: itself first, then the named augmentations."""
    names = [t.strip() for t in (tta or "none").split(",") if t.strip() and t.strip() != "none"]
    bad = sorted(set(names) - set(TTA_CHOICES))
    if bad:
        raise UserError(
            f"tta {','.join(bad)} is invalid; allowed: none, {', '.join(TTA_CHOICES)}, or a comma-separated list "
            f"of them ({','.join(TTA_CHOICES)})",
            field="tta",
        )
    return ["identity", *dict.fromkeys(names)]


def tta_pixels(pixels: np.ndarray, view: str) -> np.ndarray:
    """(N, S, S) uint8 as seen by one TTA view."""
    if view == "identity":
        return pixels
    if view == "hflip":
        return np.ascontiguousarray(pixels[..., ::-1])
    import torch

    from .data.ingest import resize_batch

    size = pixels.shape[-1]
    crop = max(1, round(size * SCALE_TTA))
    lo = (size - crop) // 2
    centre = torch.as_tensor(np.ascontiguousarray(pixels[:, None, lo : lo + crop, lo : lo + crop]))
    return resize_batch(centre, size)[:, 0].numpy()


def ensemble_probs(models, weights, views: list[str], mode: str, pixels: np.ndarray) -> np.ndarray:
    """Each model's probabilities averaged over the TTA views, then the weighted mean over models,
    in probability or logit space (``mode``)."""
    from .calibration import logit, sigmoid

    total = np.zeros((len(pixels), len(models[0].label_names)), np.float64)
    for model, weight in zip(models, weights):
        per_view = [np.asarray(model.predict_pixels(tta_pixels(pixels, v)), np.float64) for v in views]
        values = [logit(p) for p in per_view] if mode == "logit" else per_view
        total += weight * np.mean(values, axis=0)
    total /= sum(weights)
    return sigmoid(total) if mode == "logit" else total


class Predictor:
    """Ray Data actor: loads the models once and scores uint8 image batches, every TTA view and
    every model of the ensemble in the same pass (the models resize and normalise themselves)."""

    def __init__(
        self, model_uris: list[str], tracking_uri: str, weights, views, mode: str, image_size: int = 0
    ) -> None:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        self.models = [mlflow.pyfunc.load_model(uri).unwrap_python_model() for uri in model_uris]
        self.weights, self.views, self.mode, self.image_size = weights, views, mode, image_size

    def __call__(self, batch: dict) -> dict:
        out = {k: v for k, v in batch.items() if k != "image"}
        pixels = np.asarray(batch["image"])
        if pixels.dtype == object:  # decode_on gpu: JPEG bytes, decoded on the model's device (nvJPEG)
            from .data.ingest import decode_images

            pixels = decode_images(list(pixels), self.image_size, None, self.models[0].device).cpu().numpy()
        pixels = pixels[:, 0] if pixels.ndim == 4 else pixels
        out["probs"] = ensemble_probs(self.models, self.weights, self.views, self.mode, pixels)
        return out


def load_source_batch(batch: dict, image_size: int, root: str | None = None) -> dict:
    """Ray Data task: read + resize images listed in a CSV; unusable ones are flagged with the
    reason, not fatal."""
    from .data.images import read_or_reason

    images, ok, reasons = [], [], []
    for path in batch["path"]:
        im, reason = read_or_reason(str(path), image_size, root=root)
        images.append(np.zeros((1, image_size, image_size), np.uint8) if im is None else np.asarray(im, np.uint8)[None])
        ok.append(im is not None)
        reasons.append(reason)
    return {
        "image_id": batch["image_id"],
        "image": np.stack(images),
        "labels": np.stack(batch["labels"]).astype(np.float32),
        "mask": np.stack(batch["mask"]).astype(np.float32),
        "ok": np.array(ok),
        "reason": np.array(reasons, dtype=object),
        "origin": batch["origin"],
        "study_id": batch["study_id"],
        "view": batch["view"],
    }


def model_info(model_uri: str, tracking_uri: str) -> dict:
    """The model's ralflow metadata: ``label_names``, ``image_size`` and, when fitted,
    ``thresholds`` ({label: threshold}) and ``calibration`` (the method)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        info = mlflow.models.get_model_info(model_uri)
    except Exception as exc:  # unknown alias/name/run: the message names it
        raise UserError(f"model_uri {model_uri}: {str(exc).splitlines()[0]}", field="model_uri") from None
    meta = info.metadata or {}
    if not meta.get("label_names") or not meta.get("image_size"):
        raise UserError(
            f"model_uri {model_uri}: not a ralflow model (no label_names/image_size metadata)", field="model_uri"
        )
    return meta


def source_dataset(opts: PredictOptions, label_names: list[str], image_size: int, log=print):
    """(Ray Dataset of uint8 images with ids, labels and masks; the split; label groups or None)."""
    import ray.data

    if opts.data:
        from .data.ingest import build_ray_dataset
        from .data.manifest import Manifest

        manifest = Manifest.load(opts.data)
        manifest.verify()
        if manifest.label_names != label_names:
            raise UserError(
                f"data {opts.data}: label set differs from the model's "
                f"({len(manifest.label_names)} vs {len(label_names)} labels)",
                field="data",
            )
        split = opts.split or ("test" if "test" in manifest.splits else "val")
        decode = opts.decode_on == "cpu"  # gpu: the stored JPEG bytes travel to the model's actor
        ds = build_ray_dataset(manifest, split, image_size, None, keep_ids=True, num_cpus=DECODE_CPUS, decode=decode)
        log(f"predict: {manifest.split(split).num_images} images from split '{split}' of {opts.data}")
        return ds, split, manifest.group_list()
    from .data.readers import read_source

    if opts.decode_on != "cpu":
        raise UserError(
            "decode_on gpu needs --data (a prepared dataset of JPEGs); --source images are read on CPUs",
            field="decode_on",
        )
    table = read_source(opts.format, opts.source)
    if list(table.label_names) != label_names:
        raise UserError(
            f"source {opts.source}: label set of format {opts.format} differs from the model's", field="source"
        )
    split = opts.split or ("test" if "test" in table.split else "val")
    rows = [
        {"image_id": i, "path": p, "labels": lab, "mask": m, "origin": o, "study_id": st or i, "view": v}
        for i, p, lab, m, o, s, st, v in zip(
            table.image_id, table.path, table.labels, table.mask, table.origin, table.split, table.study_id, table.view
        )
        if s == split
    ]
    if not rows:
        raise UserError(f"source {opts.source}: no rows in split '{split}'", field="source")
    ds = ray.data.from_items(rows).map_batches(
        load_source_batch,
        fn_kwargs={"image_size": image_size, "root": os.path.realpath(opts.source)},
        batch_size=opts.batch_size,
        batch_format="numpy",
        num_cpus=DECODE_CPUS,
    )
    log(f"predict: {len(rows)} images from split '{split}' of {opts.source}")
    return ds, split, None


def write_csv_atomically(path: Path, header: list[str], rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, path)


def check_actors_fit(actors: int, on_gpus: bool, log=print) -> None:
    """The model's actors (a CPU each, or a GPU each) and one decode task must fit: actors holding
    every CPU leave none for reading images, and the job waits forever. ralflow's embedded Ray (a
    fixed size) refuses such a job at start; on a cluster, which may autoscale, say what it waits for."""
    from .runtime import describe, refuse_or_wait

    def refusal(short):
        return UserError(
            f"actors={actors}: {actors} model actor(s) x 1 {'GPU' if on_gpus else 'CPU'} each, and {DECODE_CPUS:g} CPU "
            f"to read images, need {describe(short)} on this machine; lower --actors",
            field="actors",
        )

    need = {"CPU": (0 if on_gpus else actors) + DECODE_CPUS, **({"GPU": actors} if on_gpus else {})}
    refuse_or_wait(need, refusal, lambda short: f"predict: waiting for resources: {actors} model actor(s) and a "
                   f"decode task need {short}; an autoscaling cluster adds nodes", log)  # fmt: skip


def predict(opts: PredictOptions, address: str | None = None, log=print) -> dict:
    """Score the dataset, write the submission (and rejects), log metrics when labels exist.
    Returns ``{"rows", "out", "rejects", "metrics"}``."""
    import ray

    from .config import default_tracking_uri
    from .metrics import multilabel_metrics
    from .paths import canonical, local_path
    from .runtime import init_ray
    from .tracking import TrackedRun, check_tracking_uri

    if bool(opts.data) == bool(opts.source):
        raise UserError("give exactly one of data (a prepared dataset) or source (a CSV dataset root)", field="data")
    for name, value in (("actors", opts.actors), ("batch_size", opts.batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{name}={value} is invalid; allowed: >= 1", field=name)
    opts = replace(  # CSV files and images are read, and the CSV written, on this machine
        opts,
        out=str(local_path(opts.out, "out")),
        source=opts.source and str(local_path(opts.source, "source")),
        data=opts.data and canonical(opts.data),  # shards are read by tasks on any node, from their own folder
    )
    if Path(opts.out).is_dir():
        raise UserError(f"out {opts.out} is a folder; give the CSV file to write", field="out")
    uri = opts.tracking_uri or default_tracking_uri()
    check_tracking_uri(uri)
    views = tta_views(opts.tta)
    weights = opts.model_weight or [1.0] * len(opts.model_uri)
    if len(weights) != len(opts.model_uri) or min(weights) < 0 or sum(weights) <= 0:
        raise UserError(
            f"model_weight needs one weight >= 0 per model_uri ({len(opts.model_uri)}), not all 0", field="model_weight"
        )
    metas = [model_info(m, uri) for m in opts.model_uri]
    label_names, image_size = metas[0]["label_names"], metas[0]["image_size"]
    for m, meta in zip(opts.model_uri[1:], metas[1:]):
        if meta["label_names"] != label_names:
            raise UserError(f"model_uri {m}: its labels differ from {opts.model_uri[0]}'s", field="model_uri")
    thresholds = metas[0].get("thresholds")  # an ensemble decides at its first model's thresholds
    if opts.findings and not thresholds:
        raise UserError(f"findings: {opts.model_uri[0]} has no thresholds (train with --thresholds)", field="findings")
    init_ray(address, log=log)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # submission in dataset order
    ds, split, groups = source_dataset(opts, label_names, image_size, log)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = opts.actors or (gpus or max(1, int(ray.cluster_resources().get("CPU", 2)) // 2))
    check_actors_fit(actors, gpus > 0, log)
    scored = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "model_uris": opts.model_uri,
            "tracking_uri": uri,
            "weights": weights,
            "views": views,
            "mode": opts.ensemble,
            "image_size": image_size,
        },
        batch_size=opts.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus else 0,
        num_cpus=0 if gpus else 1,
    )
    ids, probs, labels, masks, studies, image_views, rejects = [], [], [], [], [], [], []
    for batch in scored.iter_batches(batch_size=opts.batch_size, batch_format="numpy"):
        ok = batch["ok"] if "ok" in batch else np.ones(len(batch["image_id"]), bool)
        for i in np.flatnonzero(~ok):
            rejects.append([batch["origin"][i], batch["image_id"][i], batch["reason"][i]])
        ids.extend(batch["image_id"][ok].tolist())
        studies.extend(batch["study_id"][ok].tolist())
        image_views.extend(batch["view"][ok].tolist())
        probs.append(batch["probs"][ok])
        labels.append(batch["labels"][ok])
        masks.append(batch["mask"][ok])
    image_probs, labels, masks = np.concatenate(probs), np.concatenate(labels), np.concatenate(masks)
    probs = aggregate(image_probs, studies, image_views, opts.aggregate)  # one row per image still
    out = Path(opts.out)
    write_csv_atomically(
        out, ["dicom_id", *label_names], ([i, *[f"{v:.6f}" for v in row]] for i, row in zip(ids, probs))
    )
    findings_file = None
    if opts.findings:
        from .calibration import decide

        findings_file = out.with_name(out.stem + ".findings.csv")
        cut = [thresholds[name] for name in label_names]
        write_csv_atomically(
            findings_file, ["dicom_id", *label_names], ([i, *row] for i, row in zip(ids, decide(probs, cut)))
        )
    rejects_file = None
    if rejects:
        rejects_file = out.with_name(out.stem + ".rejects.csv")
        write_csv_atomically(rejects_file, ["origin", "image_id", "reason"], rejects)
    summary = None
    if masks.sum() > 0:
        m = multilabel_metrics(probs, labels, groups, mask=masks)
        summary = {k: v for k, v in m.items() if k != "per_class_ap"}
        if opts.aggregate != "none":  # what the study aggregation changed
            summary["mAP_image"] = multilabel_metrics(image_probs, labels, mask=masks)["mAP"]
        tags = {"ralflow.model_uri": ",".join(opts.model_uri), "ralflow.kind": "predict"}
        run = TrackedRun.create(uri, "ralflow-predict", f"predict-{split}", tags)
        run.log_params({"aggregate": opts.aggregate, "tta": ",".join(views), "ensemble": opts.ensemble,
                        "model_weight": ",".join(f"{w:g}" for w in weights)})  # fmt: skip
        run.log_metrics({f"{split}_{k}": v for k, v in summary.items()})
        run.log_file(out)
        run.finish("FINISHED")
    return {
        "rows": len(ids),
        "classes": len(label_names),
        "out": str(out),
        "rejects": len(rejects),
        "rejects_file": str(rejects_file) if rejects_file else None,
        "findings_file": str(findings_file) if findings_file else None,
        "metrics": summary,
    }
