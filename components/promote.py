"""Promotion (MLflow 3 aliases, no stages): register a run's model and move the ``champion``
alias only when it beats the current champion on the same validation data (same dataset
checksum) by the margin; otherwise it becomes ``challenger``. Forcing needs a recorded reason."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .config import TRACKING_URI_DEFAULT, setting
from .errors import UserError

CHAMPION, CHALLENGER = "champion", "challenger"
METRIC = "best_val_mAP"


@dataclass
class PromoteOptions:
    model_name: str = setting(help="registered model name")
    tracking_uri: str | None = setting(None, help=f"MLflow tracking/registry URI {TRACKING_URI_DEFAULT}")
    run_id: str | None = setting(None, help="run whose model to register (default: the best run by validation mAP)")
    experiment: str = setting("ralflow", help="where to look for the best run")
    margin: float = setting(0.0, help="required mAP improvement over the champion")
    force: bool = setting(False, help="make it champion regardless (needs --reason)")
    reason: str | None = setting(None, help="why it is forced; recorded on the version")


@dataclass
class Decision:
    alias: str
    reason: str


def best_run(c, experiment: str):
    """The finished training run (or trial) with the highest validation mAP and a logged model."""
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(f"no MLflow experiment '{experiment}' at this tracking URI")
    runs = c.search_runs(
        [exp.experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        order_by=[f"metrics.{METRIC} DESC"],
        max_results=50,
    )
    for run in runs:
        if METRIC in run.data.metrics and "ralflow.sweep_parent" not in run.data.tags and has_model(c, run):
            return run
    raise UserError(f"no finished run with a logged model and metric {METRIC} in experiment '{experiment}'")


def has_model(c, run) -> bool:
    from .tracking import logged_models

    return bool(logged_models(c, run.info.experiment_id, run.info.run_id))


def decide(
    candidate_map: float, candidate_sha: str, champion, margin: float, force: bool, reason: str | None
) -> Decision:
    if force:
        if not reason or not reason.strip():
            raise UserError("force needs a reason (it is recorded on the model version)", field="reason")
        return Decision(CHAMPION, f"forced: {reason.strip()}")
    if champion is None:
        return Decision(CHAMPION, "first version: no current champion")
    champ_sha = champion.tags.get("dataset_sha256")
    if champ_sha != candidate_sha:
        raise UserError(
            f"refused: the candidate was validated on dataset {candidate_sha[:12]} but champion v{champion.version} on "
            f"{(champ_sha or 'unknown')[:12]}; their mAPs are not comparable (force it, with a reason, to override)"
        )
    champ_map = float(champion.tags.get("val_mAP", "nan"))
    # Strictly better: a tie is no reason to move the alias (and a rerun of the same model ties).
    if candidate_map > champ_map + margin:
        return Decision(
            CHAMPION,
            f"val mAP {candidate_map:.4f} beats champion v{champion.version} {champ_map:.4f} + margin {margin}",
        )
    return Decision(
        CHALLENGER,
        f"val mAP {candidate_map:.4f} does not beat champion v{champion.version} {champ_map:.4f} + margin {margin}",
    )


def promote(opts: PromoteOptions) -> dict:
    from mlflow.exceptions import MlflowException

    from .config import default_tracking_uri
    from .tracking import ModelRegistry, check_tracking_uri, client

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", opts.model_name):
        raise UserError(
            f"model_name {opts.model_name!r} is invalid; use letters, digits, '.', '_' and '-'", field="model_name"
        )
    uri = opts.tracking_uri or default_tracking_uri()
    check_tracking_uri(uri)
    c = client(uri)
    if opts.margin < 0:
        raise UserError(f"margin must be >= 0, got {opts.margin}", field="margin")
    if opts.run_id:
        try:
            run = c.get_run(opts.run_id)
        except MlflowException:
            raise UserError(f"run_id {opts.run_id}: no such run at {uri}", field="run_id") from None
        if not has_model(c, run):
            raise UserError(f"run_id {opts.run_id}: the run has no logged model", field="run_id")
    else:
        run = best_run(c, opts.experiment)
    metrics, tags, params = run.data.metrics, run.data.tags, run.data.params
    if METRIC not in metrics or "ralflow.dataset_sha256" not in tags:
        raise UserError(
            f"run {run.info.run_id} has no {METRIC} metric or dataset checksum: not a ralflow training run",
            field="run_id",
        )
    cand_map, cand_sha = metrics[METRIC], tags["ralflow.dataset_sha256"]
    registry = ModelRegistry(uri)
    # Idempotent: a run is registered once; promoting it again decides again for that version.
    existing = registry.version_of_run(opts.model_name, run.info.run_id)
    champion = registry.alias_version(opts.model_name, CHAMPION)
    if existing is not None and champion is not None and champion.version == existing.version:
        return {
            "already": True,
            "version": int(existing.version),
            "alias": CHAMPION,
            "run_id": run.info.run_id,
            "reason": f"run {run.info.run_id} is already version {existing.version}, the champion",
            "val_mAP": cand_map,
            "previous_champion": int(champion.version),
        }
    decision = decide(cand_map, cand_sha, champion, opts.margin, opts.force, opts.reason)
    loss_params = {k[len("loss.params.") :]: v for k, v in params.items() if k.startswith("loss.params.")}
    lineage = {
        "dataset_sha256": cand_sha,
        "loss": tags.get("ralflow.loss", params.get("loss.name", "")),
        "loss_params": json.dumps(loss_params, sort_keys=True),
        "model": tags.get("ralflow.model", params.get("model.name", "")),
        "val_mAP": f"{cand_map:.6f}",
        **{
            f"val_mAP_{g}": f"{metrics[f'best_val_mAP_{g}']:.6f}"
            for g in ("head", "medium", "tail")
            if f"best_val_mAP_{g}" in metrics
        },
        "source_run_id": run.info.run_id,
        "git_commit": tags.get("ralflow.git_commit", "unknown"),
        "promotion.decision": decision.alias,
        "promotion.reason": decision.reason,
    }
    if opts.force:
        lineage["promotion.forced_reason"] = opts.reason.strip()
    if existing is None:
        version = registry.register(opts.model_name, run.info.run_id, lineage)
    else:
        version = int(existing.version)
        registry.set_tags(opts.model_name, version, {k: v for k, v in lineage.items() if k.startswith("promotion.")})
    registry.set_alias(opts.model_name, decision.alias, version)
    return {
        "already": existing is not None,
        "version": version,
        "alias": decision.alias,
        "reason": (f"already version {version}; " if existing is not None else "") + decision.reason,
        "run_id": run.info.run_id,
        "val_mAP": cand_map,
        "previous_champion": None if champion is None else int(champion.version),
    }
