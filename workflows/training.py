"""Ray Train job code shared by ``ralflow train`` and ``ralflow tune``.

``train_loop_per_worker`` runs in every Ray Train worker: it streams its share of the training
split from Ray Data (decode/augmentation run in Ray Data tasks), trains the timm model with the
configured loss, validates on the whole validation split every epoch (rank 0 scores every
image exactly once, so the metric does not depend on the worker count), reports a checkpoint every
epoch, and -- on rank 0 only -- logs the epoch's metrics to the run's MLflow run.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from components.config import Config
from components.errors import UserError

CHECKPOINT_FILE = "state.pt"
CHECKPOINT_DIR = re.compile(r"epoch-\d+")  # one folder per epoch in the run's storage folder


def checkpoint_dir_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def checkpoint_folders(fs, root: str) -> list:
    """FileInfos of the per-epoch checkpoint folders under ``root`` (missing root: none)."""
    import pyarrow.fs

    return [i for i in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
            if i.type == pyarrow.fs.FileType.Directory and CHECKPOINT_DIR.fullmatch(i.base_name)]


# -- pieces usable without Ray (unit-tested directly) -----------------------------------------

def loss_params_for(cfg: Config, manifest: dict) -> dict:
    """Loss params, with class statistics from the manifest for the losses that need them."""
    params = dict(cfg.loss.params)
    train = manifest["splits"]["train"]
    counts = [train["class_counts"][n] for n in manifest["label_names"]]
    if cfg.loss.name in ("cb", "db"):
        params.setdefault("class_counts", counts)
    if cfg.loss.name == "db":
        params.setdefault("num_samples", int(train["num_images"]))
    return params


def lr_factor(step: int, steps_per_epoch: int, epochs: int, warmup_epochs: float, min_ratio: float) -> float:
    """Linear warmup then cosine decay to ``min_ratio``, per optimisation step."""
    t = step / max(steps_per_epoch, 1)
    if warmup_epochs > 0 and t < warmup_epochs:
        return max(t / warmup_epochs, 1e-3)
    span = max(epochs - warmup_epochs, 1e-8)
    progress = min(max((t - warmup_epochs) / span, 0.0), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def amp_dtype(amp: str, device_type: str):
    """Autocast dtype, or None for full precision. CPU runs full precision under 'auto'."""
    import torch

    if amp == "off" or (amp == "auto" and device_type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or (device_type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def evaluate(model, batches, device, autocast_dtype):
    """Probabilities, targets and masks over an iterable of batches (this worker's part)."""
    import torch

    from components.data.ingest import normalize

    model.eval()
    probs, targets, masks = [], [], []
    with torch.inference_mode():
        for batch in batches:
            x = normalize(batch["image"].to(device, non_blocking=True))
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                logits = model(x)
            probs.append(torch.sigmoid(logits.float()).cpu().numpy())
            targets.append(batch["labels"].cpu().numpy())
            masks.append(batch["mask"].cpu().numpy())
    model.train()
    if not probs:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(probs), np.concatenate(targets), np.concatenate(masks)


def gather_to_all(*arrays):
    """Concatenate each array across the workers (identity when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return arrays
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, arrays)
    return tuple(np.concatenate([g[i] for g in gathered if g[i].size]) for i in range(len(arrays)))


def epoch_metrics(probs, targets, masks, manifest) -> dict:
    from components.metrics import multilabel_metrics

    groups = [manifest["groups"][n] for n in manifest["label_names"]]
    m = multilabel_metrics(probs, targets, groups, mask=masks)
    out = {"val_mAP": m["mAP"], "val_AUROC": m["AUROC"]}
    for g in ("head", "medium", "tail"):
        out[f"val_mAP_{g}"] = m[f"mAP_{g}"]
    out["per_class_ap"] = [None if math.isnan(a) else float(a) for a in m["per_class_ap"]]
    return out


def stored_checkpoint_states(storage_dir: str, run_id: str | None, device="cpu"):
    """The complete checkpoints of this MLflow run in the run's storage folder, newest first.
    Checkpoints of another run (a reused folder) and half-written ones are skipped."""
    import pyarrow.fs
    import ray.train

    fs, root = pyarrow.fs.FileSystem.from_uri(storage_dir)
    for path in sorted((i.path for i in checkpoint_folders(fs, root)), reverse=True):
        try:
            state = load_checkpoint_state(ray.train.Checkpoint(path, filesystem=fs), device)
        except Exception:  # noqa: BLE001 - incomplete or unreadable: try the one before
            continue
        if run_id is None or state.get("run_id") == run_id:
            yield state


def load_checkpoint_state(checkpoint, device="cpu") -> dict:
    import torch

    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / CHECKPOINT_FILE, map_location=device, weights_only=False)


def newest_checkpoint_state(storage_dir: str, run_id: str | None, registered, device) -> dict | None:
    """The state to resume from: the newest complete checkpoint of this MLflow run in the run's
    storage folder, else the checkpoint Ray registered, else None (a fresh start).

    Ray Train V2 registers a reported checkpoint only when its controller next polls the workers.
    A worker that fails in between restarts the group from the previous checkpoint although the
    newer one is already in storage and its epoch already logged to MLflow; resuming from storage
    keeps the model and the MLflow history on one trajectory."""
    state = next(stored_checkpoint_states(storage_dir, run_id, device), None)
    if state is None and registered:
        state = load_checkpoint_state(registered, device)
    return state


# -- the Ray Train worker loop ----------------------------------------------------------------

def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from components.config import load_config, merge
    from components.data.ingest import normalize
    from components.losses import build_loss
    from components.models import build_model
    from components import tracking

    cfg = merge(load_config(), config["cfg"], "trainer")
    manifest = config["manifest"]
    run_id = config.get("mlflow_run_id")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed + rank)
    device = ray.train.torch.get_device()
    label_names = manifest["label_names"]

    model = build_model(cfg.model.name, len(label_names), cfg.model.in_chans, cfg.model.pretrained_path, cfg.model.drop_rate)
    model = ray.train.torch.prepare_model(model)
    loss_fn = build_loss(cfg.loss.name, **loss_params_for(cfg, manifest)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    n_train = manifest["splits"]["train"]["num_images"]
    steps_per_epoch = max(1, math.ceil(n_train / (cfg.train.batch_size * max(world, 1))))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps_per_epoch, cfg.train.epochs, cfg.optim.warmup_epochs, cfg.optim.min_lr_ratio))
    autocast_dtype = amp_dtype(cfg.train.amp, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

    start_epoch = 0
    state = newest_checkpoint_state(config["storage_dir"], run_id, ray.train.get_checkpoint(), device)
    if state:
        unwrapped = model.module if hasattr(model, "module") else model
        unwrapped.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"] + 1
        if rank == 0:
            print(f"[train] resumed from checkpoint of epoch {state['epoch']} (restart in the same MLflow run {run_id})", flush=True)
            if run_id:  # the epoch may have been checkpointed but not logged before the failure
                c = tracking.client(cfg.tracking.tracking_uri)
                tracking.log_epoch(c, run_id, state["metrics"], state["epoch"])
                # A durable record of the restart: worker stdout reaches the driver through Ray's
                # log monitor, which may drop lines around a worker failure.
                tracking.log_restart(c, run_id, state["epoch"])

    mlflow_client = tracking.client(cfg.tracking.tracking_uri) if rank == 0 and run_id else None
    import ray

    nodes = gather_to_all(np.array([ray.get_runtime_context().get_node_id()]))[0]
    if mlflow_client:
        mlflow_client.set_tag(run_id, "ralflow.worker_nodes", ",".join(sorted(set(nodes.tolist()))))
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    drill_marker = Path(config.get("drill_marker") or "/nonexistent")

    for epoch in range(start_epoch, cfg.train.epochs):
        t0 = time.perf_counter()
        loss_sum, seen, steps, data_wait = 0.0, 0, 0, 0.0
        t_wait = t0
        for batch in train_shard.iter_torch_batches(batch_size=cfg.train.batch_size, device=device):
            data_wait += time.perf_counter() - t_wait  # time the loop stood waiting for this batch
            x, y, mask = normalize(batch["image"]), batch["labels"], batch["mask"]
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                logits = model(x)
            loss = loss_fn(logits, y, mask=mask)  # the loss upcasts to float32 itself
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(x)
            seen += len(x)
            steps += 1
            if (cfg.train.fail_at_epoch == epoch and rank == world - 1 and steps == 1
                    and not drill_marker.exists() and config.get("drill_marker")):
                drill_marker.write_text(f"worker {rank} exited at epoch {epoch}\n")
                print(f"[train] fault drill: worker {rank} exits now (epoch {epoch})", flush=True)
                os._exit(1)
            t_wait = time.perf_counter()
        train_time = time.perf_counter() - t0
        metrics_val: dict = {}
        if rank == 0:  # the unwrapped module: no DDP collective while the other ranks wait
            unwrapped = model.module if hasattr(model, "module") else model
            probs, targets, masks = evaluate(unwrapped, val_shard.iter_torch_batches(batch_size=cfg.train.batch_size, device=device),
                                             device, autocast_dtype)
            metrics_val = {"val_images": int(len(probs)), **epoch_metrics(probs, targets, masks, manifest)}
        totals = gather_to_all(np.array([loss_sum, seen, steps], dtype=np.float64))[0].reshape(-1, 3).sum(0)
        metrics = {"epoch": epoch, "train_loss": totals[0] / max(totals[1], 1), "lr": scheduler.get_last_lr()[0],
                   "images_per_s": totals[1] / max(train_time, 1e-9), "epoch_time_s": time.perf_counter() - t0,
                   "data_wait_frac": data_wait / max(train_time, 1e-9)}  # rank 0's share of time starved of data
        metrics.update(metrics_val)
        scalar = {k: v for k, v in metrics.items() if k != "per_class_ap"}
        # Local mode (num_workers=0) does not persist reported checkpoints: write them in place.
        in_place = f"{config['storage_dir']}/{checkpoint_dir_name(epoch)}" if config["checkpoint_in_place"] else None
        with (nullcontext(in_place) if in_place else tempfile.TemporaryDirectory()) as tmp:
            ckpt = None
            if rank == 0:
                Path(tmp).mkdir(parents=True, exist_ok=True)
                unwrapped = model.module if hasattr(model, "module") else model
                torch.save({"run_id": run_id, "model": unwrapped.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                            "epoch": epoch, "metrics": scalar, "per_class_ap": metrics["per_class_ap"]},
                           Path(tmp) / CHECKPOINT_FILE)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(scalar, checkpoint=ckpt, checkpoint_dir_name=checkpoint_dir_name(epoch))
        if rank == 0:
            if mlflow_client:  # logged after the checkpoint is safe: a restart never logs an epoch twice
                tracking.log_epoch(mlflow_client, run_id, scalar, epoch)
            print(f"[train] epoch {epoch + 1}/{cfg.train.epochs} loss {scalar['train_loss']:.4f} "
                  f"val mAP {scalar['val_mAP']:.4f} (head {scalar['val_mAP_head']:.4f} medium {scalar['val_mAP_medium']:.4f} "
                  f"tail {scalar['val_mAP_tail']:.4f}) AUROC {scalar['val_AUROC']:.4f} "
                  f"{scalar['images_per_s']:.0f} img/s (data wait {scalar['data_wait_frac']:.0%}) {scalar['epoch_time_s']:.1f}s", flush=True)


# -- the driver side ----------------------------------------------------------------------------

def git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def prepare_run(cfg: Config, log=print, extra_tags: dict | None = None):
    """Checks and MLflow bookkeeping before any training: returns (manifest, client, run_id)."""
    from components import tracking
    from components.data.prepare import load_manifest
    from components.losses import build_loss
    from components.models import build_model

    if not cfg.data.path:
        raise UserError("--data is required (a folder written by `ralflow prepare`)")
    manifest = load_manifest(cfg.data.path)
    if "val" not in manifest["splits"]:
        raise UserError(f"{cfg.data.path}: the prepared dataset has no validation split")
    cfg.data.image_size = cfg.data.image_size or manifest["image_size"]
    build_loss(cfg.loss.name, **loss_params_for(cfg, manifest))  # bad loss/params fail here, not in a worker
    build_model(cfg.model.name, len(manifest["label_names"]), cfg.model.in_chans)
    uri = cfg.tracking.tracking_uri
    tracking.check_tracking_uri(uri)
    log(f"[train] MLflow tracking URI: {uri}   (browse: mlflow ui --backend-store-uri {uri})")
    log(f"[train] Ray Train storage: {cfg.tracking.storage_path}/{cfg.tracking.run_name}")
    c = tracking.client(uri)
    exp_id = tracking.experiment_id(c, cfg.tracking.experiment)
    tags = {"ralflow.dataset_sha256": manifest["dataset_sha256"], "ralflow.loss": cfg.loss.name,
            "ralflow.model": cfg.model.name}
    if (commit := git_commit()):
        tags["ralflow.git_commit"] = commit
    tags.update(extra_tags or {})
    run_id, resumed = tracking.find_or_create_run(c, exp_id, cfg.tracking.run_name, tags)
    log(f"[train] MLflow run {run_id} ({'resumed' if resumed else 'new'}) in experiment '{cfg.tracking.experiment}'")
    params = cfg.flat()
    params["dataset.sha256"] = manifest["dataset_sha256"]
    params["dataset.num_train"] = manifest["splits"]["train"]["num_images"]
    params["dataset.num_val"] = manifest["splits"]["val"]["num_images"]
    params.pop("train.fail_at_epoch", None)
    tracking.log_params(c, run_id, params)
    if not resumed:
        from components.config import save_yaml

        with tempfile.TemporaryDirectory() as tmp:
            save_yaml(cfg, Path(tmp) / "config.yaml")
            (Path(tmp) / "manifest.json").write_text(json.dumps(manifest, indent=2))
            c.log_artifact(run_id, str(Path(tmp) / "config.yaml"))
            c.log_artifact(run_id, str(Path(tmp) / "manifest.json"), "dataset")
    return manifest, c, run_id


def build_trainer(cfg: Config, manifest: dict, run_id: str | None, callbacks=None, storage_path: str | None = None,
                  name: str | None = None):
    """The TorchTrainer for one training run (used by train and by each tune trial)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from components.data.ingest import AugmentOptions, build_ray_dataset

    d = cfg.data
    augment = AugmentOptions(d.crop_scale_min, d.rotation_degrees, d.hflip, d.brightness, d.contrast)
    datasets = {
        "train": build_ray_dataset(d.path, "train", d.image_size, augment, num_cpus=d.map_cpus),
        "val": build_ray_dataset(d.path, "val", d.image_size, None, num_cpus=d.map_cpus),
    }
    for ds in datasets.values():
        # These run in Ray Train's split coordinator, a remote actor: its progress bars reach the
        # driver as raw redraw lines (hundreds of KB in a run's log) and count no rows for a
        # split. The epoch lines report progress, throughput and data wait instead.
        ds.context.enable_progress_bars = False
    storage = storage_path or cfg.tracking.storage_path
    name = name or cfg.tracking.run_name
    drill = f"{storage}/{name}/.fault-drill-done" if cfg.train.fail_at_epoch is not None and "://" not in storage else None
    workers = cfg.train.num_workers
    # Train V2 patches print() in workers to both log and tee it, so every worker line reached the
    # driver twice. Plain print keeps one copy; Ray forwards this variable to the workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    resources = {"CPU": cfg.train.cpus_per_worker} if workers else None
    if resources and cfg.train.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "manifest": manifest, "mlflow_run_id": run_id, "drill_marker": drill,
                           "storage_dir": f"{storage}/{name}", "checkpoint_in_place": workers == 0},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources,
                                               placement_strategy=cfg.train.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage, callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                                         checkpoint_score_attribute="val_mAP", checkpoint_score_order="max"),
        ),
        datasets=datasets,
        # Only training is sharded (Ray splits with equal=True, dropping rows to equalise the
        # workers); validation is scored whole by rank 0, every image exactly once.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def best_checkpoint_state(result, storage_dir: str, run_id: str | None) -> dict:
    """The best epoch's state by val mAP among Ray's checkpoints; when Ray has none (a rerun of a
    finished run resumes past its last epoch and reports nothing), among the stored ones."""
    candidates = result.best_checkpoints or ([(result.checkpoint, result.metrics)] if result.checkpoint else [])
    if candidates:
        ckpt, _ = max(candidates, key=lambda cm: cm[1].get("val_mAP", float("-inf")))
        return load_checkpoint_state(ckpt)
    stored = list(stored_checkpoint_states(storage_dir, run_id))
    if not stored:
        raise RuntimeError(f"training finished without any checkpoint in {storage_dir}")
    return max(stored, key=lambda st: st["metrics"].get("val_mAP", float("-inf")))


def prune_unregistered_checkpoints(result) -> None:
    """Delete checkpoint folders Ray's checkpoint manager never registered (written just before a
    worker failure, see newest_checkpoint_state), so ``keep_checkpoints`` still bounds storage."""
    if not result.path:
        return  # local mode (num_workers=0) has no Ray-managed storage
    kept = {c.path.rstrip("/") for c, _ in (result.best_checkpoints or [])}
    if result.checkpoint:
        kept.add(result.checkpoint.path.rstrip("/"))
    root = result.path.rstrip("/")
    if not any(p.startswith(root + "/") for p in kept):
        return  # nothing here that Ray manages: not Ray's to judge
    for info in checkpoint_folders(result.filesystem, root):
        if info.path.rstrip("/") not in kept:
            result.filesystem.delete_dir(info.path)


def finish_run(cfg: Config, manifest: dict, c, run_id: str, state: dict, log=print) -> dict:
    """Log the best epoch's model, summary metrics and per-class AP artifacts; close the run."""
    from components import tracking

    names = manifest["label_names"]
    counts = [manifest["splits"]["train"]["class_counts"][n] for n in names]
    groups = [manifest["groups"][n] for n in names]
    best = {f"best_{k}": v for k, v in state["metrics"].items() if k.startswith("val_")}
    best["best_epoch"] = state["epoch"]
    c.log_batch(run_id, metrics=[__import__("mlflow").entities.Metric(k, float(v), int(time.time() * 1000), 0)
                                 for k, v in best.items() if v is not None and math.isfinite(float(v))])
    ap = [float("nan") if a is None else a for a in state["per_class_ap"]]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "per_class_ap.csv").write_text(tracking.per_class_table(names, ap, counts, groups))
        tracking.per_class_chart(names, ap, counts, groups, Path(tmp) / "per_class_ap.png",
                                 f"{cfg.loss.name} / {cfg.model.name}: val mAP {state['metrics']['val_mAP']:.3f} (epoch {state['epoch'] + 1})")
        c.log_artifact(run_id, str(Path(tmp) / "per_class_ap.csv"), "evaluation")
        c.log_artifact(run_id, str(Path(tmp) / "per_class_ap.png"), "evaluation")
    if not c.search_logged_models(experiment_ids=[c.get_run(run_id).info.experiment_id],
                                  filter_string=f"source_run_id = '{run_id}'"):
        tracking.log_model(run_id, cfg.tracking.tracking_uri, state["model"], cfg.model.name, cfg.model.in_chans,
                           cfg.data.image_size, names)
    c.set_terminated(run_id, "FINISHED")
    if (restarts := tracking.restarts(c, run_id)):  # after a worker failure or a rerun of the same run name
        log(f"[train] this MLflow run resumed {len(restarts)}x, from the checkpoints of epochs "
            f"{', '.join(map(str, restarts))} (MLflow metric {tracking.RESTART_METRIC})")
    log(f"[train] best epoch {state['epoch'] + 1}: val mAP {state['metrics']['val_mAP']:.4f} "
        f"(head {state['metrics']['val_mAP_head']:.4f}, medium {state['metrics']['val_mAP_medium']:.4f}, "
        f"tail {state['metrics']['val_mAP_tail']:.4f}); model logged to runs:/{run_id}/model")
    return {"run_id": run_id, **best}


def run_training(cfg: Config, address: str | None = None, log=print) -> dict:
    """The whole ``ralflow train`` job: checks, MLflow run, Ray Train fit, model + artifacts."""
    from workflows.raylib import check_shared_path, init_ray

    manifest, c, run_id = prepare_run(cfg, log)
    init_ray(address, log=log)
    check_shared_path(cfg.tracking.storage_path, "--storage-path")
    if cfg.tracking.tracking_uri.startswith("sqlite:///"):
        check_shared_path(str(Path(cfg.tracking.tracking_uri[len("sqlite:///"):]).parent), "the SQLite tracking store in")
    trainer = build_trainer(cfg, manifest, run_id)
    try:
        result = trainer.fit()
    except Exception:
        c.set_terminated(run_id, "FAILED")
        raise
    if result.error:
        c.set_terminated(run_id, "FAILED")
        raise result.error
    state = best_checkpoint_state(result, trainer.train_loop_config["storage_dir"], run_id)
    prune_unregistered_checkpoints(result)
    return finish_run(cfg, manifest, c, run_id, state, log)
