"""A registered model version ready to decide: which version a URI names, the operating threshold it decides at, and
a scorer for raw patches. What tasks.screen and tasks.serve put to work.

The threshold travels with the version as the registry tag `cloudscreen.operating_threshold` (set by tasks.gate when
it promotes). A version without it is refused: screening at a default 0.5 would silently trade the recall the gate
checked for something nobody chose.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.lib.errors import DeviceUnavailableError, EvaluationError, ModelVersionError
from tasks.lib.inference import Device, Scorer, compile_scorer
from tasks.lib.tracking import TAG_DATA_VERSION, TAG_OPERATING_THRESHOLD, TAG_SNAPSHOT, resolve_model

log = logging.getLogger(__name__)

DEFAULT_MODEL = "models:/cloudscreen-classifier@champion"


@dataclass(frozen=True)
class ModelVersion:
    """One registered version, pinned: what a `models:/NAME@ALIAS` meant when it was resolved."""

    name: str
    version: str
    run_id: str  # the training run
    threshold: float  # score >= threshold is cloud
    data_version: str  # the training run's lineage: the data it was trained on ("" when unknown)
    snapshot: str
    asked: str  # the URI as given (e.g. models:/cloudscreen-classifier@champion)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "run_id": self.run_id,
            "threshold": self.threshold,
            "data_version": self.data_version,
            "snapshot": self.snapshot,
            "asked": self.asked,
        }


def resolve_version(model_uri: str = DEFAULT_MODEL) -> ModelVersion:
    """The registered version `model_uri` names now (`models:/NAME@ALIAS` or `models:/NAME/VERSION`) and its threshold.

    Raises:
        ModelVersionError: another kind of URI, an unknown model, version or alias, or a version without a valid
            operating threshold tag.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        ref = resolve_model(model_uri)
    except EvaluationError as exc:
        raise ModelVersionError(str(exc)) from exc
    if not ref.version:
        raise ModelVersionError(
            f"model {model_uri!r}: not a registered version; screening and serving need models:/NAME@ALIAS or "
            "models:/NAME/VERSION, whose operating threshold the registry records"
        )
    client = MlflowClient()
    try:
        tags = client.get_model_version(ref.registered_name, ref.version).tags or {}
        run_tags = client.get_run(ref.run_id).data.tags
    except MlflowException as exc:
        raise ModelVersionError(f"model {model_uri!r}: {exc.message}") from exc
    where = f"version {ref.version} of {ref.registered_name!r} ({model_uri})"
    raw = tags.get(TAG_OPERATING_THRESHOLD)
    if raw is None:
        raise ModelVersionError(
            f"{where} has no operating threshold: the tag {TAG_OPERATING_THRESHOLD} is set when tasks.gate promotes a "
            "version; refusing to decide at a default 0.5"
        )
    try:
        threshold = float(raw)
    except ValueError:
        threshold = math.nan
    if not 0.0 <= threshold <= 1.0:
        raise ModelVersionError(f"{where}: tag {TAG_OPERATING_THRESHOLD}={raw!r} is not a threshold in [0, 1]")
    return ModelVersion(
        name=ref.registered_name,
        version=ref.version,
        run_id=ref.run_id,
        threshold=threshold,
        data_version=run_tags.get(TAG_DATA_VERSION, ""),
        snapshot=run_tags.get(TAG_SNAPSHOT, ""),
        asked=model_uri,
    )


def load_scorer(version: ModelVersion, device: Device = "auto") -> Scorer:
    """The version's classifier as a function of raw patches.

    A Keras network (the pyfunc model wraps tasks.lib.serving.RawPatchClassifier) is scored through the compiled path
    of tasks.lib.inference on `device`, checked against the network when it is built; any other pyfunc model (the
    scikit-learn baseline, a model from code), or a network that cannot be compiled here, through its pyfunc
    `predict` on the CPU.

    Raises:
        ModelVersionError: the model cannot be loaded.
        DeviceUnavailableError: `device` is "gpu" and there is none, or the model cannot run on one.
    """
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    from tasks.lib.serving import RawPatchClassifier

    try:
        model = mlflow.pyfunc.load_model(version.uri)
    except (MlflowException, OSError) as exc:
        raise ModelVersionError(f"{version.uri}: cannot be loaded: {exc}") from exc
    try:
        python_model = model.unwrap_python_model()
    except MlflowException:  # another flavor's pyfunc (e.g. mlflow.keras): no Python model to unwrap
        python_model = None
    if isinstance(python_model, RawPatchClassifier):
        try:
            return compile_scorer(python_model.model, device=device)
        except (ImportError, ValueError) as exc:
            if device == "gpu":
                raise DeviceUnavailableError(f"{version.uri}: cannot be compiled for the GPU: {exc}") from exc
            log.warning("%s: scoring through pyfunc predict, not compiled: %s", version.uri, exc)
    elif device == "gpu":
        raise DeviceUnavailableError(f"{version.uri}: not a Keras network: it is scored on the CPU only")

    def score(patches: np.ndarray) -> np.ndarray:
        return np.asarray(model.predict(patches), dtype=np.float32).reshape(-1)

    return score
