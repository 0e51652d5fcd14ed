"""Train the classifier on one sample manifest and record everything about the run in MLflow.

One entrypoint for the GPU pod (KubernetesPodOperator), a Docker container on a GPU VM and a local subprocess:
`python -m tasks.train --manifest M --tiles DIR`. MLflow is reached through MLFLOW_TRACKING_URI.

A run records params (every hyperparameter, the architecture, the dataset and its sizes per split and class),
per-epoch metrics for train and val, MLflow system metrics, hardware and version tags, the cost of the wall time at
the configured machine's price, the lineage tags of tasks.lib.tracking, the manifest as a dataset input, and the model:
the Keras flavor plus the pyfunc classifier (tasks.lib.serving) registered with alias `challenger`.

With `--checkpoint-dir` (local disk) or `--checkpoint-url` (the object store: a spot GPU's pod started again
elsewhere with an empty disk), a killed trainer started again resumes from its last completed epoch in the same MLflow
run, and a trainer started after a finished run returns that run (an Airflow retry after a later failure does not
train twice).

A budget (`train.budget_minutes`, `train.budget_usd` through the cost table) stops training as AutoML's node-hour
budget does: the epoch in progress finishes, then training stops with the best weights so far. The run's tag
`cloudscreen.stopped_by` says what ended it: `budget`, `early_stopping` or `epochs`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from tasks.lib import checkpoints, cli, inputs, tracking
from tasks.lib.config import StepParams, load_section
from tasks.lib.errors import ConfigError
from tasks.lib.files import write_json
from tasks.lib.model import ModelParams, build_model, compile_for_training, describe
from tasks.lib.tiles import DTYPE, INDEX_FILE, PATCH_SHAPE, RGB_CHANNELS, PatchReader
from tasks.lib.training_runs import (
    CostParams,
    budget_seconds,
    cost_metrics,
    dataset_params,
    hardware_tags,
    keras_requirements,
    log_pyfunc_model,
    log_training_input,
    read_splits,
)

log = logging.getLogger(__name__)

RUN_STATE_FILE = checkpoints.STATE_FILE  # in the checkpoint directory: which MLflow run, epochs done, ...
TAG_STOPPED_BY = tracking.TAG_STOPPED_BY
STOPPED_BY = ("budget", "early_stopping", "epochs")
_METRICS = ("accuracy", "precision", "recall", "auc", "pr_auc")


class TrainParams(StepParams):
    epochs: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    optimizer: Literal["adam", "sgd", "rmsprop"]
    learning_rate: float = Field(gt=0)
    early_stopping_patience: int = Field(ge=1)
    reduce_lr_patience: int = Field(ge=1)
    reduce_lr_factor: float = Field(gt=0, lt=1)
    min_learning_rate: float = Field(ge=0)
    schedule: Literal["plateau", "cosine"]
    warmup_epochs: int = Field(ge=0)
    ema_momentum: float | None = Field(default=None, gt=0, lt=1)
    selection_metric: Literal["val_loss", "val_auc", "val_pr_auc"] = "val_loss"
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    augment: bool
    augment_gain: float = Field(default=0.0, ge=0, lt=1)
    augment_offset: float = Field(default=0.0, ge=0)
    augment_noise: float = Field(default=0.0, ge=0)
    shuffle_buffer: int = Field(gt=0)
    class_weighting: Literal["auto", "none"]
    seed: int
    experiment: str
    registered_model: str = Field(min_length=1)
    system_metrics_interval_seconds: float = Field(gt=0)
    max_train_patches: int | None = Field(default=None, gt=0)
    budget_minutes: float | None = Field(default=None, gt=0)
    budget_usd: float | None = Field(default=None, gt=0)

    # Options added after runs were checkpointed: left out of the fingerprint at their defaults, so that those
    # checkpoints (and bench.quality's reusable runs), which trained exactly so, still match.
    _ADDED_LATER: ClassVar[tuple[str, ...]] = (
        "ema_momentum", "selection_metric", "label_smoothing", "augment_gain", "augment_offset", "augment_noise"
    )  # fmt: skip

    def fingerprint(self) -> dict[str, Any]:
        """The params as a resumable checkpoint must match them (JSON types)."""
        record = self.model_dump(mode="json")
        for name in self._ADDED_LATER:
            if record[name] == type(self).model_fields[name].default:
                del record[name]
        return record


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    model_version: str | None
    epochs: int  # epochs completed, over every attempt
    metrics: dict[str, float]
    reused: bool = False  # the checkpoint directory held a finished run: nothing was trained


def class_weights(labels: np.ndarray, mode: str) -> dict[int, float] | None:
    """Inverse-frequency weights when the classes are imbalanced (`auto`); None when balanced or `none`."""
    counts = np.bincount(labels.astype(np.int64), minlength=2)
    if mode == "none" or counts[0] == counts[1]:
        return None
    return {label: len(labels) / (2 * int(count)) for label, count in enumerate(counts)}


def cosine_rate(epoch: int, planned: int, *, peak: float, floor: float, warmup: int) -> float:
    """The learning rate of `epoch` (counted from 0): rising linearly to `peak` over `warmup` epochs, then down a
    half cosine to `floor` at the last planned epoch, `planned - 1` (and `floor` after it)."""
    if epoch < warmup:
        return peak * (epoch + 1) / (warmup + 1)
    progress = min((epoch - warmup) / max(planned - 1 - warmup, 1), 1.0)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def planned_epochs(epochs: int, *, done: int, seconds: float, budget: float | None, epoch_seconds: float) -> int:
    """How many epochs training will run, for a schedule that must end annealed: `epochs`, or fewer when the budget
    will stop it first. `done` epochs took `seconds` (over every attempt) and an epoch takes about `epoch_seconds`;
    the epoch in progress when the budget runs out still finishes, so the count rounds up."""
    if budget is None or epoch_seconds <= 0:
        return epochs
    more = max(math.ceil((budget - seconds) / epoch_seconds), 1)
    return min(epochs, done + more)


def _cosine_schedule(params: TrainParams, state: _RunState, budget: float | None) -> Any:
    import keras

    class CosineSchedule(keras.callbacks.Callback):
        """Sets each epoch's learning rate on the cosine of `cosine_rate`, over the epochs training will run: with a
        budget, those the budget allows at the pace of the epochs so far, so a slow machine anneals in its fewer
        epochs instead of stopping at a high learning rate (a function of the committed state: a resumed run goes on
        with the same rates)."""

        def on_train_begin(self, logs: dict[str, float] | None = None) -> None:
            self.durations: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            # The pace of this attempt's epochs; a resumed attempt starts from the average of the earlier ones.
            pace = float(np.median(self.durations)) if self.durations else state.seconds / epoch if epoch else 0.0
            planned = planned_epochs(
                params.epochs, done=epoch, seconds=state.seconds, budget=budget, epoch_seconds=pace
            )
            rate = cosine_rate(
                epoch, planned, peak=params.learning_rate, floor=params.min_learning_rate, warmup=params.warmup_epochs
            )
            self.model.optimizer.learning_rate = rate
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            self.durations.append(time.perf_counter() - self.started)

    return CosineSchedule()


def _averaged_weights_for_validation() -> Any:
    import keras

    class AveragedWeights(keras.callbacks.Callback):
        """With the optimizer's moving average of the weights (train.ema_momentum): validation runs on the averaged
        weights, and they stay in the model through the epoch's end, so EarlyStopping judges and keeps them (the
        best epoch's file holds them too); EpochEnd swaps the raw weights back before committing the epoch, so the
        checkpoint, and the next epoch's training, hold the raw weights with the average in the optimizer.

        The swap is Keras' SwapEMAWeights' (which would give EarlyStopping the raw weights, or commit swapped ones).
        """

        in_model = False

        def on_test_begin(self, logs: dict[str, float] | None = None) -> None:
            if not self.in_model:
                self._swap()

        def restore_raw(self) -> None:
            if self.in_model:
                self._swap()

        def _swap(self) -> None:
            optimizer = self.model.optimizer
            for variable, average in zip(
                optimizer._trainable_variables, optimizer._model_variables_moving_average, strict=True
            ):
                raw = keras.ops.convert_to_numpy(variable)
                variable.assign(average)
                average.assign(raw)
            self.in_model = not self.in_model

    return AveragedWeights()


def _epoch_end(
    state: _RunState,
    *,
    train_images: int,
    epochs: int,
    budget: float | None,
    early: Any,
    reduce_lr: Any | None,
    averaged: Any | None,
    best_weights: list[Any] | None,
) -> Any:
    import keras
    import mlflow

    class EpochEnd(keras.callbacks.Callback):
        """After EarlyStopping and ReduceLROnPlateau: say whether and why training stops, commit the checkpoint, then
        log the epoch's metrics (train_*, val_*, learning_rate, epoch_seconds, images_per_second) to MLflow.

        Metrics go out after the commit and the commit keeps them, so a resumed run logs every epoch exactly once.
        """

        def on_train_begin(self, logs: dict[str, float] | None = None) -> None:
            # Both callbacks reset their counters when fit starts: a resumed training carries on with the saved ones.
            for callback, name in ((early, "early_stopping"), (reduce_lr, "reduce_lr")):
                for key, value in state.callbacks.get(name, {}).items() if callback else ():
                    setattr(callback, key, value)
            if best_weights is not None:
                early.best_weights = best_weights

        def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            self.started = time.perf_counter()
            self.learning_rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            logs = logs or {}
            seconds = time.perf_counter() - self.started
            metrics = {k if k.startswith("val_") else f"train_{k}": float(v) for k, v in logs.items()}
            metrics.pop("train_learning_rate", None)
            metrics |= {
                "learning_rate": self.learning_rate,
                "epoch_seconds": seconds,
                "images_per_second": train_images / seconds,
            }
            state.epochs = epoch + 1
            if early.best_epoch == epoch and "val_loss" in logs:  # EarlyStopping keeps this epoch's weights
                state.best = {"best_epoch": epoch} | {
                    f"best_val_{m}": float(logs[f"val_{m}"]) for m in ("loss", *_METRICS) if f"val_{m}" in logs
                }
                state.best_weights = state.save_weights(self.model, f"best-{epoch + 1:05d}.weights.h5")
            if self.model.stop_training:
                state.stopped_by = "early_stopping"
            elif epoch + 1 >= epochs:
                state.stopped_by = "epochs"
            elif budget is not None and state.seconds >= budget:
                log.info("budget reached after epoch %d (%.0f of %.0f s): stopping", epoch + 1, state.seconds, budget)
                state.stopped_by = "budget"
                self.model.stop_training = True
            if averaged:  # the best epoch's file took the averaged weights; the checkpoint takes the raw ones
                averaged.restore_raw()
            state.callbacks = {"early_stopping": {k: _plain(getattr(early, k)) for k in ("wait", "best", "best_epoch")}}
            if reduce_lr:
                state.callbacks["reduce_lr"] = {
                    k: _plain(getattr(reduce_lr, k)) for k in ("wait", "best", "cooldown_counter")
                }
            state.weights = state.save_weights(self.model, f"epoch-{epoch + 1:05d}.weights.h5")
            state.last_epoch = {"step": epoch, "metrics": metrics}
            state.save()
            mlflow.log_metrics(metrics, step=epoch)

    return EpochEnd()


def _plain(value: Any) -> Any:
    """A callback counter as JSON can hold it (numpy scalars and tensors become Python numbers)."""
    return None if value is None else float(value) if isinstance(value, float | np.floating) else int(value)


@dataclass
class _RunState:
    """run.json in the checkpoint directory: lets a restarted trainer continue its MLflow run, or reuse it.

    It names the weights files of the commit (tasks.lib.checkpoints): the model and optimizer after `epochs` epochs,
    and the model of the best epoch so far, with the counters of EarlyStopping and ReduceLROnPlateau.
    """

    path: Path | None
    inputs: str = ""  # fingerprint of manifest, tiles and params: a checkpoint only resumes the training it belongs to
    run_id: str = ""
    status: str = "running"
    epochs: int = 0
    seconds_before: float = 0.0  # wall time of earlier, killed attempts (they cost money too)
    model_version: str | None = None
    started: float = 0.0
    weights: str | None = None
    best_weights: str | None = None
    best: dict[str, float] = field(default_factory=dict)  # best_epoch and its best_val_* metrics
    callbacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_epoch: dict[str, Any] = field(default_factory=dict)  # {"step", "metrics"}: logged to MLflow after the commit
    stopped_by: str | None = None  # set once training is over (the model may not be logged yet)
    files: dict[str, str] = field(default_factory=dict)  # name → MD5 of the files this state names
    remote: checkpoints.RemoteCheckpoint | None = None

    _SAVED = ("inputs", "run_id", "status", "epochs", "model_version", "weights", "best_weights", "best", "callbacks",
              "last_epoch", "stopped_by", "files")  # fmt: skip

    @classmethod
    def load(
        cls, checkpoint_dir: Path | None, inputs: str, remote: checkpoints.RemoteCheckpoint | None = None
    ) -> _RunState:
        if checkpoint_dir and remote:
            remote.pull(checkpoint_dir)
        path = checkpoint_dir / RUN_STATE_FILE if checkpoint_dir else None
        state = cls(path, inputs, started=time.monotonic(), remote=remote)
        saved = checkpoints.read_local(checkpoint_dir) if checkpoint_dir else None
        if saved:
            if saved.get("inputs") != inputs:
                log.warning("%s belongs to other inputs or params: training from scratch", checkpoint_dir)
                return state
            for key in cls._SAVED:
                if key in saved:
                    setattr(state, key, saved[key])
            state.seconds_before = saved["seconds"]
        return state

    def fresh(self) -> _RunState:
        return _RunState(self.path, self.inputs, started=time.monotonic(), remote=self.remote)

    @property
    def seconds(self) -> float:
        return self.seconds_before + time.monotonic() - self.started

    def file(self, name: str) -> Path:
        assert self.path is not None
        return self.path.parent / name

    def save_weights(self, model: Any, name: str) -> str | None:
        """Write `model`'s weights (and its optimizer's) as `name` in the checkpoint directory; None without one."""
        if not self.path:
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        model.save_weights(str(self.file(name)), overwrite=True)
        self.files[name] = checkpoints.file_md5(self.file(name))
        return name

    def save(self) -> None:
        """Commit: run.json (naming only complete files) replaces the last one; then the object store's copy."""
        if not self.path:
            return
        self.files = {name: md5 for name, md5 in self.files.items() if name in (self.weights, self.best_weights)}
        record = {key: getattr(self, key) for key in self._SAVED} | {"seconds": self.seconds}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, record)
        checkpoints.prune_local(self.path.parent, record)
        if self.remote:
            self.remote.push(self.path.parent)


def train(
    *,
    manifest: Path,
    tiles: Path,
    params: TrainParams,
    model_params: ModelParams,
    cost: CostParams,
    lineage: tracking.Lineage,
    checkpoint_dir: Path | None = None,
    checkpoint_url: str | None = None,
    register: bool = True,
    run_name: str | None = None,
    kind: str = "train",
) -> TrainResult:
    """Train on `manifest`'s train split (validating on its val split) and log the run to MLflow.

    Args:
        manifest: a tasks.sample manifest (patch_id, label, split, shard, offset, ...).
        tiles: the tile step's output the manifest points into (R, G, B shards).
        checkpoint_dir: where to keep the last completed epoch and the run id, to resume after a kill.
        checkpoint_url: `gs://BUCKET/PATH` to keep the checkpoint in as well (pulled at start, pushed after every
            epoch), so that a trainer started elsewhere with an empty disk resumes; `checkpoint_dir` is then its local
            copy (a temporary directory when not given).
        register: register the pyfunc model under `params.registered_model` with alias `challenger`. Search trials
            log without registering.
        run_name: MLflow run name; nested under the active run when there is one (a search's trials).
        kind: the `cloudscreen.kind` tag.

    Raises:
        InputError: the manifest or tiles cannot feed training (names the file and the fault).
        ConfigError: the cost table has no price for the configured machine; a checkpoint URL that is not gs://.
    """
    if checkpoint_url and not checkpoint_url.startswith("gs://"):
        raise ConfigError(f"checkpoint URL {checkpoint_url!r}: expected gs://BUCKET/PATH")
    if checkpoint_url and checkpoint_dir is None:
        with tempfile.TemporaryDirectory(prefix="cloudscreen-checkpoint-") as scratch:
            return train(
                manifest=manifest, tiles=tiles, params=params, model_params=model_params, cost=cost, lineage=lineage,
                checkpoint_dir=Path(scratch) / "checkpoint", checkpoint_url=checkpoint_url, register=register,
                run_name=run_name, kind=kind,
            )  # fmt: skip
    import keras
    import mlflow
    import tensorflow as tf

    splits = read_splits(manifest, params.max_train_patches)
    fingerprint = _fingerprint(manifest, tiles, params, model_params, register)
    remote = checkpoints.RemoteCheckpoint(checkpoint_url) if checkpoint_url and checkpoint_dir else None
    state = _RunState.load(checkpoint_dir, fingerprint, remote)
    if state.run_id and not _run_exists(state.run_id):
        # The checkpoint belongs to a tracking store that is gone (a new server, a deleted database): start over.
        where = checkpoint_url or checkpoint_dir
        log.warning("%s names run %s, unknown to the tracking store: training from scratch", where, state.run_id)
        state = state.fresh()
    if state.status == "finished":
        log.info("%s holds finished run %s: not training again", checkpoint_url or checkpoint_dir, state.run_id)
        metrics = mlflow.get_run(state.run_id).data.metrics
        return TrainResult(state.run_id, state.model_version, state.epochs, metrics, reused=True)

    source = inputs.open_tiles(tiles)
    cost = cost.from_environment()
    gpus = tf.config.list_physical_devices("GPU")
    budget = budget_seconds(minutes=params.budget_minutes, usd=params.budget_usd, cost=cost, accelerators=len(gpus))
    strategy = tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    # A resumed training draws its data order afresh from the epoch it resumes at, not epoch 0's again.
    seed = params.seed + state.epochs
    keras.utils.set_random_seed(seed)
    mean, variance = inputs.channel_moments(source, splits["train"])
    weights = class_weights(splits["train"]["label"].to_numpy(), params.class_weighting)
    log.info(
        "training %s on %s (%d train, %d val patches; %d replica(s)); mean %s; budget %s",
        model_params.architecture,
        manifest,
        len(splits["train"]),
        len(splits["val"]),
        strategy.num_replicas_in_sync,
        [round(m, 1) for m in mean],
        f"{budget:.0f} s" if budget is not None else "none",
    )
    best_weights = None
    with strategy.scope():
        model = build_model(model_params, mean, variance)
        compile_for_training(
            model,
            params.optimizer,
            params.learning_rate,
            ema_momentum=params.ema_momentum,
            label_smoothing=params.label_smoothing,
        )
        if state.weights:
            model.optimizer.build(model.trainable_variables)
            if state.best_weights:
                model.load_weights(str(state.file(state.best_weights)))
                best_weights = model.get_weights()
            model.load_weights(str(state.file(state.weights)))  # the model and optimizer after the last epoch
    jitter = inputs.Photometric(params.augment_gain, params.augment_offset, params.augment_noise)
    settings = inputs.PipelineSettings(params.batch_size, True, params.augment, seed, params.shuffle_buffer, jitter)
    train_data = inputs.dataset(source, splits["train"], settings)
    val_data = inputs.dataset(source, splits["val"], inputs.PipelineSettings(params.batch_size, False, False, seed))

    mlflow.set_system_metrics_sampling_interval(params.system_metrics_interval_seconds)
    tags = lineage.tags() | hardware_tags() | {tracking.TAG_KIND: kind}
    nested = mlflow.active_run() is not None
    with mlflow.start_run(
        run_id=state.run_id or None,
        experiment_id=None if state.run_id else tracking.experiment_id(params.experiment),
        run_name=run_name,
        nested=nested,
        tags=tags,
        log_system_metrics=True,
    ) as run:
        resumed = bool(state.run_id)
        state.run_id = run.info.run_id
        state.save()
        if not resumed:
            full = inputs.read_manifest(manifest)
            mlflow.log_params(
                params.model_dump(exclude={"experiment", "system_metrics_interval_seconds"})
                | {f"model_{k}": v for k, v in describe(model_params).items()}
                | dataset_params(manifest, splits, int((full["split"] == "test").sum()))
                | {
                    "class_weight": json.dumps(weights) if weights else "none",
                    "replicas": strategy.num_replicas_in_sync,
                    "machine_type": cost.machine_type,
                    "accelerator": cost.accelerator,
                    "tiles": str(tiles),
                    "budget_seconds": round(budget, 1) if budget is not None else "none",
                }
            )
            log_training_input(manifest, full, lineage)
        else:
            log.info("resuming MLflow run %s after epoch %d", state.run_id, state.epochs)
            _log_committed_epoch(state)

        early = keras.callbacks.EarlyStopping(
            monitor=params.selection_metric,
            mode="min" if params.selection_metric == "val_loss" else "max",
            patience=params.early_stopping_patience,
            restore_best_weights=True,
        )
        if params.schedule == "plateau":
            reduce_lr = keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss",
                factor=params.reduce_lr_factor,
                patience=params.reduce_lr_patience,
                min_lr=params.min_learning_rate,
            )
            schedule = reduce_lr
        else:
            reduce_lr, schedule = None, _cosine_schedule(params, state, budget)
        averaged = _averaged_weights_for_validation() if params.ema_momentum is not None else None
        # Last: it sees what EarlyStopping decided, and commits every callback's state with the weights.
        epoch_end = _epoch_end(
            state,
            train_images=len(splits["train"]),
            epochs=params.epochs,
            budget=budget,
            early=early,
            reduce_lr=reduce_lr,
            averaged=averaged,
            best_weights=best_weights,
        )
        if state.stopped_by:  # training ended before the kill; the model was not logged yet
            log.info("training of run %s already ended (%s)", state.run_id, state.stopped_by)
            if best_weights is not None:
                model.set_weights(best_weights)
        else:
            with cli.stdout_to_stderr():
                model.fit(
                    train_data,
                    validation_data=val_data,
                    initial_epoch=state.epochs,
                    epochs=params.epochs,
                    class_weight=weights,
                    callbacks=[c for c in (averaged, schedule, early, epoch_end) if c is not None],
                    verbose=1 if sys.stderr.isatty() else 2,
                )  # EarlyStopping restores the best epoch's weights at the end, whatever stopped training

        summary = cost_metrics(state.epochs, state.epochs * len(splits["train"]), state.seconds, cost, len(gpus))
        spent = summary["cost_usd"]
        summary |= state.best
        mlflow.log_metrics(summary)
        mlflow.set_tag(TAG_STOPPED_BY, state.stopped_by or "epochs")
        version = _log_model(model, source, splits["train"], mean, variance, params if register else None)
        state.status, state.model_version = "finished", version
        state.weights = state.best_weights = None  # the model is logged: the weights files can go
        state.save()
        metrics = mlflow.get_run(run.info.run_id).data.metrics
    log.info(
        "run %s: %d epochs (stopped by %s), model version %s, cost $%.4f",
        state.run_id,
        state.epochs,
        state.stopped_by or "epochs",
        version,
        spent,
    )
    return TrainResult(state.run_id, version, state.epochs, metrics)


def _log_committed_epoch(state: _RunState) -> None:
    """Log the last committed epoch's metrics when the killed attempt died between its commit and logging them."""
    import mlflow

    if not state.last_epoch:
        return
    step, metrics = state.last_epoch["step"], state.last_epoch["metrics"]
    logged = mlflow.MlflowClient().get_metric_history(state.run_id, "epoch_seconds")
    if not any(m.step == step for m in logged):
        mlflow.log_metrics(metrics, step=step)


def _fingerprint(manifest: Path, tiles: Path, params: TrainParams, model: ModelParams, register: bool) -> str:
    from tasks.lib.files import file_digest

    record = {
        "manifest": file_digest(manifest, "sha256") if manifest.is_file() else str(manifest),
        "tiles_index": file_digest(tiles / INDEX_FILE, "sha256") if (tiles / INDEX_FILE).is_file() else str(tiles),
        "train": params.fingerprint(),
        "model": model.model_dump(mode="json", exclude_defaults=True),  # an option added since, at its default,
        # builds the same network: checkpoints from before it still resume
        "register": register,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _run_exists(run_id: str) -> bool:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.get_run(run_id)
    except MlflowException:
        return False
    return True


def _log_model(
    model: Any,
    source: PatchReader,
    train: pd.DataFrame,
    mean: list[float],
    variance: list[float],
    register: TrainParams | None,
) -> str | None:
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from tasks.lib import serving

    mlflow.log_dict(
        {"channels": list(RGB_CHANNELS), "dtype": DTYPE, "mean": mean, "variance": variance},
        "preprocessing.json",
    )
    example = source.frame_patches(train.head(2))
    requirements = keras_requirements()
    keras_signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *PATCH_SHAPE))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1))]),
    )
    mlflow.keras.log_model(
        model, name=tracking.KERAS_ARTIFACT, pip_requirements=requirements, signature=keras_signature
    )
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "classifier.keras"
        model.save(saved)
        info = log_pyfunc_model(
            serving.RawPatchClassifier(),
            artifacts={serving.KERAS_ARTIFACT: str(saved)},
            input_example=example,
            pip_requirements=requirements,
            registered_model_name=register.registered_model if register else None,
        )
    if register is None:
        return None
    version = str(info.registered_model_version)
    mlflow.MlflowClient().set_registered_model_alias(register.registered_model, tracking.CHALLENGER, version)
    return version


def main() -> None:
    p = cli.parser("Train the classifier on a sample manifest; log it to MLflow and register it as challenger.")
    cli.add_training_inputs(p)
    p.add_argument(
        "--set-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="shorthand for --set train.KEY=VALUE (or SECTION.KEY=VALUE for the model and cost sections)",
    )
    p.add_argument("--checkpoint-dir", type=Path, help="keep the last epoch here; a restarted trainer resumes from it")
    p.add_argument(
        "--checkpoint-url",
        metavar="gs://BUCKET/PATH",
        help="keep the last epoch in the object store too (pulled at start, pushed after every epoch): a trainer "
        "started again anywhere, with an empty disk, resumes from it (spot GPUs); the local copy is --checkpoint-dir "
        "or a temporary directory",
    )
    p.add_argument(
        "--xcom-out", type=Path, help='write {"run_id", "model_version"} as JSON here (KPO: /airflow/xcom/return.json)'
    )
    p.add_argument(
        "--restore-data",
        type=Path,
        metavar="DIR",
        help="first restore --data-version from the DVC remote into DIR/data; --manifest and --tiles are then relative "
        "to it (how the trainer image, away from the pipeline's files, gets its data)",
    )
    args = p.parse_args()
    cli.configure_logging(args.verbose)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter hides our log

    def body() -> None:
        overrides = args.overrides + [
            item if "." in item.partition("=")[0] else f"train.{item}" for item in args.set_param
        ]
        manifest, tiles = args.manifest, args.tiles
        if args.restore_data:
            manifest, tiles = _restored(args.restore_data, args.data_version, manifest, tiles, args.params, overrides)
        with cli.stdout_to_stderr():
            result = train(
                manifest=manifest,
                tiles=tiles,
                params=load_section("train", TrainParams, args.params, overrides),
                model_params=load_section("model", ModelParams, args.params, overrides),
                cost=load_section("cost", CostParams, args.params, overrides),
                lineage=tracking.Lineage.from_environment(snapshot=args.snapshot, data_version=args.data_version),
                checkpoint_dir=args.checkpoint_dir,
                checkpoint_url=args.checkpoint_url,
            )
        if args.xcom_out:
            write_json(args.xcom_out, {"run_id": result.run_id, "model_version": result.model_version})
        print(result.run_id)

    cli.run(body)


def _restored(
    into: Path, version: str | None, manifest: Path, tiles: Path, params: Path, overrides: list[str]
) -> tuple[Path, Path]:
    from tasks.versioning import VersioningParams, restore_into

    data = restore_into(into, version=version, params=load_section("versioning", VersioningParams, params, overrides))
    return data / manifest, data / tiles


if __name__ == "__main__":
    main()
