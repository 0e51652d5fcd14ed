"""The real `mlflow server` started by mlflow/server.sh: runs, models and aliases round-trip through it, artifacts land
in the (emulated) GCS bucket, bad configurations fail clearly, and no server process outlives its context."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.tracking_server import SERVER_SCRIPT, TrackingServerError, mlflow_server

pytestmark = pytest.mark.integration

MODEL_NAME = "cloudscreen-classifier"


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A loopback port something already listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def _threshold_model():
    """A pyfunc model: cloud probability 1.0 where mean brightness passes 0.5 (defined here, pickled by value)."""
    import mlflow.pyfunc

    class Threshold(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return (model_input["brightness"] > 0.5).astype("float64").to_numpy()

    return Threshold()


def _group_members(pattern: str) -> tuple[set[int], set[int]]:
    """(process groups of processes whose command line contains `pattern`, every pid in those groups)."""
    listing = subprocess.check_output(["ps", "-ww", "-eo", "pid=,pgid=,args="], text=True)  # -ww: never truncate
    rows = [line.split(None, 2) for line in listing.splitlines()]
    groups = {int(pgid) for pid, pgid, *args in rows if args and pattern in args[0] and int(pid) != os.getpid()}
    return groups, {int(pid) for pid, pgid, *_ in rows if int(pgid) in groups}


@pytest.mark.slow
def test_runs_models_and_aliases_round_trip_and_artifacts_land_in_the_bucket(
    mlflow_server, gcs_emulator, monkeypatch, tmp_path
):
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from tasks.lib.gcs import gcs_client

    emulator, bucket = gcs_emulator  # the instance the server writes to (both fixtures are function-scoped)
    # The client side has no object-store settings at all: every artifact byte must go through the server.
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("GIT_PYTHON_REFRESH", "quiet")
    mlflow.set_tracking_uri(mlflow_server)
    try:
        client = MlflowClient()
        experiment_id = mlflow.create_experiment("tracking-server-test")
        assert client.get_experiment(experiment_id).artifact_location.startswith("mlflow-artifacts:")
        examples = pd.DataFrame({"brightness": [0.1, 0.9, 0.4, 0.7]})
        with mlflow.start_run(experiment_id=experiment_id) as run:
            mlflow.log_params({"learning_rate": 3e-4, "batch_size": 128, "architecture": "cnn"})
            for epoch, (loss, accuracy) in enumerate([(0.69, 0.55), (0.41, 0.83), (0.28, 0.91)]):
                mlflow.log_metrics({"val_loss": loss, "val_accuracy": accuracy}, step=epoch)
            mlflow.set_tags({"cloudscreen.snapshot": "2026-11-16", "cloudscreen.git_commit": "abc123"})
            mlflow.log_text("val accuracy 0.91\n", "reports/summary.txt")
            logged = mlflow.pyfunc.log_model(
                name="model",
                python_model=_threshold_model(),
                registered_model_name=MODEL_NAME,
                input_example=examples,
                pip_requirements=["mlflow"],  # skips requirement inference, a subprocess that loads the model
            )
        version = logged.registered_model_version
        client.set_registered_model_alias(MODEL_NAME, "challenger", version)

        # Everything reads back through the server.
        got = client.get_run(run.info.run_id)
        assert got.data.params == {"learning_rate": "0.0003", "batch_size": "128", "architecture": "cnn"}
        assert got.data.tags["cloudscreen.snapshot"] == "2026-11-16"
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [(m.step, m.value) for m in history] == [(0, 0.55), (1, 0.83), (2, 0.91)]
        assert mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/reports/summary.txt") == "val accuracy 0.91\n"
        assert client.get_model_version_by_alias(MODEL_NAME, "challenger").version == version
        (tmp_path / "loaded").mkdir()
        loaded = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@challenger", dst_path=str(tmp_path / "loaded"))
        assert list(loaded.predict(examples)) == [0.0, 1.0, 0.0, 1.0]
    finally:
        mlflow.set_tracking_uri(None)

    # ... and the bytes live in the bucket, under the configured prefix.
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator)
    blobs = {blob.name: blob for blob in gcs_client().list_blobs(bucket, prefix="mlflow/")}
    summary = f"mlflow/{experiment_id}/{run.info.run_id}/artifacts/reports/summary.txt"
    assert blobs[summary].download_as_bytes() == b"val accuracy 0.91\n"
    assert any(name.endswith("/artifacts/MLmodel") and "/models/" in name for name in blobs), sorted(blobs)
    assert any(name.endswith("/python_model.pkl") for name in blobs), sorted(blobs)


@pytest.mark.slow
def test_no_server_process_outlives_the_context(tmp_path):
    # Two workers: mlflow forks uvicorn's supervisor, which spawns the workers (MLflow's job runner, off by default,
    # would add about eight processes to the same group; too heavy to start here on every test run).
    with mlflow_server(
        backend_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifacts_destination=str(tmp_path / "artifacts"), workers=2
    ) as uri:
        port = uri.rsplit(":", 1)[1]
        groups, members = _group_members(f"--port {port}")
        assert len(groups) == 1, groups
        assert len(members) >= 4, members  # bash exec'd into mlflow, uvicorn's supervisor, 2 workers
    after_groups, after_members = _group_members(f"--port {port}")
    assert not after_groups and not after_members
    for pid in members:
        assert not Path(f"/proc/{pid}").exists(), f"process {pid} of the server is still there"


def test_server_sh_refuses_a_taken_port_and_a_bad_backend_uri_clearly(listening_port, tmp_path):
    venv_bin = str(Path(sys.executable).parent)
    base = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}"}
    taken = subprocess.run(
        ["bash", str(SERVER_SCRIPT)],
        env={**base, "MLFLOW_PORT": str(listening_port), "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/m.db"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert taken.returncode == 2
    assert f"port {listening_port} on 127.0.0.1 is already in use" in taken.stderr
    bad = subprocess.run(
        ["bash", str(SERVER_SCRIPT)],
        env={**base, "MLFLOW_BACKEND_STORE_URI": "postgress://cloudscreen:s3cret@db:5432/mlflow"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2
    assert "unsupported scheme 'postgress'" in bad.stderr and "s3cret" not in bad.stderr


def test_launcher_refuses_a_taken_port(listening_port, tmp_path):
    with (
        pytest.raises(TrackingServerError, match=f"port {listening_port} on 127.0.0.1 is already in use"),
        mlflow_server(backend_uri=f"sqlite:///{tmp_path}/m.db", artifacts_destination="gs://b/p", port=listening_port),
    ):
        pass


def test_launcher_reports_why_the_script_rejected_the_backend(tmp_path):
    with (
        pytest.raises(TrackingServerError, match=r"exited with status 2(.|\n)*unsupported scheme 'mysqlx'") as err,
        mlflow_server(backend_uri="mysqlx://mlflow:s3cret@db/mlflow", artifacts_destination="gs://b/p"),
    ):
        pass
    assert "s3cret" not in str(err.value)


@pytest.mark.slow
def test_launcher_reports_the_tail_of_the_servers_own_error():
    # Passes the script's checks; MLflow itself then fails: the Postgres driver is not installed here.
    with (
        pytest.raises(TrackingServerError, match=r"exited with status 1(.|\n)*No module named 'psycopg2'"),
        mlflow_server(
            backend_uri="postgresql+psycopg2://mlflow:pw@127.0.0.1:1/mlflow", artifacts_destination="gs://b/p"
        ),
    ):
        pass
