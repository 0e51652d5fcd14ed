"""The floor every model is compared against: logistic regression by SGD on flattened raw pixels.

The seed project's baseline (accuracy about 0.65), rebuilt as a logged MLflow run with the same dataset params,
per-epoch metric names, lineage tags, cost and model contract as tasks.train (tasks.lib.training_runs), so the two sit
side by side in the MLflow UI and tasks.evaluate measures both the same way. Trained with `partial_fit` over chunks read
from the memory-mapped shards, so it runs on any set size in bounded memory. It is not registered: it is a yardstick,
never a candidate for champion.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field

from tasks.lib import cli, inputs, tracking
from tasks.lib.config import StepParams, load_section
from tasks.lib.tiles import PATCH_SHAPE, PatchReader
from tasks.lib.training_runs import (
    CostParams,
    cost_metrics,
    dataset_params,
    hardware_tags,
    log_pyfunc_model,
    log_training_input,
    read_splits,
    sklearn_requirements,
)
from tasks.train import TrainParams

log = logging.getLogger(__name__)


class BaselineParams(StepParams):
    alpha: float = Field(gt=0)
    average: bool
    epochs: int = Field(gt=0)
    chunk_patches: int = Field(gt=0)
    seed: int


@dataclass(frozen=True)
class BaselineResult:
    run_id: str
    metrics: dict[str, float]


def _flat(source: PatchReader, frame: pd.DataFrame) -> np.ndarray:
    return source.frame_patches(frame).reshape(len(frame), -1).astype(np.float32)


def _chunks(frame: pd.DataFrame, size: int) -> list[pd.DataFrame]:
    return [frame.iloc[i : i + size] for i in range(0, len(frame), size)]


def _scores(pipeline: Any, source: PatchReader, frame: pd.DataFrame, size: int) -> np.ndarray:
    return np.concatenate([pipeline.predict_proba(_flat(source, c))[:, 1] for c in _chunks(frame, size)])


def _epoch_metrics(prefix: str, labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    from sklearn import metrics

    predicted = scores >= 0.5
    return {
        f"{prefix}_loss": metrics.log_loss(labels, scores, labels=[0, 1]),
        f"{prefix}_accuracy": metrics.accuracy_score(labels, predicted),
        f"{prefix}_precision": metrics.precision_score(labels, predicted, zero_division=0),
        f"{prefix}_recall": metrics.recall_score(labels, predicted, zero_division=0),
        f"{prefix}_auc": metrics.roc_auc_score(labels, scores),
    }


def baseline(
    *,
    manifest: Path,
    tiles: Path,
    params: BaselineParams,
    train_params: TrainParams,
    cost: CostParams,
    lineage: tracking.Lineage,
) -> BaselineResult:
    """Fit the baseline on `manifest`'s train split, log per-epoch train/val metrics and the model to MLflow.

    `train_params` supplies the experiment and the train-split cap (max_train_patches) shared with tasks.train.

    Raises:
        InputError: the manifest or tiles cannot feed training (names the file and the fault).
    """
    import mlflow
    from sklearn.linear_model import SGDClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    started = time.monotonic()
    splits = read_splits(manifest, train_params.max_train_patches)
    source = inputs.open_tiles(tiles)
    cost = cost.from_environment()
    train, val = splits["train"], splits["val"]
    rng = np.random.default_rng(params.seed)
    scaler = StandardScaler()
    for chunk in _chunks(train, params.chunk_patches):  # normalisation from the train split only, as for the CNN
        scaler.partial_fit(_flat(source, chunk))
    model = SGDClassifier(loss="log_loss", alpha=params.alpha, average=params.average, random_state=params.seed)
    pipeline = make_pipeline(scaler, model)
    log.info("baseline: SGD logistic regression on %d train patches of %s", len(train), manifest)

    tags = lineage.tags() | hardware_tags() | {tracking.TAG_KIND: "baseline"}
    experiment = tracking.experiment_id(train_params.experiment)
    nested = mlflow.active_run() is not None
    with mlflow.start_run(experiment_id=experiment, run_name="sgd-baseline", tags=tags, nested=nested) as run:
        full = inputs.read_manifest(manifest)
        mlflow.log_params(
            params.model_dump()
            | {"model_architecture": "sgd_logistic_flat_pixels", "features": int(np.prod(PATCH_SHAPE))}
            | dataset_params(manifest, splits, int((full["split"] == "test").sum()))
            | {"machine_type": cost.machine_type, "accelerator": cost.accelerator, "tiles": str(tiles)}
        )
        log_training_input(manifest, full, lineage)
        for epoch in range(params.epochs):
            epoch_started = time.perf_counter()
            order = train.iloc[rng.permutation(len(train))]
            for chunk in _chunks(order, params.chunk_patches):
                model.partial_fit(scaler.transform(_flat(source, chunk)), chunk["label"].to_numpy(), classes=[0, 1])
            seconds = time.perf_counter() - epoch_started
            metrics = _epoch_metrics("train", train["label"].to_numpy(), _scores(pipeline, source, train, 1024))
            metrics |= _epoch_metrics("val", val["label"].to_numpy(), _scores(pipeline, source, val, 1024))
            metrics |= {"epoch_seconds": seconds, "images_per_second": len(train) / seconds}
            mlflow.log_metrics(metrics, step=epoch)
            log.info("baseline epoch %d/%d: val_auc %.3f", epoch + 1, params.epochs, metrics["val_auc"])

        seconds = time.monotonic() - started
        mlflow.log_metrics(cost_metrics(params.epochs, params.epochs * len(train), seconds, cost, accelerators=0))
        _log_model(pipeline, source, train)
        metrics = mlflow.get_run(run.info.run_id).data.metrics
    log.info("baseline run %s: val_auc %.3f", run.info.run_id, metrics["val_auc"])
    return BaselineResult(run.info.run_id, metrics)


def _log_model(pipeline: Any, source: PatchReader, train: pd.DataFrame) -> None:
    import joblib

    from tasks.lib import serving

    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "pipeline.joblib"
        joblib.dump(pipeline, saved)
        log_pyfunc_model(
            serving.FlatPixelBaseline(),
            artifacts={serving.SKLEARN_ARTIFACT: str(saved)},
            input_example=source.frame_patches(train.head(2)),
            pip_requirements=sklearn_requirements(),
        )


def main() -> None:
    p = cli.parser("Fit the SGD logistic-regression baseline on a sample manifest and log it to MLflow.")
    cli.add_training_inputs(p)
    args = p.parse_args()
    cli.configure_logging(args.verbose)

    def body() -> None:
        with cli.stdout_to_stderr():
            result = baseline(
                manifest=args.manifest,
                tiles=args.tiles,
                params=load_section("baseline", BaselineParams, args.params, args.overrides),
                train_params=load_section("train", TrainParams, args.params, args.overrides),
                cost=load_section("cost", CostParams, args.params, args.overrides),
                lineage=tracking.Lineage.from_environment(snapshot=args.snapshot, data_version=args.data_version),
            )
        print(result.run_id)

    cli.run(body)


if __name__ == "__main__":
    main()
