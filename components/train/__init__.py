"""Training on Ray Train: ``build`` (model, loss, optimiser from the config), ``loop`` (the
worker), ``checkpoints`` and ``trainer`` (the driver side, shared with Tune trials)."""

from .trainer import run_training

__all__ = ["run_training"]
