"""Re-balanced sampling in the Ray Data stream (Ray Data has no sampler), and the seeds that make
a training epoch's data reproducible.

A ``SamplingPlan`` is computed once, on the driver, from the training split's labels. It gives
every image an expected number of copies per epoch, ``rate(labels)``:

- ``repeat-factor`` (LVIS): a class seen in a fraction ``f_c`` of the images has repeat factor
  ``r_c = max(1, sqrt(t / f_c))``; an image takes the factor of its rarest positive label (1 with
  none). Epochs grow by the mean factor.
- ``class-aware`` (Shen et al.): as drawing a class uniformly, then one of its images; an image's
  rate is ``N / K * sum over its positive classes of 1 / n_c`` (K classes with positives, images
  with none form one more "class"), so an epoch keeps N images.

The Ray Data read task of each row group turns rates into counts by stochastic rounding
(``floor(r) + Bernoulli(r - floor(r))``, so each image's expected count is its rate) and
permutes the copies (with ``none``: the rows) inside the row group, with a generator seeded by (``train.seed``, the
dataset's execution index, the row group): every epoch draws afresh, and two runs with the same
seed draw the same. The same seed gives each row group's augmentation its generator.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

SAMPLINGS = ("none", "repeat-factor", "class-aware")
AUG_SEED_COLUMN = "aug_seed"  # per row: the augmentation generator's seed of its row group


def positives(labels, masks=None) -> np.ndarray:
    """(N, C) bool: known positive labels (a masked label is unknown, not positive)."""
    y = np.asarray(labels, np.float32) > 0.5
    return y if masks is None else y & (np.asarray(masks, np.float32) > 0)


@dataclass(frozen=True)
class SamplingPlan:
    """Per-class factors of one sampling mode, and what one epoch looks like in expectation."""

    mode: str = "none"
    class_factor: tuple = ()  # repeat-factor: r_c; class-aware: N / (K n_c)
    empty_factor: float = 1.0  # the rate of an image with no positive label
    seed: int = 0
    expected_images: float = 0.0  # expected images per epoch
    target_freq: tuple = ()  # expected share of an epoch's images positive for each class
    natural_freq: tuple = ()  # the same without re-sampling

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def rates(self, labels, masks=None) -> np.ndarray:
        """Each image's expected copies per epoch."""
        pos = positives(labels, masks)
        if not self.active:
            return np.ones(len(pos))
        factor = np.asarray(self.class_factor, np.float64)
        if self.mode == "repeat-factor":
            out = np.where(pos, factor[None, :], 1.0).max(axis=1, initial=1.0)
        else:
            out = (pos * factor[None, :]).sum(axis=1)
        return np.where(pos.any(axis=1), out, self.empty_factor)

    def counts(self, labels, masks, rng: np.random.Generator) -> np.ndarray:
        """Copies of each image this epoch: the rates, stochastically rounded."""
        r = self.rates(labels, masks)
        whole = np.floor(r)
        return (whole + (rng.random(len(r)) < r - whole)).astype(np.int64)


def plan_sampling(mode: str, labels, masks=None, threshold: float = 0.1, seed: int = 0) -> SamplingPlan:
    """The plan of ``mode`` for a training split with these labels (N, C)."""
    if mode not in SAMPLINGS:
        raise ValueError(f"sampling {mode!r} is invalid; allowed: {' | '.join(SAMPLINGS)}")
    pos = positives(labels, masks)
    n = len(pos)
    n_c = pos.sum(axis=0).astype(np.float64)
    natural = tuple((n_c / max(n, 1)).tolist())
    if mode == "none" or n == 0:
        return SamplingPlan("none", seed=seed, expected_images=float(n), target_freq=natural, natural_freq=natural)
    empty = ~pos.any(axis=1)
    if mode == "repeat-factor":
        freq = n_c / n
        factor = np.where(n_c > 0, np.maximum(1.0, np.sqrt(threshold / np.maximum(freq, 1e-12))), 1.0)
        empty_factor = 1.0
    else:
        k = int((n_c > 0).sum()) + int(empty.any())
        factor = np.where(n_c > 0, n / (k * np.maximum(n_c, 1)), 0.0)
        empty_factor = n / (k * empty.sum()) if empty.any() else 0.0
    plan = SamplingPlan(mode, tuple(factor.tolist()), float(empty_factor), seed)
    r = plan.rates(pos)
    target = (r[:, None] * pos).sum(axis=0) / max(r.sum(), 1e-12)
    return dataclasses.replace(
        plan, expected_images=float(r.sum()), target_freq=tuple(target.tolist()), natural_freq=natural
    )


def epoch_rng(seed: int, execution: int, row_group: int) -> np.random.Generator:
    """The generator of one row group in one execution (epoch) of the dataset."""
    return np.random.default_rng([seed, execution, row_group])


def current_execution() -> int:
    """Which execution of the dataset this task belongs to: Ray Data counts the executions of a
    dataset (one per training epoch) in its context, which its tasks run under. 0 when unknown."""
    from ray.data import DataContext

    return int(getattr(DataContext.get_current(), "_execution_idx", 0) or 0)


def sample_row_group(table, plan: SamplingPlan | None, row_group: int, execution: int | None = None):
    """A row group's rows for this epoch: repeated by ``plan`` and permuted (as read when None),
    with the row group's augmentation seed as a column."""
    import pyarrow as pa

    if plan is None:
        return table
    execution = current_execution() if execution is None else execution
    rng = epoch_rng(plan.seed, execution, row_group)
    aug_seed = int(rng.integers(0, 2**62))
    if plan.active:
        labels = np.stack(table.column("labels").to_numpy(zero_copy_only=False))
        masks = np.stack(table.column("mask").to_numpy(zero_copy_only=False))
        order = rng.permutation(np.repeat(np.arange(len(labels)), plan.counts(labels, masks, rng)))
    else:  # shards keep the source's order (a patient's films side by side): batches mix them
        order = rng.permutation(table.num_rows)
    table = table.take(pa.array(order, pa.int64()))
    return table.append_column(AUG_SEED_COLUMN, pa.array(np.full(table.num_rows, aug_seed, np.int64)))


def read_split_labels(paths: list[str]):
    """(labels, masks) of every image in these shards, reading only those columns."""
    import pyarrow.parquet as pq

    from ..paths import filesystem_for

    labels, masks = [], []
    for path in paths:
        filesystem, inner = filesystem_for(path)
        with filesystem.open_input_file(inner) as f:
            t = pq.read_table(f, columns=["labels", "mask"])
        labels.extend(t.column("labels").to_pylist())
        masks.extend(t.column("mask").to_pylist())
    return np.asarray(labels, np.float32), np.asarray(masks, np.float32)


@dataclass
class ClassTally:
    """Positive labels seen per class over an epoch (the effective class frequencies)."""

    positives: object = None  # (C,) tensor, summed where the batches are (no sync per batch)
    images: int = 0

    def add(self, labels, masks) -> None:
        pos = ((labels > 0.5) & (masks > 0)).sum(0)
        self.positives = pos if self.positives is None else self.positives + pos
        self.images += len(labels)

    def counts(self, num_classes: int) -> np.ndarray:
        return np.zeros(num_classes) if self.positives is None else self.positives.double().cpu().numpy()
