"""Per-epoch checkpoints in the run's storage folder: naming, saving, finding the one to resume
from, choosing the best, and pruning what Ray never registered."""

from __future__ import annotations

import re
from pathlib import Path

CHECKPOINT_FILE = "state.pt"
CHECKPOINT_DIR = re.compile(r"epoch-\d+")  # one folder per epoch in the run's storage folder


def checkpoint_dir_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def checkpoint_folders(fs, root: str) -> list:
    """FileInfos of the per-epoch checkpoint folders under ``root`` (missing root: none)."""
    import pyarrow.fs

    return [
        i
        for i in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
        if i.type == pyarrow.fs.FileType.Directory and CHECKPOINT_DIR.fullmatch(i.base_name)
    ]


OWNER_FILE = "run.json"  # the MLflow run a checkpoint belongs to, readable without loading the weights


def save_state(state: dict, folder: str | Path) -> None:
    import json

    import torch

    Path(folder).mkdir(parents=True, exist_ok=True)
    torch.save(state, Path(folder) / CHECKPOINT_FILE)
    (Path(folder) / OWNER_FILE).write_text(json.dumps({"run_id": state.get("run_id")}))


def checkpoint_owner(fs, folder: str) -> str | None:
    """The MLflow run id a checkpoint folder was written for (None: unreadable, or unknown)."""
    import json

    import ray.train

    try:
        with fs.open_input_stream(f"{folder}/{OWNER_FILE}") as f:
            return json.loads(f.read()).get("run_id")
    except (OSError, ValueError, AttributeError):
        pass
    try:  # written before OWNER_FILE existed
        return load_checkpoint_state(ray.train.Checkpoint(folder, filesystem=fs)).get("run_id")
    except Exception:  # noqa: BLE001 - half written or unreadable
        return None


def set_aside_checkpoints_of_another_run(storage_dir: str, run_id: str) -> str | None:
    """A new MLflow run whose storage folder holds another run's checkpoints (that run deleted
    from the store, or kept in another store under the same name) would resume from them: Ray
    restores its snapshot, and the new run would adopt another's training and miss its epochs'
    history. The folder is moved aside whole, kept, and the run starts fresh. Returns what was done."""
    import time

    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage_dir)
    folders = sorted((i.path for i in checkpoint_folders(fs, root)), reverse=True)
    owner = next(filter(None, (checkpoint_owner(fs, folder) for folder in folders)), None)
    if owner is None or owner == run_id:
        return None
    aside = f"{root}.of-run-{owner}"
    if fs.get_file_info(aside).type != pyarrow.fs.FileType.NotFound:
        aside = f"{aside}-{int(time.time())}"
    fs.move(root, aside)
    return (
        f"[train] {storage_dir} held the checkpoints of MLflow run {owner}, not this run's (deleted from the "
        f"store, or kept by another store under this name): moved to {aside}; training starts fresh"
    )


def load_checkpoint_state(checkpoint, device="cpu") -> dict:
    import torch

    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / CHECKPOINT_FILE, map_location=device, weights_only=False)


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


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of its checkpoints


def set_aside_stale_ray_snapshot(storage_dir: str) -> str | None:
    """Ray Train refuses to start a run whose snapshot is unreadable or names a checkpoint folder
    that is gone (an epoch trained again under the same folder name, whose older copy Ray then
    deleted). ralflow resumes from the checkpoints in storage, not from Ray's snapshot, so a stale
    one is renamed ``.stale`` instead of failing the run. Returns what was done, or None."""
    import json

    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage_dir)
    path = f"{root}/{RAY_SNAPSHOT}"
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return None
    try:
        with fs.open_input_stream(path) as f:
            state = json.loads(f.read())
        results = [*state.get("checkpoint_results", []), *state.get("pending_training_results", [])]
        if state.get("latest_checkpoint_result"):
            results.append(state["latest_checkpoint_result"])
        names = sorted({r["checkpoint_dir_name"] for r in results})
        missing = [n for n in names if fs.get_file_info(f"{root}/{n}").type == pyarrow.fs.FileType.NotFound]
        why = f"names checkpoint folder(s) that are gone: {', '.join(missing)}" if missing else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        why = f"is unreadable ({type(exc).__name__})"
    if why is None:
        return None
    fs.move(path, f"{path}.stale")
    return (
        f"[train] Ray Train's run snapshot {why}; set aside as {RAY_SNAPSHOT}.stale "
        "(resuming from the checkpoints in storage)"
    )
