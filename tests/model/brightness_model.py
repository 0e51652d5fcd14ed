"""A stand-in classifier for evaluation and gate tests, logged as an MLflow "model from code" (this file is the model).

Clouds are bright, so the score is a logistic of the log of a patch's mean reflectance. It keeps the tasks.lib.tracking
contract (raw uint16 (n, 120, 120, 3) in, (n,) cloud probabilities out) without training anything. `model_config`
tunes it: `centre` (log brightness scored 0.5), `slope` (a negative slope makes a deliberately bad model) and
`output` ("array", "column" for an (n, 1) array, "frame" for a one-column DataFrame, "percent" for scores × 100,
which breaks the contract) to exercise output coercion and its errors.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


class BrightnessModel(PythonModel):
    def load_context(self, context):
        config = context.model_config or {}
        self.centre = float(config.get("centre", 7.0))
        self.slope = float(config.get("slope", 2.0))
        self.output = config.get("output", "array")

    def predict(self, context, model_input, params=None):
        patches = np.asarray(model_input, dtype=np.float64)
        brightness = np.log1p(patches.reshape(len(patches), -1).mean(axis=1))
        scores = (1.0 / (1.0 + np.exp(-self.slope * (brightness - self.centre)))).astype(np.float32)
        if self.output == "column":
            return scores[:, None]
        if self.output == "frame":
            return pd.DataFrame({"cloud": scores})
        if self.output == "percent":
            return scores * 100
        return scores


mlflow.models.set_model(BrightnessModel())
