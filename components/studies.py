"""Study-level prediction: CXR-LT labels belong to a study (one visit: a frontal film and often a
lateral), so the winners score each image with its study's aggregated probabilities.

``aggregate`` replaces every image's row by its study's value, keeping one row per image (the
CXR-LT submission is one row per ``dicom_id``):

- ``none``: each image alone;
- ``mean`` / ``max``: over the study's images;
- ``view-mean``: the mean within the frontal views and within the lateral views, then the mean of
  those group means, so a study with two frontals and one lateral weighs the lateral as much as
  the frontals together.
"""

from __future__ import annotations

import numpy as np

AGGREGATES = ("none", "mean", "max", "view-mean")
LATERAL_VIEWS = frozenset({"LATERAL", "LL", "RL", "LAT", "LATERAL-LEFT", "LATERAL-RIGHT"})


def is_lateral(view) -> bool:
    return str(view).strip().upper() in LATERAL_VIEWS


def _group_mean(values: np.ndarray, groups: np.ndarray, n: int) -> np.ndarray:
    sums = np.zeros((n, values.shape[1]), np.float64)
    np.add.at(sums, groups, values)
    with np.errstate(invalid="ignore", divide="ignore"):  # an empty group: NaN, skipped by nanmean
        return sums / np.bincount(groups, minlength=n)[:, None]


def aggregate(probs: np.ndarray, study_ids, views=None, how: str = "view-mean") -> np.ndarray:
    """(N, C) image probabilities -> (N, C): each row its study's aggregate (see module doc)."""
    if how not in AGGREGATES:
        raise ValueError(f"aggregate {how!r} is invalid; allowed: {' | '.join(AGGREGATES)}")
    probs = np.asarray(probs, np.float64)
    if how == "none" or len(probs) == 0:
        return probs.astype(np.float32)
    _, study = np.unique(np.asarray(study_ids).astype(str), return_inverse=True)
    n = int(study.max()) + 1
    if how == "mean":
        out = _group_mean(probs, study, n)
    elif how == "max":
        out = np.full((n, probs.shape[1]), -np.inf)
        np.maximum.at(out, study, probs)
    else:
        lateral = np.array([is_lateral(v) for v in (views if views is not None else [""] * len(probs))])
        group = study * 2 + lateral  # (study, frontal or lateral)
        means = _group_mean(probs, group, 2 * n)  # NaN rows: a study without that kind of view
        out = np.nanmean(means.reshape(n, 2, -1), axis=1)  # every study has at least one group
    return out[study].astype(np.float32)
