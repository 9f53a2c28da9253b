"""Runs that start from another run: a second stage (``train.init_from``) such as decoupled
classifier re-training (cRT, ``train.head_only``), linked to the run it starts from in MLflow."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..data.manifest import Manifest
from ..errors import UserError


@dataclass
class InitWeights:
    """The logged model of the first stage: its weights and what they were built as."""

    run_id: str
    spec: dict
    state: dict

    def tags(self, head_only: bool) -> dict:
        """MLflow tags of the second stage: nested under the first run in the UI."""
        return {
            "mlflow.parentRunId": self.run_id,
            "ralflow.init_from": self.run_id,
            "ralflow.stage": "crt" if head_only else "fine-tune",
        }


def load_init_weights(cfg: Config, manifest: Manifest, log=print) -> InitWeights | None:
    """The weights of run ``train.init_from``'s logged model, checked against this config."""
    run_id = cfg.train.init_from
    if not run_id:
        return None
    import mlflow
    import torch

    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            files = {
                name: mlflow.artifacts.download_artifacts(
                    artifact_uri=f"runs:/{run_id}/model/artifacts/{name}", dst_path=tmp
                )
                for name in ("spec.json", "weights.pt")
            }
            spec = json.loads(Path(files["spec.json"]).read_text())
            state = torch.load(files["weights.pt"], map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unknown run, no logged model, unreachable store
        raise UserError(
            f"train.init_from {run_id}: no logged ralflow model there ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''})",
            field="train.init_from",
        ) from None
    m = cfg.model
    built_as = (spec["model"], spec.get("head", "linear"), spec["in_chans"])
    if built_as != (m.name, m.head, m.in_chans):
        raise UserError(
            f"train.init_from {run_id}: its model is {built_as[0]} with a {built_as[1]} head and "
            f"{built_as[2]} input channel(s); this run builds {m.name} / {m.head} / {m.in_chans} "
            "(set model.name, model.head and model.in_chans to match)",
            field="train.init_from",
        )
    if spec["label_names"] != list(manifest.label_names) and not cfg.train.head_only:
        raise UserError(
            f"train.init_from {run_id}: its labels ({len(spec['label_names'])}) are not this dataset's "
            f"({len(manifest.label_names)}); re-train the head for them with --train-head-only, or start "
            "from its backbone with model.pretrained_path",
            field="train.init_from",
        )
    log(f"[train] starting from the model of run {run_id} ({len(state)} tensors)")
    return InitWeights(run_id, spec, state)


def apply_init(model, init: InitWeights | None, head_only: bool, num_classes: int) -> None:
    """Load the first stage's weights; with ``head_only``, re-initialise the classifier and
    freeze everything else (cRT)."""
    from ..models.heads import classifier_parameter_names, freeze_backbone

    if init is not None:
        state = init.state
        if head_only:  # the classifier starts afresh: its old tensors may not even fit
            head = classifier_parameter_names(model)
            state = {k: v for k, v in state.items() if k not in head}
        _, unexpected = model.load_state_dict(state, strict=not head_only)
        if unexpected:
            raise UserError(f"train.init_from {init.run_id}: unexpected tensors {unexpected[:3]}")
    if head_only:
        model.reset_classifier(num_classes)
        freeze_backbone(model)
