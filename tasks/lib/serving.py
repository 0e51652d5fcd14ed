"""The pyfunc model every trained network is served as: raw uint16 R, G, B patches in, probability of cloud out.

Logged by tasks.lib.training_runs with the tasks/ directory as `code_paths`, so the model loads wherever MLflow runs. It
keeps the contract in tasks.lib.tracking's docstring; the network itself normalises (tasks.lib.model), so the wrapper
only checks the input and batches it. The expected patch shape is the tile format's (tasks.lib.tiles, light to import).
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np

from tasks.lib.tiles import DTYPE, PATCH_SHAPE

KERAS_ARTIFACT = "keras_model"  # the key of the saved .keras file in the pyfunc model's artifacts


class RawPatchClassifier(mlflow.pyfunc.PythonModel):
    batch_size = 256

    def load_context(self, context: Any) -> None:
        import keras

        self.model = keras.saving.load_model(context.artifacts[KERAS_ARTIFACT], compile=False)

    # No type hints on predict: MLflow would read them as a schema and warn; the signature logged with the model
    # (uint16 tensor in, float32 vector out) is the schema.
    def predict(self, context, model_input, params=None):
        patches = _patches(model_input)
        scores = [
            np.asarray(self.model(patches[i : i + self.batch_size].astype(np.float32), training=False)).reshape(-1)
            for i in range(0, len(patches), self.batch_size)
        ]
        return np.concatenate(scores).astype(np.float32) if scores else np.empty(0, np.float32)


SKLEARN_ARTIFACT = "sklearn_pipeline"  # the joblib file of the baseline's fitted scaler + SGD pipeline


class FlatPixelBaseline(mlflow.pyfunc.PythonModel):
    """The seed project's floor: logistic regression (SGD) on the flattened raw pixels, served by the same contract."""

    def load_context(self, context: Any) -> None:
        import joblib

        self.pipeline = joblib.load(context.artifacts[SKLEARN_ARTIFACT])

    def predict(self, context, model_input, params=None):
        patches = _patches(model_input)
        flat = patches.reshape(len(patches), -1).astype(np.float32)
        return self.pipeline.predict_proba(flat)[:, 1].astype(np.float32)


def _patches(model_input: Any) -> np.ndarray:
    """The input as a batch of patches (one patch becomes a batch of one), checked against the tile format's shape."""
    patches = np.asarray(model_input)
    if patches.ndim == 3:
        patches = patches[None]
    if patches.shape[1:] != PATCH_SHAPE:
        shape = ", ".join(map(str, PATCH_SHAPE))
        raise ValueError(f"expected raw {DTYPE} patches of shape (n, {shape}) in R, G, B order, got {patches.shape}")
    return patches
