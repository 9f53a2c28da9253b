"""Calibrated probabilities and operating thresholds, fitted on validation and stored with the
registered model.

- **Calibration** maps a class's raw probability to a calibrated one without changing any class's
  ranking (so AP and mAP are unchanged; outputs are float64, where a strictly increasing map keeps
  distinct float32 inputs distinct): ``temperature`` (one temperature on the logits, fitted by
  masked binary cross-entropy) or ``isotonic`` (per class; isotonic regression is a step function,
  so a 1e-6 share of the raw probability is added to keep it strictly increasing and ties apart).
- **Thresholds** per class on the calibrated probability: ``max-f1`` (the threshold of best F1 on
  validation) or ``youden`` (the one maximising sensitivity + specificity - 1). A class with no
  positive or no negative validation label keeps 0.5.

- **Logit adjustment** (Menon et al.): ``logit - tau * log prior`` per class, applied before the
  calibration, with ``tau`` chosen on validation (the best macro F1 at 0.5) or given. A shift per
  class leaves each class's ranking, and so its AP, unchanged; it moves rare classes' probabilities
  up, which changes decisions made at one common threshold and rankings across classes.

Decisions are ``probability >= threshold``.
"""

from __future__ import annotations

import math

import numpy as np

CALIBRATIONS = ("none", "temperature", "isotonic")
THRESHOLDS = ("none", "max-f1", "youden")
TIE_BREAK = 1e-6  # keeps isotonic calibration strictly increasing: rankings, and so AP, unchanged
EPS = 1e-12  # clip for logits: small enough not to merge the float32 probabilities of real models


def logit(p: np.ndarray) -> np.ndarray:
    """Probabilities to logits (clipped at EPS, so 0 and 1 stay finite)."""
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def fit_calibration(method: str, probs: np.ndarray, targets: np.ndarray, masks: np.ndarray | None = None) -> dict:
    """A calibration (a JSON-able dict) fitted on validation probabilities and labels."""
    if method not in CALIBRATIONS:
        raise ValueError(f"calibration {method!r} is invalid; allowed: {' | '.join(CALIBRATIONS)}")
    probs, targets = np.asarray(probs, np.float64), np.asarray(targets, np.float64)
    masks = np.ones_like(targets) if masks is None else np.asarray(masks, np.float64)
    if method == "none":
        return {"method": "none"}
    if method == "temperature":
        from scipy.optimize import minimize_scalar

        z, keep = logit(probs), masks > 0

        def nll(log_t: float) -> float:
            q = np.clip(sigmoid(z / math.exp(log_t)), EPS, 1 - EPS)
            return float(-(targets * np.log(q) + (1 - targets) * np.log(1 - q))[keep].mean())

        best = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
        return {"method": "temperature", "temperature": float(math.exp(best.x))}
    from sklearn.isotonic import IsotonicRegression

    xs, ys = [], []
    for c in range(probs.shape[1]):
        keep = masks[:, c] > 0
        y = targets[keep, c]
        if keep.sum() < 2 or y.min() == y.max():  # nothing to fit: identity
            xs.append([0.0, 1.0])
            ys.append([0.0, 1.0])
            continue
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(probs[keep, c], y)
        xs.append(iso.X_thresholds_.tolist())
        ys.append(iso.y_thresholds_.tolist())
    return {"method": "isotonic", "x": xs, "y": ys}


TAU_GRID = tuple(np.round(np.arange(0.0, 2.01, 0.25), 2).tolist())


def adjust_logits(probs: np.ndarray, adjustment: dict | None) -> np.ndarray:
    """Probabilities after ``logit - tau * log prior`` (float64; unchanged without an adjustment)."""
    probs = np.asarray(probs, np.float64)
    if not adjustment or not adjustment.get("tau"):
        return probs
    return sigmoid(logit(probs) - adjustment["tau"] * np.asarray(adjustment["log_prior"], np.float64)[None, :])


def macro_f1(probs: np.ndarray, targets: np.ndarray, masks: np.ndarray | None = None, cut: float = 0.5) -> float:
    """Macro F1 of ``probs >= cut`` over the classes with a positive label (masked labels skipped)."""
    pred, y = np.asarray(probs) >= cut, np.asarray(targets) > 0.5
    keep = np.ones_like(y) if masks is None else np.asarray(masks) > 0
    scores = []
    for c in range(y.shape[1]):
        k = keep[:, c]
        tp, positives = (pred[k, c] & y[k, c]).sum(), y[k, c].sum()
        if positives:
            scores.append(2 * tp / max(pred[k, c].sum() + positives, 1))
    return float(np.mean(scores)) if scores else float("nan")


def fit_logit_adjustment(probs, targets, masks, prior, tau: float | None = None) -> dict:
    """``{"tau", "log_prior", "macro_f1_at_0.5"}``: ``tau`` as given, or the one of ``TAU_GRID``
    with the best macro F1 at 0.5 on these validation outputs."""
    log_prior = np.log(np.clip(np.asarray(prior, np.float64), 1e-6, 1.0))
    scored = {t: macro_f1(adjust_logits(probs, {"tau": t, "log_prior": log_prior}), targets, masks)
              for t in ((tau,) if tau is not None else TAU_GRID)}  # fmt: skip
    best = max(scored, key=lambda t: -np.inf if np.isnan(scored[t]) else scored[t])
    return {"tau": float(best), "log_prior": log_prior.tolist(), "macro_f1_at_0.5": scored[best]}


def apply_calibration(calibration: dict | None, probs: np.ndarray) -> np.ndarray:
    probs = adjust_logits(probs, (calibration or {}).get("logit_adjust"))
    method = (calibration or {}).get("method", "none")
    if method == "none":
        out = probs
    elif method == "temperature":
        out = sigmoid(logit(probs) / calibration["temperature"])
    elif method == "isotonic":
        out = np.stack(
            [np.interp(probs[:, c], calibration["x"][c], calibration["y"][c]) for c in range(probs.shape[1])], axis=1
        )
        out = (1 - TIE_BREAK) * out + TIE_BREAK * probs
    else:
        raise ValueError(f"unknown calibration method {method!r}")
    return out  # float64: a compressing map in float32 would merge neighbours and so change rankings


def fit_thresholds(
    method: str, probs: np.ndarray, targets: np.ndarray, masks: np.ndarray | None = None
) -> list[float] | None:
    """One threshold per class (on the probabilities given), or None for ``none``."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    if method not in THRESHOLDS:
        raise ValueError(f"thresholds {method!r} is invalid; allowed: {' | '.join(THRESHOLDS)}")
    if method == "none":
        return None
    masks = np.ones_like(targets) if masks is None else masks
    out = []
    for c in range(probs.shape[1]):
        keep = np.asarray(masks)[:, c] > 0
        y, p = np.asarray(targets)[keep, c], np.asarray(probs)[keep, c]
        if y.size == 0 or y.min() == y.max():
            out.append(0.5)
            continue
        if method == "max-f1":
            precision, recall, cuts = precision_recall_curve(y, p)
            f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
            out.append(float(cuts[int(np.argmax(f1))]))
        else:
            fpr, tpr, cuts = roc_curve(y, p)
            best = int(np.argmax(tpr - fpr))
            out.append(float(min(cuts[best], 1.0)))  # roc_curve's first cut is +inf
    return out


def decide(probs: np.ndarray, thresholds) -> np.ndarray:
    """0/1 findings: probability >= the class's threshold."""
    return (np.asarray(probs) >= np.asarray(thresholds, np.float32)[None, :]).astype(np.int8)
