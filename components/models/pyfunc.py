"""The registered model: an MLflow pyfunc mapping uint8 images to per-class probabilities.

It owns its input contract (``components.models.inputs``): callers pass raw 8-bit pixels, of
any size, and the model resizes and normalises them as training did. ``label_names`` in the
model's metadata give the output columns' order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

try:
    import mlflow.pyfunc as _pyfunc

    _PythonModel = _pyfunc.PythonModel
except Exception:  # pragma: no cover - mlflow is a dependency; keep imports of this module cheap
    _PythonModel = object


class ChestXrayClassifier(_PythonModel):
    """pyfunc: uint8 images (N, H, W) or (N, C_in, H, W), any size -> (N, classes) probabilities."""

    # The logged signature describes the input; this skips MLflow's type-hint based wrapping of
    # predict and its warning about missing hints.
    _skip_type_hint_validation = True

    def load_context(self, context):
        import torch

        from . import build_model

        spec = json.loads(Path(context.artifacts["spec"]).read_text())
        self.label_names = spec["label_names"]
        self.image_size, self.in_chans = spec["image_size"], spec["in_chans"]
        self.model = build_model(spec["model"], len(self.label_names), self.in_chans)
        self.model.load_state_dict(torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True))
        self.model.eval()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)

    def predict(self, context, model_input, params=None):
        import torch

        from .inputs import to_model_input

        x = to_model_input(np.asarray(model_input), self.image_size, self.in_chans, self.device)
        with torch.inference_mode():
            return torch.sigmoid(self.model(x).float()).cpu().numpy()


def signature(in_chans: int, num_classes: int):
    """uint8 images of any height and width in, float32 probabilities out."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, in_chans, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]),
    )
