"""The registered model: an MLflow pyfunc, logged as a *model from code* (this file is the model's
code; no pickled class), with the ``components`` package beside it, so it loads wherever its pip
requirements are installed, with or without ralflow.

Its input is a table with one column, ``image``: each value is an image file's bytes (PNG, JPEG
or DICOM) or a uint8 pixel array (H, W) or (1, H, W) of any size. The model decodes, resizes and
normalises them itself, exactly as ``ralflow prepare`` and ``ralflow predict`` do (one input
contract: ``components.data.images`` and ``components.models.inputs``). The output has one row of
per-class probabilities per image, in the order of the ``label_names`` in the model's metadata,
calibrated when the model was logged with a calibration; its per-class ``thresholds`` (metadata)
turn them into findings (``decide``).
An image that cannot be used raises ``ImageRejected`` naming the row and the reason.

Over REST (``mlflow models serve``): ``{"dataframe_split": {"columns": ["image"], "data":
[["<base64 of the file>"]]}}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.models
import mlflow.pyfunc
import numpy as np

INPUT_COLUMN = "image"


class ChestXrayClassifier(mlflow.pyfunc.PythonModel):
    # The logged signature describes the input; this skips MLflow's type-hint based wrapping of
    # predict and its warning about missing hints.
    _skip_type_hint_validation = True

    def load_context(self, context):
        import torch

        from components.models import build_model

        spec = json.loads(Path(context.artifacts["spec"]).read_text())
        self.label_names = spec["label_names"]
        self.image_size, self.in_chans = spec["image_size"], spec["in_chans"]
        head = {"head": spec.get("head", "linear"), "head_lambda": spec.get("head_lambda", 0.1)}
        self.model = build_model(spec["model"], len(self.label_names), self.in_chans, **head)
        self.model.load_state_dict(torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True))
        self.model.eval()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        decision = {}
        if "calibration" in context.artifacts:  # fitted on validation when the model was logged
            decision = json.loads(Path(context.artifacts["calibration"]).read_text())
        self.calibration = decision.get("calibration") or {"method": "none"}
        thresholds = decision.get("thresholds")
        self.thresholds = [thresholds[name] for name in self.label_names] if thresholds else None

    def predict(self, context, model_input, params=None):
        pixels = decode_column(images_of(model_input), self.image_size)
        return self.predict_pixels(pixels)

    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(N, S, S) uint8 (resized when S is not the model's size) -> (N, classes) float64
        probabilities, calibrated when the model carries a calibration."""
        import torch

        from components.calibration import apply_calibration
        from components.models.inputs import to_model_input

        if not len(pixels):
            return np.zeros((0, len(self.label_names)), np.float64)
        x = to_model_input(pixels, self.image_size, self.in_chans, self.device)
        with torch.inference_mode():
            probs = torch.sigmoid(self.model(x).float()).cpu().numpy()
        return apply_calibration(self.calibration, probs)

    def decide(self, probs: np.ndarray) -> np.ndarray | None:
        """0/1 findings at the model's thresholds, or None when it has none."""
        from components.calibration import decide

        return None if self.thresholds is None else decide(probs, self.thresholds)


def images_of(model_input) -> list:
    """The ``image`` column of a DataFrame, a dict or a list of values."""
    if isinstance(model_input, dict) or hasattr(model_input, "columns"):
        if INPUT_COLUMN not in model_input:
            raise ValueError(f"the model's input needs an {INPUT_COLUMN!r} column (image bytes or uint8 arrays)")
        return list(model_input[INPUT_COLUMN])
    return list(model_input)


def decode_column(values, size: int) -> np.ndarray:
    """Image bytes or uint8 arrays -> (N, size, size) uint8, as prepare and predict read them."""
    from components.data.images import ImageRejected, read_or_reason, square_gray8

    out = np.empty((len(values), size, size), np.uint8)
    for row, value in enumerate(values):
        if isinstance(value, bytes | bytearray | memoryview):
            image, why = read_or_reason(bytes(value), size)
            if image is None:
                raise ImageRejected(f"row {row}: {why}")
            out[row] = np.asarray(image, np.uint8)
        else:
            try:
                out[row] = square_gray8(value, size)
            except ImageRejected as exc:
                raise ImageRejected(f"row {row}: {exc}") from None
    return out


def signature(num_classes: int):
    """One binary column (image files' bytes; uint8 arrays pass too), float64 probabilities out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([ColSpec("binary", INPUT_COLUMN)]),
        outputs=Schema([TensorSpec(np.dtype(np.float64), (-1, num_classes))]),
    )


mlflow.models.set_model(ChestXrayClassifier())
