"""A trainer on a spot GPU, killed with its machine: its checkpoint in the object store (the GCS emulator) lets a
trainer started again elsewhere, with an empty disk, finish the same MLflow run with every epoch logged once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tasks.lib.checkpoints import STATE_FILE
from tasks.lib.config import load_section
from tasks.lib.gcs import gcs_client
from tasks.lib.training_runs import CostParams
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EPOCHS = 6
TINY = [
    "model.conv_layers=[{filters: 4, kernel: 3, pool: 4}]",
    "model.dense_units=8",
    f"train.epochs={EPOCHS}",
    "train.batch_size=32",
    "train.system_metrics_interval_seconds=1",
]
PREFIX = "checkpoints/cloudscreen_training/manual__2026-11-16T00:00:00+00:00"


def _committed(bucket) -> dict | None:
    blob = bucket.blob(f"{PREFIX}/{STATE_FILE}")
    return json.loads(blob.download_as_bytes()) if blob.exists() else None


def test_a_killed_trainer_resumes_from_the_bucket_in_a_fresh_directory(gcs_emulator, training_data, tmp_path):
    import mlflow

    _, bucket_name = gcs_emulator
    bucket = gcs_client().bucket(bucket_name)
    url = f"gs://{bucket_name}/{PREFIX}"
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    # Artifacts outside both working directories, which stand for two machines' disks.
    mlflow.MlflowClient().create_experiment("cloudscreen", artifact_location=str(tmp_path / "artifacts"))
    env = os.environ | {"MLFLOW_TRACKING_URI": tracking_uri, "GIT_PYTHON_REFRESH": "quiet"}
    command = [
        sys.executable, "-m", "tasks.train", "--params", str(REPO / "params.yaml"),
        "--manifest", str(training_data.manifest()), "--tiles", str(training_data.tiles),
        *[a for item in TINY for a in ("--set", item)], "--checkpoint-url", url,
    ]  # fmt: skip
    first_disk, second_disk = tmp_path / "machine-1", tmp_path / "machine-2"
    first_disk.mkdir()
    second_disk.mkdir()
    log = (tmp_path / "first.log").open("w")
    try:
        first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, cwd=first_disk, env=env)
        deadline = time.monotonic() + 300
        while True:  # the first epoch committed to the bucket: the machine goes away during the next one
            state = _committed(bucket)
            if state and state["epochs"] >= 1:
                break
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no epoch reached the bucket"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        log.close()
    killed_at_ms = time.time() * 1000
    killed = _committed(bucket)
    assert killed["status"] == "running" and 1 <= killed["epochs"] < EPOCHS
    assert set(killed["files"]) == {killed["weights"], killed["best_weights"]}  # nothing half-uploaded is named

    started = time.monotonic()
    second = subprocess.run(command, capture_output=True, text=True, cwd=second_disk, env=env, timeout=900)
    second_seconds = time.monotonic() - started
    assert second.returncode == 0, second.stderr[-5000:]
    assert second.stdout.strip() == killed["run_id"]  # the same MLflow run
    assert f"resuming MLflow run {killed['run_id']}" in second.stderr
    assert list(second_disk.iterdir()) == []  # its local copy was a temporary directory

    client = mlflow.MlflowClient()
    run = client.get_run(killed["run_id"])
    assert run.info.status == "FINISHED"
    epochs_run = int(run.data.metrics["epochs_run"])
    for metric in ("val_loss", "train_loss", "epoch_seconds", "learning_rate"):
        steps = [m.step for m in client.get_metric_history(killed["run_id"], metric)]
        assert sorted(steps) == list(range(epochs_run)), (metric, steps)  # every epoch once, no gap
    history = client.get_metric_history(killed["run_id"], "val_loss")
    # The second attempt went on from the committed epochs instead of training them again.
    assert all(m.step >= killed["epochs"] - 1 for m in history if m.timestamp > killed_at_ms)
    assert run.data.tags["cloudscreen.stopped_by"] in ("epochs", "early_stopping")

    # cost_usd covers both attempts: the killed one's committed time and the whole second one
    seconds = run.data.metrics["train_seconds"]
    assert killed["seconds"] < seconds < killed["seconds"] + second_seconds
    price = load_section("cost", CostParams).machine_usd_per_hour["local"]
    assert run.data.metrics["cost_usd"] == pytest.approx(seconds / 3600 * price)

    # The bucket holds the finished state alone; a trainer started once more returns the run without training.
    finished = _committed(bucket)
    assert finished["status"] == "finished" and finished["files"] == {}
    assert [b.name for b in bucket.list_blobs(prefix=PREFIX + "/")] == [f"{PREFIX}/{STATE_FILE}"]
    third = subprocess.run(command, capture_output=True, text=True, cwd=second_disk, env=env, timeout=600)
    assert third.returncode == 0 and third.stdout.strip() == killed["run_id"]
    assert "not training again" in third.stderr
    mlflow.set_tracking_uri(None)
