"""Model registry workflow (MLflow 3 aliases, no stages): register a run's model and move the
``champion`` alias only when it beats the current champion on the same validation data."""
from __future__ import annotations

import json
from dataclasses import dataclass

from .errors import UserError

CHAMPION, CHALLENGER = "champion", "challenger"
METRIC = "best_val_mAP"


@dataclass
class Decision:
    alias: str
    reason: str


def best_run(c, experiment: str):
    """The finished training run (or trial) with the highest validation mAP and a logged model."""
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(f"no MLflow experiment '{experiment}' at this tracking URI")
    runs = c.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                         order_by=[f"metrics.{METRIC} DESC"], max_results=50)
    for run in runs:
        if METRIC in run.data.metrics and "ralflow.sweep_parent" not in run.data.tags and has_model(c, run):
            return run
    raise UserError(f"no finished run with a logged model and metric {METRIC} in experiment '{experiment}'")


def has_model(c, run) -> bool:
    return bool(c.search_logged_models(experiment_ids=[run.info.experiment_id],
                                       filter_string=f"source_run_id = '{run.info.run_id}'"))


def current_champion(c, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def decide(candidate_map: float, candidate_sha: str, champion, margin: float, force: bool, reason: str | None) -> Decision:
    if force:
        if not reason or not reason.strip():
            raise UserError("--force needs --reason TEXT (it is recorded on the model version)")
        return Decision(CHAMPION, f"forced: {reason.strip()}")
    if champion is None:
        return Decision(CHAMPION, "first version: no current champion")
    champ_sha = champion.tags.get("dataset_sha256")
    if champ_sha != candidate_sha:
        raise UserError(
            f"refused: the candidate was validated on dataset {candidate_sha[:12]} but champion v{champion.version} on "
            f"{(champ_sha or 'unknown')[:12]}; their mAPs are not comparable (use --force --reason to override)")
    champ_map = float(champion.tags.get("val_mAP", "nan"))
    if candidate_map >= champ_map + margin:
        return Decision(CHAMPION, f"val mAP {candidate_map:.4f} >= champion v{champion.version} {champ_map:.4f} + margin {margin}")
    return Decision(CHALLENGER, f"val mAP {candidate_map:.4f} < champion v{champion.version} {champ_map:.4f} + margin {margin}")


def promote(tracking_uri: str, model_name: str, run_id: str | None = None, experiment: str = "ralflow",
            margin: float = 0.0, force: bool = False, reason: str | None = None) -> dict:
    import mlflow
    from mlflow.exceptions import MlflowException

    from .tracking import check_tracking_uri, client

    check_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    c = client(tracking_uri)
    if margin < 0:
        raise UserError(f"--margin must be >= 0, got {margin}")
    if run_id:
        try:
            run = c.get_run(run_id)
        except MlflowException:
            raise UserError(f"--run-id {run_id}: no such run at {tracking_uri}") from None
        if not has_model(c, run):
            raise UserError(f"--run-id {run_id}: the run has no logged model")
    else:
        run = best_run(c, experiment)
    metrics, tags = run.data.metrics, run.data.tags
    if METRIC not in metrics or "ralflow.dataset_sha256" not in tags:
        raise UserError(f"run {run.info.run_id} has no {METRIC} metric or dataset checksum: not a ralflow training run")
    cand_map, cand_sha = metrics[METRIC], tags["ralflow.dataset_sha256"]
    champion = current_champion(c, model_name)
    decision = decide(cand_map, cand_sha, champion, margin, force, reason)
    params = run.data.params
    lineage = {
        "dataset_sha256": cand_sha,
        "loss": tags.get("ralflow.loss", params.get("loss.name", "")),
        "loss_params": json.dumps({k[len("loss.params."):]: v for k, v in params.items() if k.startswith("loss.params.")}, sort_keys=True),
        "model": tags.get("ralflow.model", params.get("model.name", "")),
        "val_mAP": f"{cand_map:.6f}",
        **{f"val_mAP_{g}": f"{metrics[f'best_val_mAP_{g}']:.6f}" for g in ("head", "medium", "tail") if f"best_val_mAP_{g}" in metrics},
        "source_run_id": run.info.run_id,
        "git_commit": tags.get("ralflow.git_commit", "unknown"),
        "promotion.decision": decision.alias,
        "promotion.reason": decision.reason,
    }
    if force:
        lineage["promotion.forced_reason"] = reason.strip()
    try:
        c.get_registered_model(model_name)
    except MlflowException:
        c.create_registered_model(model_name, description="ralflow chest X-ray classifier")
    mv = mlflow.register_model(f"runs:/{run.info.run_id}/model", model_name, tags=lineage)
    c.set_registered_model_alias(model_name, decision.alias, mv.version)
    return {"version": int(mv.version), "alias": decision.alias, "reason": decision.reason, "run_id": run.info.run_id,
            "val_mAP": cand_map, "previous_champion": None if champion is None else int(champion.version)}
