"""``ralflow run``: the whole pipeline on the embedded default, composed from the library's
stages: synth -> prepare -> tune -> promote -> predict. Each stage resumes: re-running skips
what is already done."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .config import setting


@dataclass
class PipelineOptions:
    workdir: str = setting(help="where data, runs, mlflow.db and the submission go")
    source: str | None = setting(None, help="a real dataset root instead of synthetic data")
    format: str = setting("cxr-lt-2023", help="format of --source")
    num_images: int = setting(3000, help="synthetic images")
    synth_size: int = setting(128, help="synthetic image side (px)")
    image_size: int = setting(64, help="prepared/training image side (px)")
    model: str = setting("resnet10t", help="timm model name")
    loss: str = setting("ral", help="loss to tune")
    num_samples: int = setting(4, help="tuning trials")
    max_epochs: int = setting(3, help="epochs per trial")
    batch_size: int = setting(32, help="per-worker batch size")
    num_workers: int = setting(2, help="Ray Train workers per trial")
    model_name: str = setting("ralflow-cxr", help="registered model name")
    seed: int = setting(0, help="random seed")


def run_pipeline(opts: PipelineOptions, address: str | None = None, log=print) -> dict:
    """Run every stage; returns what the summary shows (sweep, promotion, submission, metrics)."""
    from .config import load_config
    from .data.manifest import MANIFEST, Manifest
    from .data.prepare import PrepareOptions, check_output_folder, prepare_dataset
    from .data.synth import SynthOptions, check_synth_folder, write_synthetic_cxr_lt
    from .paths import local_folder
    from .predict import PredictOptions, predict
    from .promote import PromoteOptions, promote
    from .runtime import init_ray, map_with_ray_data
    from .tracking import TrackedRun
    from .tune import SweepOptions, run_sweep

    t_start = time.perf_counter()
    work = local_folder(opts.workdir, "workdir").resolve()
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"

    def step(n, msg):
        log(f"\n== [{n}/5] {msg}")

    source, fmt = opts.source, opts.format
    if not source:
        source, fmt = str(work / "synth"), "cxr-lt-2023"
        step(1, f"synthetic CXR-LT 2023 data: {opts.num_images} images at {opts.synth_size}px -> {source}")
        synth_opts = SynthOptions(num_images=opts.num_images, image_size=opts.synth_size, seed=opts.seed)
        if (work / "synth" / "development.csv").exists():
            check_synth_folder(work / "synth", synth_opts)  # other sizes on a re-run: refused, not ignored
            log("synth: already written, reusing")
        else:
            write_synthetic_cxr_lt(source, synth_opts)
    else:
        step(1, f"using {fmt} data at {source}")
    init_ray(address, log=log)
    data = work / "data"
    step(2, f"prepare -> {data}")
    prepare_opts = PrepareOptions(fmt, source, image_size=opts.image_size, rows_per_shard=512)
    if (data / MANIFEST).exists():
        check_output_folder(data, prepare_opts)  # another source or size on a re-run: refused, not ignored
        log("prepare: dataset already complete, reusing")
        manifest = Manifest.load(data)
    else:
        manifest = prepare_dataset(prepare_opts, data, map_shards=map_with_ray_data, log=log)

    step(3, f"tune {opts.loss}: {opts.num_samples} trials x up to {opts.max_epochs} epochs ({opts.model})")
    cfg = load_config(
        None,
        {
            "data": {"path": str(data)},
            "model": {"name": opts.model},
            "loss": {"name": opts.loss},
            "train": {
                "epochs": opts.max_epochs,
                "batch_size": opts.batch_size,
                "num_workers": opts.num_workers,
                "seed": opts.seed,
            },
            "tracking": {"tracking_uri": uri, "storage_path": str(work / "runs")},
        },
    )
    sweep_opts = SweepOptions(num_samples=opts.num_samples, max_epochs=opts.max_epochs)
    sweep = run_sweep(cfg, sweep_opts, address=address, log=log, resume_if_exists=True)

    step(4, f"promote the best trial to {opts.model_name}")
    promoted = promote(PromoteOptions(opts.model_name, tracking_uri=uri, run_id=sweep["best_run_id"]))
    log(f"promote: version {promoted['version']} -> {promoted['alias']} ({promoted['reason']})")

    split = "test" if "test" in manifest.splits else "val"
    out = work / "submission.csv"
    step(5, f"predict the '{split}' split with models:/{opts.model_name}@champion -> {out}")
    predicted = predict(
        PredictOptions(f"models:/{opts.model_name}@champion", str(out), data=str(data), split=split, tracking_uri=uri),
        address=address,
        log=log,
    )
    best_metrics = TrackedRun(uri, sweep["best_run_id"]).get().data.metrics
    return {
        "seconds": time.perf_counter() - t_start,
        "sweep": sweep,
        "promoted": promoted,
        "predicted": predicted,
        "best_metrics": best_metrics,
        "tracking_uri": uri,
        "submission": str(out),
        "model_name": opts.model_name,
    }
