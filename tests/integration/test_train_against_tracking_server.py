"""The trainer against the real tracking server with artifacts on the GCS emulator, read back through the client.

The client side has MLFLOW_TRACKING_URI only (no STORAGE_EMULATOR_HOST): models and artifacts travel through the
server's proxy, as a training pod's would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tasks.lib import tracking
from tasks.lib.tiles import load_patches
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = [
    "model.conv_layers=[{filters: 4, kernel: 3, pool: 4}]",
    "model.dense_units=8",
    "train.system_metrics_interval_seconds=1",
]


def test_a_tiny_training_run_reads_back_completely_through_the_server(
    mlflow_server, gcs_emulator, training_data, tmp_path
):
    import mlflow
    from mlflow import MlflowClient

    _, bucket = gcs_emulator
    client_env = {k: v for k, v in os.environ.items() if k != "STORAGE_EMULATOR_HOST"}
    client_env |= {
        "MLFLOW_TRACKING_URI": mlflow_server,
        "CLOUDSCREEN_SNAPSHOT": "2026-11-16",
        "CLOUDSCREEN_DATA_VERSION": "4b1e0c3f9e5d4d0c8a7f6e5d4c3b2a19.dir",
        "CLOUDSCREEN_DAG_ID": "cloudscreen_training",
        "CLOUDSCREEN_DAG_RUN_ID": "scheduled__2026-11-16T00:00:00+00:00",
    }
    overrides = [a for item in TINY for a in ("--set", item)]
    xcom = tmp_path / "return.json"
    done = subprocess.run(
        [sys.executable, "-m", "tasks.train", "--params", str(REPO / "params.yaml"),
         "--manifest", str(training_data.manifest()), "--tiles", str(training_data.tiles), *overrides,
         "--set-param", "epochs=2", "--set-param", "batch_size=32", "--xcom-out", str(xcom)],
        capture_output=True, text=True, env=client_env, cwd=tmp_path, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = done.stdout.strip()
    assert json.loads(xcom.read_text()) == {"run_id": run_id, "model_version": "1"}

    mlflow.set_tracking_uri(mlflow_server)
    try:
        client = MlflowClient()
        run = client.get_run(run_id)
        assert run.data.params["model_architecture"] == "cnn" and run.data.params["epochs"] == "2"
        assert [m.step for m in client.get_metric_history(run_id, "val_auc")] == [0, 1]
        assert {"cost_usd", "cost_usd_per_1k_images", "images_per_second"} <= set(run.data.metrics)
        assert any(k.startswith("system/") for k in run.data.metrics)
        tags = run.data.tags
        assert tags[tracking.TAG_SNAPSHOT] == "2026-11-16" and tags[tracking.TAG_DAG_ID] == "cloudscreen_training"
        assert tags[tracking.TAG_DATA_VERSION] == "4b1e0c3f9e5d4d0c8a7f6e5d4c3b2a19.dir"
        assert tags["cloudscreen.tensorflow_version"] and tags["cloudscreen.cpu_cores"]
        assert run.inputs.dataset_inputs[0].dataset.name == "2026-11-16/small"
        assert mlflow.artifacts.load_dict(f"runs:/{run_id}/preprocessing.json")["channels"] == ["B04", "B03", "B02"]

        served = mlflow.pyfunc.load_model(f"models:/cloudscreen-classifier@{tracking.CHALLENGER}")
        manifest = pd.read_parquet(training_data.manifest())
        scores = served.predict(load_patches(training_data.tiles, manifest["patch_id"].head(4).tolist()))
        assert scores.shape == (4,) and np.isfinite(scores).all()
    finally:
        mlflow.set_tracking_uri(None)

    from tasks.lib.gcs import gcs_client

    names = [blob.name for blob in gcs_client().list_blobs(bucket, prefix="mlflow/")]
    assert any(n.endswith(f"{run_id}/artifacts/preprocessing.json") for n in names)
    assert any(n.endswith("/artifacts/model.keras") or n.endswith("/data/model.keras") for n in names), names
