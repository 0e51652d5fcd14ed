"""The trainer on a tiny tiled mirror: what a run records in MLflow, the packaged model, resuming, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.lib import tracking
from tasks.lib.config import load_section
from tasks.lib.model import ModelParams, build_model, compile_for_training
from tasks.lib.tiles import load_patches
from tasks.lib.training_runs import CostParams
from tasks.train import RUN_STATE_FILE, TAG_STOPPED_BY, TrainParams, train
from tests.conftest import REPO

pytestmark = pytest.mark.slow

# A network small enough to train in a second or two on 2 cores; the seed CNN is the params.yaml default.
TINY = ["model.conv_layers=[{filters: 4, kernel: 3, pool: 4}]", "model.dense_units=8"]
QUICK = ["train.epochs=3", "train.batch_size=32", "train.system_metrics_interval_seconds=1"]


def sections(*overrides: str) -> dict:
    changes = [*TINY, *QUICK, *overrides]
    return {
        "params": load_section("train", TrainParams, overrides=changes),
        "model_params": load_section("model", ModelParams, overrides=changes),
        "cost": load_section("cost", CostParams, overrides=changes),
    }


@pytest.fixture(scope="module")
def trained(training_data, tracking_uri):
    lineage = tracking.Lineage(
        git_commit="abc123", data_version="d41d8cd98f00b204e9800998ecf8427e.dir", snapshot="2026-11-16",
        dag_id="cloudscreen_training", dag_run_id="scheduled__2026-11-16T00:00:00+00:00", image="",
    )  # fmt: skip
    return train(manifest=training_data.manifest(), tiles=training_data.tiles, lineage=lineage, **sections())


@pytest.fixture(scope="module")
def run(trained):
    import mlflow

    return mlflow.get_run(trained.run_id)


def test_params_hold_every_hyperparameter_the_architecture_and_dataset_sizes(run, training_data):
    params = run.data.params
    manifest = pd.read_parquet(training_data.manifest())
    train_split = manifest[manifest["split"] == "train"]
    assert params["optimizer"] == "adam" and float(params["learning_rate"]) == 3e-4 and params["batch_size"] == "32"
    assert params["model_architecture"] == "cnn" and params["model_conv0"] == "4x3x3/pool4"
    assert params["dataset"] == "small"
    assert int(params["train_cloud"]) == int((train_split["label"] == 1).sum())
    assert int(params["train_no_cloud"]) == int((train_split["label"] == 0).sum())
    assert {"val_cloud", "val_no_cloud", "test_patches", "early_stopping_patience", "machine_type"} <= set(params)


def test_every_epoch_logs_train_and_val_metrics_learning_rate_and_speed(run, trained):
    from mlflow import MlflowClient

    client = MlflowClient()
    for metric in ("loss", "accuracy", "precision", "recall", "auc"):
        for prefix in ("train_", "val_"):
            history = client.get_metric_history(run.info.run_id, prefix + metric)
            assert [m.step for m in history] == list(range(trained.epochs)), prefix + metric
    for metric in ("learning_rate", "epoch_seconds", "images_per_second"):
        assert len(client.get_metric_history(run.info.run_id, metric)) == trained.epochs
    assert run.data.metrics["learning_rate"] == pytest.approx(3e-4)


def test_system_metrics_hardware_and_version_tags(run):
    import keras
    import tensorflow as tf

    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics)
    assert any(k.startswith("system/system_memory_usage") for k in run.data.metrics)
    tags = run.data.tags
    assert tags["cloudscreen.cpu_cores"] == str(os.cpu_count()) and tags["cloudscreen.cpu_model"]
    assert tags["cloudscreen.gpu_count"] == "0" and tags["cloudscreen.host"]
    assert tags["cloudscreen.tensorflow_version"] == tf.__version__
    assert tags["cloudscreen.keras_version"] == keras.__version__


def test_cost_is_wall_time_at_the_machine_price(run, trained):
    metrics = run.data.metrics
    price = load_section("cost", CostParams).machine_usd_per_hour["local"]
    assert metrics["cost_usd"] == pytest.approx(metrics["train_seconds"] / 3600 * price)
    images = trained.epochs * int(run.data.params["train_cloud"]) * 2
    assert metrics["cost_usd_per_1k_images"] == pytest.approx(metrics["cost_usd"] / images * 1000)


def test_lineage_tags_and_the_manifest_as_dataset_input(run, training_data):
    tags = run.data.tags
    assert tags[tracking.TAG_GIT_COMMIT] == "abc123"
    assert tags[tracking.TAG_DATA_VERSION] == "d41d8cd98f00b204e9800998ecf8427e.dir"
    assert tags[tracking.TAG_SNAPSHOT] == "2026-11-16"
    assert tags[tracking.TAG_DAG_ID] == "cloudscreen_training"
    assert tags[tracking.TAG_DAG_RUN_ID] == "scheduled__2026-11-16T00:00:00+00:00"
    assert tags[tracking.TAG_IMAGE] == ""
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "2026-11-16/small"
    assert str(training_data.manifest()) in dataset_input.dataset.source
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"


def test_model_is_registered_as_challenger_and_serves_raw_uint16_patches(trained, training_data):
    import mlflow

    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("cloudscreen-classifier", tracking.CHALLENGER)
    assert str(version.version) == trained.model_version and version.run_id == trained.run_id
    served = mlflow.pyfunc.load_model("models:/cloudscreen-classifier@challenger")
    (spec,) = json.loads(served.metadata.signature.to_dict()["inputs"])
    assert spec["tensor-spec"] == {"dtype": "uint16", "shape": [-1, 120, 120, 3]}
    manifest = pd.read_parquet(training_data.manifest())
    patches = load_patches(training_data.tiles, manifest["patch_id"].head(8).tolist())
    scores = served.predict(patches)
    assert scores.shape == (8,) and scores.dtype == np.float32 and ((scores >= 0) & (scores <= 1)).all()
    keras_model = mlflow.keras.load_model(f"runs:/{trained.run_id}/{tracking.KERAS_ARTIFACT}")
    direct = np.asarray(keras_model(patches.astype(np.float32), training=False)).reshape(-1)
    np.testing.assert_allclose(scores, direct, rtol=1e-5)


def test_packaged_normalisation_is_the_train_splits_alone(trained, training_data):
    import mlflow

    recorded = mlflow.artifacts.load_dict(f"runs:/{trained.run_id}/preprocessing.json")
    manifest = pd.read_parquet(training_data.manifest())
    train_ids = manifest.loc[manifest["split"] == "train", "patch_id"].tolist()
    all_ids = manifest["patch_id"].tolist()
    train_mean = load_patches(training_data.tiles, train_ids).astype(np.float64).mean(axis=(0, 1, 2))
    all_mean = load_patches(training_data.tiles, all_ids).astype(np.float64).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(recorded["mean"], train_mean, rtol=1e-9)
    assert not np.allclose(recorded["mean"], all_mean, rtol=1e-9)  # val and test never leak into it
    assert recorded["channels"] == ["B04", "B03", "B02"] and recorded["dtype"] == "uint16"


def test_a_run_without_a_budget_records_what_ended_it(run, trained):
    assert run.data.tags[TAG_STOPPED_BY] == "epochs"  # 3 epochs, early-stopping patience 12
    assert trained.epochs == 3
    assert run.data.params["budget_minutes"] == "None" and run.data.params["budget_usd"] == "None"
    assert run.data.params["budget_seconds"] == "none"


def test_a_tiny_budget_stops_training_after_the_epoch_in_progress(training_data, tracking_uri):
    import mlflow

    lineage = tracking.Lineage.from_environment(snapshot="2026-11-16", data_version=None)
    # 60 ms: spent before the first epoch ends, which still finishes (as AutoML's node-hour budget does)
    result = train(
        manifest=training_data.manifest(), tiles=training_data.tiles, lineage=lineage, register=False,
        **sections("train.epochs=5", "train.budget_minutes=0.001"),
    )  # fmt: skip
    run = mlflow.get_run(result.run_id)
    assert result.epochs == 1 and run.data.metrics["epochs_run"] == 1
    assert run.data.tags[TAG_STOPPED_BY] == "budget"
    assert float(run.data.params["budget_minutes"]) == 0.001 and run.data.params["budget_usd"] == "None"
    assert float(run.data.params["budget_seconds"]) == pytest.approx(0.06, abs=0.05)
    history = mlflow.MlflowClient().get_metric_history(result.run_id, "val_loss")
    assert [m.step for m in history] == [0]
    assert run.data.metrics["best_epoch"] == 0 and run.data.metrics["best_val_loss"] == history[0].value


def test_the_cosine_schedule_anneals_to_the_floor_by_the_last_epoch(training_data, tracking_uri):
    import mlflow

    lineage = tracking.Lineage.from_environment(snapshot="2026-11-16", data_version=None)
    result = train(
        manifest=training_data.manifest(), tiles=training_data.tiles, lineage=lineage, register=False,
        **sections("train.schedule=cosine", "train.warmup_epochs=1", "train.learning_rate=0.001",
                   "train.min_learning_rate=0.00001"),
    )  # fmt: skip
    history = mlflow.MlflowClient().get_metric_history(result.run_id, "learning_rate")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert rates == pytest.approx([0.0005, 0.001, 0.00001], rel=1e-5)  # warm-up, peak, floor (3 epochs)
    assert mlflow.get_run(result.run_id).data.params["schedule"] == "cosine"


def _history(run_id: str, name: str) -> list[float]:
    import mlflow

    return [m.value for m in sorted(mlflow.MlflowClient().get_metric_history(run_id, name), key=lambda m: m.step)]


def test_weight_averaging_validates_and_keeps_the_averaged_weights_of_the_selected_epoch(training_data, tracking_uri):
    """train.ema_momentum with selection on val AUC: the epoch kept is the one with the best val_auc, and the logged
    model is what was validated then: its val loss is that epoch's val_loss (the average, not the raw weights)."""
    import keras
    import mlflow

    lineage = tracking.Lineage.from_environment(snapshot="2026-11-16", data_version=None)
    data = {"manifest": training_data.manifest(), "tiles": training_data.tiles, "lineage": lineage, "register": False}
    runs = {
        averaged: train(
            **data, **sections("train.epochs=4", f"train.ema_momentum={averaged}", "train.selection_metric=val_auc")
        )
        for averaged in ("0.9", "null")
    }
    result = runs["0.9"]
    run = mlflow.get_run(result.run_id)
    assert run.data.params["ema_momentum"] == "0.9" and run.data.params["selection_metric"] == "val_auc"
    val_auc, val_loss = _history(result.run_id, "val_auc"), _history(result.run_id, "val_loss")
    best = int(np.argmax(val_auc))  # the first best: EarlyStopping keeps strict improvements only
    assert run.data.metrics["best_epoch"] == best and run.data.metrics["best_val_pr_auc"] > 0

    manifest = pd.read_parquet(training_data.manifest())
    val = manifest[manifest["split"] == "val"]
    patches = load_patches(training_data.tiles, val["patch_id"].tolist()).astype(np.float32)
    model = mlflow.keras.load_model(f"runs:/{result.run_id}/{tracking.KERAS_ARTIFACT}")
    scores = np.asarray(model(patches, training=False)).reshape(-1, 1)
    loss = float(keras.losses.BinaryCrossentropy()(val["label"].to_numpy(np.float32).reshape(-1, 1), scores))
    assert loss == pytest.approx(val_loss[best], rel=1e-4)
    # Validation saw the average: the same training without it validates other weights (not a rounding difference).
    raw = _history(runs["null"].run_id, "val_loss")
    assert max(abs(a - b) for a, b in zip(raw, val_loss, strict=False)) > 1e-3


def test_a_checkpoint_keeps_the_weights_average_for_a_resumed_run(tmp_path):
    """The optimizer's moving average is in the weights file a killed run resumes from (tasks.train builds the
    optimizer before loading it), so a resumed run goes on averaging from where it was."""
    import keras

    params = sections()
    patches = np.random.default_rng(0).integers(0, 3000, size=(16, 120, 120, 3)).astype(np.float32)
    labels = np.arange(16) % 2

    def model() -> keras.Model:
        built = build_model(params["model_params"], [1000.0] * 3, [1e5] * 3)
        compile_for_training(built, "adam", 0.01, ema_momentum=0.9)
        return built

    trained_model = model()
    for step in range(4):  # steps, not fit: fit ends by writing the average over the weights
        trained_model.train_on_batch(patches[step % 2 :: 2], labels[step % 2 :: 2])
    trained_model.save_weights(tmp_path / "epoch.weights.h5")
    restored = model()
    restored.optimizer.build(restored.trainable_variables)
    restored.load_weights(tmp_path / "epoch.weights.h5")
    for saved, loaded in zip(
        trained_model.optimizer._model_variables_moving_average,
        restored.optimizer._model_variables_moving_average,
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(saved), np.asarray(loaded))
    averages = [np.asarray(v) for v in restored.optimizer._model_variables_moving_average]
    assert any(not np.allclose(a, np.asarray(w)) for a, w in zip(averages, restored.trainable_variables, strict=True))


def _cli(training_data, tmp_path: Path, *extra: str) -> list[str]:
    overrides = [a for item in (*TINY, *QUICK) for a in ("--set", item)]
    return [
        sys.executable, "-m", "tasks.train", "--params", str(REPO / "params.yaml"),
        "--manifest", str(training_data.manifest()), "--tiles", str(training_data.tiles), *overrides, *extra,
    ]  # fmt: skip


def test_cli_prints_the_run_id_alone_and_writes_the_xcom_file(training_data, tracking_uri, tmp_path):
    xcom = tmp_path / "airflow" / "xcom" / "return.json"
    env = os.environ | {"CLOUDSCREEN_SNAPSHOT": "manual__1", "CLOUDSCREEN_IMAGE": "trainer@sha256:feed"}
    done = subprocess.run(
        _cli(training_data, tmp_path, "--set-param", "epochs=1", "--xcom-out", str(xcom)),
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = done.stdout.strip()
    assert len(run_id) == 32 and "\n" not in run_id
    result = json.loads(xcom.read_text())
    assert result["run_id"] == run_id and result["model_version"]
    import mlflow

    tags = mlflow.get_run(run_id).data.tags
    assert tags[tracking.TAG_SNAPSHOT] == "manual__1" and tags[tracking.TAG_IMAGE] == "trainer@sha256:feed"
    assert mlflow.get_run(run_id).data.params["epochs"] == "1"


def test_a_killed_trainer_resumes_in_the_same_run_and_a_finished_one_is_not_retrained(
    training_data, tracking_uri, tmp_path
):
    import mlflow

    checkpoints = tmp_path / "checkpoints"
    command = _cli(training_data, tmp_path, "--set-param", "epochs=6", "--checkpoint-dir", str(checkpoints))
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=tmp_path)
    state_file = checkpoints / RUN_STATE_FILE
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if state_file.exists() and json.loads(state_file.read_text())["epochs"] >= 2:
            break
        assert first.poll() is None, "the trainer finished before it could be killed"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at_ms = time.time() * 1000
    killed = json.loads(state_file.read_text())
    assert killed["status"] == "running" and 2 <= killed["epochs"] < 6

    second = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert second.returncode == 0, (second.returncode, second.stderr[-5000:])
    assert second.stdout.strip() == killed["run_id"]
    history = mlflow.MlflowClient().get_metric_history(killed["run_id"], "val_loss")
    steps = [m.step for m in history]
    assert sorted(set(steps)) == list(range(max(steps) + 1)) and max(steps) >= killed["epochs"]
    # the second attempt started from the last backed-up epoch, not from scratch
    resumed_steps = [m.step for m in history if m.timestamp > killed_at_ms]
    assert min(resumed_steps) >= killed["epochs"] - 1
    finished = json.loads(state_file.read_text())
    assert finished["status"] == "finished" and finished["seconds"] > killed["seconds"]

    third = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert third.returncode == 0 and third.stdout.strip() == killed["run_id"]
    assert "not training again" in third.stderr

    # the same checkpoint directory with other params is another training, not a resumption
    other = subprocess.run(
        [*command, "--set-param", "learning_rate=0.001"], capture_output=True, text=True, cwd=tmp_path
    )
    assert other.returncode == 0 and other.stdout.strip() != killed["run_id"]
    assert "belongs to other inputs or params" in other.stderr


def test_a_missing_manifest_is_a_one_line_error_naming_it(training_data, tmp_path):
    missing = tmp_path / "nowhere" / "manifest.parquet"
    command = _cli(training_data, tmp_path)
    command[command.index("--manifest") + 1] = str(missing)
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2
    assert f"{missing}: manifest not found" in done.stderr and "Traceback" not in done.stderr
