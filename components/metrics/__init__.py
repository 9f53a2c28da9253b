"""Multi-label ranking metrics (the CXR-LT ones), computed with scikit-learn.

Classes with no positive (or no negative) in the evaluated set have an undefined AP/AUROC;
they are reported as NaN and left out of the macro averages, as in the CXR-LT evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

GROUPS = ("head", "medium", "tail")


def per_class_ap(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    from sklearn.metrics import average_precision_score  # imported on use: `ralflow --help` needs none of it

    return _per_class(average_precision_score, probs, targets, mask, need_negative=False)


def per_class_auroc(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    from sklearn.metrics import roc_auc_score

    return _per_class(roc_auc_score, probs, targets, mask, need_negative=True)


def _per_class(fn, probs, targets, mask, need_negative: bool) -> np.ndarray:
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets)
    if probs.shape != targets.shape or probs.ndim != 2:
        raise ValueError(f"probs {probs.shape} and targets {targets.shape} must both be (N, C)")
    out = np.full(probs.shape[1], np.nan)
    for c in range(probs.shape[1]):
        keep = np.ones(len(probs), bool) if mask is None else np.asarray(mask)[:, c] > 0
        t = targets[keep, c] > 0.5
        if t.sum() == 0 or (need_negative and t.sum() == len(t)):
            continue
        out[c] = fn(t, probs[keep, c])
    return out


def fmt(value, digits: int = 4) -> str:
    """A metric for people: ``n/a`` where it is undefined (e.g. no tail class in this dataset)."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def nanmean(values) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else math.nan


def group_means(values, groups: Sequence[str], empty=math.nan) -> dict:
    """``{group: mean of the values of its classes}`` for head, medium and tail (NaN values left
    out); ``empty`` for a group without classes."""
    v, g = np.asarray(values, dtype=np.float64), np.asarray(groups)
    return {name: nanmean(v[g == name]) if (g == name).any() else empty for name in GROUPS}


def multilabel_metrics(
    probs: np.ndarray,
    targets: np.ndarray,
    groups: Sequence[str] | None = None,
    mask: np.ndarray | None = None,
) -> dict:
    """Macro mAP, macro AUROC, per-class AP and (when ``groups`` given) head/medium/tail mAP."""
    ap = per_class_ap(probs, targets, mask)
    out = {"mAP": nanmean(ap), "AUROC": nanmean(per_class_auroc(probs, targets, mask)), "per_class_ap": ap}
    if groups is not None:
        out.update({f"mAP_{name}": value for name, value in group_means(ap, groups).items()})
    return out


def validation_metrics(
    probs: np.ndarray,
    targets: np.ndarray,
    masks: np.ndarray,
    groups: Sequence[str],
    study_ids: Sequence[str] | None = None,
    views: Sequence[str] | None = None,
) -> dict:
    """The per-epoch validation record: ``val_mAP``, ``val_AUROC``, ``val_mAP_<group>`` and
    ``per_class_ap`` (None where undefined), as logged to MLflow and kept in checkpoints; with the
    images' studies, also ``val_mAP_study``: the same images scored with their study's
    ``view-mean`` probabilities (``components.studies``)."""
    m = multilabel_metrics(probs, targets, groups, mask=masks)
    out = {"val_mAP": m["mAP"], "val_AUROC": m["AUROC"]}
    for g in GROUPS:
        out[f"val_mAP_{g}"] = m[f"mAP_{g}"]
    if study_ids is not None and len(probs):
        from ..studies import aggregate

        out["val_mAP_study"] = multilabel_metrics(aggregate(probs, study_ids, views), targets, mask=masks)["mAP"]
    out["per_class_ap"] = [None if math.isnan(a) else float(a) for a in m["per_class_ap"]]
    return out
