"""Hyperparameter sweeps on Ray Tune: ``space`` (search spaces), ``sweep`` (the sweep and its
trials, each a training run) and ``report`` (the trials table and plot)."""

from .sweep import SweepOptions, run_sweep

__all__ = ["SweepOptions", "run_sweep"]
