"""What every training run records, whichever trainer made it (tasks.train, tasks.baseline, tasks.search's trials).

The splits a run trains on, the dataset params and input it logs, where it ran (hardware and version tags), what it
cost at the configured machine's price, and the pyfunc model it logs: the same names and the same model contract
for every trainer, so their runs sit side by side in the MLflow UI and tasks.evaluate measures them the same way.
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import model_validator

from tasks.lib import inputs, tracking
from tasks.lib.config import StepParams
from tasks.lib.errors import ConfigError, InputError
from tasks.lib.tiles import DTYPE, PATCH_SHAPE

# Logged with every pyfunc model as its code, so that the wrapper (tasks.lib.serving) loads wherever MLflow runs.
TASKS_DIR = Path(__file__).resolve().parents[1]


class CostParams(StepParams):
    machine_type: str
    accelerator: str
    machine_usd_per_hour: dict[str, float]
    accelerator_usd_per_hour: dict[str, float]

    @model_validator(mode="after")
    def _known_types(self) -> CostParams:
        for kind, name, table in (
            ("machine_type", self.machine_type, self.machine_usd_per_hour),
            ("accelerator", self.accelerator, self.accelerator_usd_per_hour),
        ):
            if name not in table:
                raise ValueError(f"{kind} {name!r} has no price; priced: {', '.join(sorted(table))}")
        return self

    def from_environment(self) -> CostParams:
        """The machine and accelerator the pod or VM says it runs on (CLOUDSCREEN_MACHINE_TYPE/_ACCELERATOR)."""
        changes = {
            key: os.environ[var]
            for key, var in (("machine_type", "CLOUDSCREEN_MACHINE_TYPE"), ("accelerator", "CLOUDSCREEN_ACCELERATOR"))
            if os.environ.get(var)
        }
        try:
            return CostParams.model_validate(self.model_dump() | changes) if changes else self
        except ValueError as exc:
            raise ConfigError(f"cost from the environment: {exc}") from exc


def hourly_usd(cost: CostParams, accelerators: int) -> float:
    """The price of an hour on the configured machine with `accelerators` of the configured GPU (at least one)."""
    hourly = cost.machine_usd_per_hour[cost.machine_type]
    if cost.accelerator != "none":
        hourly += cost.accelerator_usd_per_hour[cost.accelerator] * max(accelerators, 1)
    return hourly


def cost_usd(seconds: float, cost: CostParams, accelerators: int) -> float:
    """What `seconds` of wall time cost on the configured machine with `accelerators` of the configured GPU."""
    return seconds / 3600 * hourly_usd(cost, accelerators)


def budget_seconds(*, minutes: float | None, usd: float | None, cost: CostParams, accelerators: int) -> float | None:
    """The wall time a training may spend (over all its attempts): `minutes`, or what `usd` buys at the machine's
    hourly price (cost_usd's arithmetic), whichever is shorter; None without a budget. On a machine priced at zero a
    dollar budget never runs out."""
    limits = [] if minutes is None else [minutes * 60]
    hourly = hourly_usd(cost, accelerators)
    if usd is not None and hourly > 0:
        limits.append(usd / hourly * 3600)
    return min(limits) if limits else None


def cost_metrics(epochs: int, images: int, seconds: float, cost: CostParams, accelerators: int) -> dict[str, float]:
    """A finished run's summary metrics: epochs run, wall time, its cost, and the cost per 1,000 training images
    (`images` over all epochs)."""
    spent = cost_usd(seconds, cost, accelerators)
    return {
        "epochs_run": epochs,
        "train_seconds": seconds,
        "cost_usd": spent,
        "cost_usd_per_1k_images": spent / images * 1000 if images else 0.0,
    }


def read_splits(manifest_path: Path, max_train_patches: int | None = None) -> dict[str, pd.DataFrame]:
    """The train and val splits of a manifest, each with both classes; train capped per class when asked."""
    manifest = inputs.read_manifest(manifest_path)
    splits = {name: manifest[manifest["split"] == name] for name in ("train", "val")}
    for name, frame in splits.items():
        present = set(frame["label"].unique())
        if present != {0, 1}:
            raise InputError(
                f"{manifest_path}: the {name} split needs both classes; it holds labels {present or 'none'}"
            )
    if max_train_patches:
        splits["train"] = splits["train"].groupby("label", group_keys=False).head(max_train_patches)
    return splits


def dataset_params(manifest_path: Path, splits: dict[str, pd.DataFrame], test_rows: int) -> dict[str, Any]:
    flat: dict[str, Any] = {
        "dataset": manifest_path.parent.name,
        "manifest": str(manifest_path),
        "test_patches": test_rows,
    }
    for split, frame in splits.items():
        counts = frame["label"].value_counts()
        flat[f"{split}_cloud"] = int(counts.get(1, 0))
        flat[f"{split}_no_cloud"] = int(counts.get(0, 0))
    return flat


def dataset_name(manifest: Path, lineage: tracking.Lineage) -> str:
    snapshot = lineage.snapshot or manifest.parent.parent.name
    return f"{snapshot}/{manifest.parent.name}"


def log_training_input(manifest: Path, frame: pd.DataFrame, lineage: tracking.Lineage) -> None:
    """The whole manifest `frame` as the active run's training dataset input."""
    import mlflow

    name = dataset_name(manifest, lineage)
    dataset = mlflow.data.from_pandas(frame, source=str(manifest), name=name, targets="label")
    mlflow.log_input(dataset, context="training")


def hardware_tags() -> dict[str, str]:
    """Where the run ran: host, CPU, GPUs, driver and CUDA, TensorFlow and Keras versions."""
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    gpu_names = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
    tags = {
        "host": platform.node(),
        "cpu_model": _cpu_model(),
        "cpu_cores": str(os.cpu_count()),
        "gpu_count": str(len(gpus)),
        "gpu_model": ", ".join(sorted(set(gpu_names))),
        "gpu_driver": _nvidia_driver(),
        "cuda_version": str(tf.sysconfig.get_build_info().get("cuda_version", "")),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
    }
    return {f"{tracking.TAG_PREFIX}{k}": v for k, v in tags.items()}


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _nvidia_driver() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no NVIDIA driver: the normal case on CPU machines
        return ""
    try:
        return str(pynvml.nvmlSystemGetDriverVersion())
    finally:
        pynvml.nvmlShutdown()


# Explicit requirements: inferring them reloads the model in a subprocess, which costs more than a tiny run.


def keras_requirements() -> list[str]:
    """What a logged Keras network needs installed to load."""
    from importlib.metadata import PackageNotFoundError, version

    import tensorflow as tf

    # tensorflow-cpu (this project's lock) and tensorflow (the GPU image) are the same code under two names.
    pins = [f"tensorflow=={tf.__version__}"]
    for package in ("keras", "mlflow"):
        with contextlib.suppress(PackageNotFoundError):
            pins.append(f"{package}=={version(package)}")
    return pins + code_requirements()


def code_requirements() -> list[str]:
    """What the logged code itself imports when a model loads: tasks.lib.serving takes the patch shape from
    tasks.lib.tiles, which reads BigEarthNet's band facts from bigearthnet-common."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("bigearthnet-common", "numpy", "pandas"):
        with contextlib.suppress(PackageNotFoundError):
            pins.append(f"{package}=={version(package)}")
    return pins


def sklearn_requirements() -> list[str]:
    """What a logged scikit-learn pipeline (joblib file) needs installed to load."""
    import mlflow
    import sklearn

    return [f"scikit-learn=={sklearn.__version__}", f"mlflow=={mlflow.__version__}", "joblib", *code_requirements()]


def pyfunc_signature() -> Any:
    """The served contract as an MLflow signature: raw patches (n, *PATCH_SHAPE) in, (n,) float32 probabilities out."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(DTYPE), (-1, *PATCH_SHAPE))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1,))]),
    )


def log_pyfunc_model(
    python_model: Any,
    *,
    artifacts: dict[str, str],
    input_example: np.ndarray,
    pip_requirements: list[str],
    registered_model_name: str | None = None,
) -> Any:
    """Log a tasks.lib.serving wrapper as the active run's model (tracking.MODEL_ARTIFACT) with the served contract's
    signature and the tasks/ directory as its code; registered under `registered_model_name` when given.

    Returns:
        MLflow's ModelInfo (its `registered_model_version` when registered).
    """
    import mlflow

    return mlflow.pyfunc.log_model(
        name=tracking.MODEL_ARTIFACT,
        python_model=python_model,
        artifacts=artifacts,
        code_paths=[str(TASKS_DIR)],
        signature=pyfunc_signature(),
        input_example=input_example,
        registered_model_name=registered_model_name,
        pip_requirements=pip_requirements,
    )
