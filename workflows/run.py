"""The whole pipeline on the embedded default (local Ray started automatically, a SQLite MLflow
store under --workdir): synth (unless --source is given) -> prepare -> tune -> promote ->
predict, then a short summary. Re-running the same command resumes where it stopped."""
from __future__ import annotations

import sys
import time

from workflows.common import main_for

DESCRIPTION = "End to end: synth -> prepare -> tune -> promote -> predict on the embedded default."


def add_arguments(parser) -> None:
    parser.add_argument("--workdir", required=True, help="where data, runs, mlflow.db and the submission go")
    parser.add_argument("--source", help="a real dataset root instead of synthetic data")
    parser.add_argument("--format", default="cxr-lt-2023", help="format of --source")
    parser.add_argument("--num-images", type=int, default=3000, help="synthetic images")
    parser.add_argument("--synth-size", type=int, default=128, help="synthetic image side (px)")
    parser.add_argument("--image-size", type=int, default=64, help="prepared/training image side (px)")
    parser.add_argument("--model", default="resnet10t", help="timm model name")
    parser.add_argument("--loss", default="ral")
    parser.add_argument("--num-samples", type=int, default=4, help="tuning trials")
    parser.add_argument("--max-epochs", type=int, default=3, help="epochs per trial")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2, help="Ray Train workers per trial")
    parser.add_argument("--model-name", default="ralflow-cxr", help="registered model name")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--address", help="Ray cluster address (default: a local Ray for this run)")


def run(args) -> int:
    import argparse
    from pathlib import Path

    from components.config import load_config
    from components.data.prepare import MANIFEST, PrepareOptions, load_manifest, prepare_dataset
    from components.data.synth import SynthOptions, write_synthetic_cxr_lt
    from components.registry import promote
    from workflows import predict
    from workflows.raylib import init_ray, map_with_ray_data
    from workflows.tune import run_sweep

    t_start = time.perf_counter()
    work = Path(args.workdir).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    step = lambda n, msg: print(f"\n== [{n}/5] {msg}", flush=True)

    source, fmt = args.source, args.format
    if not source:
        source, fmt = str(work / "synth"), "cxr-lt-2023"
        step(1, f"synthetic CXR-LT 2023 data: {args.num_images} images at {args.synth_size}px -> {source}")
        if (work / "synth" / "development.csv").exists():
            print("synth: already written, reusing")
        else:
            write_synthetic_cxr_lt(source, SynthOptions(num_images=args.num_images, image_size=args.synth_size, seed=args.seed))
    else:
        step(1, f"using {fmt} data at {source}")
    init_ray(args.address)
    data = work / "data"
    step(2, f"prepare -> {data}")
    if (data / MANIFEST).exists() and load_manifest(data)["source"]["root"] == str(Path(source).resolve()):
        print("prepare: dataset already complete, reusing")
    else:
        prepare_dataset(PrepareOptions(fmt, source, image_size=args.image_size, rows_per_shard=512), data, map_shards=map_with_ray_data)
    manifest = load_manifest(data)

    step(3, f"tune {args.loss}: {args.num_samples} trials x up to {args.max_epochs} epochs ({args.model})")
    cfg = load_config(None, {
        "data": {"path": str(data)}, "model": {"name": args.model}, "loss": {"name": args.loss},
        "train": {"epochs": args.max_epochs, "batch_size": args.batch_size, "num_workers": args.num_workers, "seed": args.seed},
        "tracking": {"tracking_uri": uri, "storage_path": str(work / "runs")},
    })
    from ray import tune as ray_tune

    from workflows.tuning import load_search_space, sweep_name

    name = sweep_name(cfg, args.num_samples, load_search_space(cfg.loss.name))
    resume = ray_tune.Tuner.can_restore(str(work / "runs" / name))
    sweep = run_sweep(cfg, args.num_samples, resume=resume, address=args.address, name=name)

    step(4, f"promote the best trial to {args.model_name}")
    promoted = promote(uri, args.model_name, run_id=sweep["best_run_id"])
    print(f"promote: version {promoted['version']} -> {promoted['alias']} ({promoted['reason']})")

    split = "test" if "test" in manifest["splits"] else "val"
    out = work / "submission.csv"
    step(5, f"predict the '{split}' split with models:/{args.model_name}@champion -> {out}")
    predict.run(argparse.Namespace(model_uri=f"models:/{args.model_name}@champion", data=str(data), split=split, source=None,
                                   format=fmt, out=str(out), tracking_uri=uri, batch_size=64, actors=None, address=args.address))

    best = sweep["best_params"]
    print("\n" + "=" * 72)
    print(f"ralflow run finished in {time.perf_counter() - t_start:.0f}s")
    print(f"  best trial   {sweep['best_trial']}  val mAP {sweep['best_val_mAP']:.4f}  (MLflow run {sweep['best_run_id']})")
    print("  best params  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.items()))
    from components import tracking

    m = tracking.client(uri).get_run(sweep["best_run_id"]).data.metrics
    print(f"  mAP by group head {m.get('best_val_mAP_head', float('nan')):.4f}  medium {m.get('best_val_mAP_medium', float('nan')):.4f}  "
          f"tail {m.get('best_val_mAP_tail', float('nan')):.4f}")
    print(f"  registry     {args.model_name} v{promoted['version']} @{promoted['alias']}")
    print(f"  submission   {out}")
    print(f"  MLflow UI    mlflow ui --backend-store-uri {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main_for(__name__))
