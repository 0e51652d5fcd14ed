"""Both DAGs end to end with `dag.test()` on a small mirror and the local backend: real task code, real Airflow
dependency handling, a GCS emulator as the DVC remote, an MLflow SQLite store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ops.gcs_emulator import local_gcs_emulator
from tasks.lib import tracking
from tasks.lib.config import load_section
from tasks.mirror import MirrorParams, build_mirror
from tests.e2e.conftest import write_params

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
REGISTERED = "cloudscreen-classifier"


class Pipeline:
    """A data root, a params file, an Airflow home and the environment every DAG run of this module gets."""

    def __init__(self, root: Path, emulator: str, archive: Path):
        self.root = root
        self.data = root / "data"
        self.params = root / "params.yaml"
        write_params(self.params, data_root=self.data)
        # One archive, given to the refresh's form: the params' source is the scheduler tests' per-interval archives.
        self.refresh_form = {"source": f"file://{archive}", "checksum_url": f"file://{archive}.sha256"}
        self.tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        self.env = {
            **os.environ,
            "CLOUDSCREEN_PARAMS": str(self.params),
            "STORAGE_EMULATOR_HOST": emulator,
            "MLFLOW_TRACKING_URI": self.tracking_uri,
        }
        self.env.pop("AIRFLOW_HOME", None)

    def run(self, dag_id: str, conf: dict | None = None, *, succeed: bool = True) -> dict:
        out = self.root / f"{dag_id}.json"
        proc = subprocess.run(
            [sys.executable, "-m", "demo.airflow_local", dag_id, "--home", str(self.root / "airflow"),
             "--conf", json.dumps(conf or {}), "--out", str(out)],
            cwd=self.root, env={**self.env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if succeed and proc.returncode != 0:
            pytest.fail(f"{dag_id} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}")
        return json.loads(out.read_text())


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("dag_runs")
    mirror = build_mirror(
        out=root / "mirror",
        params=load_section("mirror", MirrorParams, overrides=["mirror.patches=160", "mirror.seed=5"]),
        workers=1,
    )
    with local_gcs_emulator("cloudscreen") as emulator:
        yield Pipeline(root, emulator, mirror.archive)


@pytest.fixture(scope="module")
def refreshed(pipeline):
    return pipeline.run("cloudscreen_refresh", pipeline.refresh_form)


@pytest.fixture(scope="module")
def trained(pipeline, refreshed):
    return pipeline.run("cloudscreen_training")


def test_refresh_writes_one_snapshot_and_records_its_data_version(pipeline, refreshed):
    assert refreshed["state"] == "success"
    assert set(refreshed["task_states"].values()) == {"success"}
    record = refreshed["results"]["version"]
    snapshot = record["snapshot"]
    assert snapshot == refreshed["run_id"]  # a manual run is keyed by its run id
    for stage in ("raw", "validated", "tiles", "samples", "versions"):
        assert (pipeline.data / stage / snapshot).is_dir(), stage
    on_disk = json.loads((pipeline.data / "snapshots" / f"{snapshot}.json").read_text())
    assert on_disk == record
    assert record["data_version"].endswith(".dir")
    assert refreshed["results"]["validate"]["quarantined"] == 0
    assert Path(refreshed["results"]["sample"]["sets"]["small"]["manifest"]).is_file()


def test_training_trains_evaluates_and_gates_on_the_pinned_snapshot(pipeline, refreshed, trained):
    import mlflow

    assert trained["state"] == "success", trained["task_states"]
    assert trained["task_states"]["train_local"] == "success"
    assert trained["task_states"]["train_docker"] == trained["task_states"]["train_kubernetes"] == "skipped"
    summary = trained["results"]["summary"]
    record = refreshed["results"]["version"]
    assert summary["snapshot"] == record["snapshot"] and summary["data_version"] == record["data_version"]
    assert summary["decision"] in {"bootstrap", "reject"}
    assert summary["run_id"] in summary["text"] and summary["decision"] in summary["text"]

    mlflow.set_tracking_uri(pipeline.tracking_uri)
    client = mlflow.MlflowClient()
    run = client.get_run(summary["run_id"])
    tags = run.data.tags
    # Pinned: the run says exactly which data and which DAG run it came from.
    assert tags[tracking.TAG_SNAPSHOT] == record["snapshot"]
    assert tags[tracking.TAG_DATA_VERSION] == record["data_version"]
    assert tags[tracking.TAG_DAG_ID] == "cloudscreen_training"
    assert tags[tracking.TAG_DAG_RUN_ID] == trained["run_id"]
    assert tags[tracking.TAG_GATE_DECISION] == summary["decision"]
    # What the training issue lists: params, per-epoch metrics, cost, evaluation metrics, the registered model.
    assert run.data.params["epochs"] == "1"
    assert {"val_loss", "train_loss", "cost_usd", "test_op_recall", "natural_roc_auc"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {tracking.GATE_FILE, tracking.EVALUATION_DIR} <= artifacts
    version = client.get_model_version_by_alias(REGISTERED, tracking.CHALLENGER)
    assert version.run_id == run.info.run_id == trained["results"]["train_local"]["run_id"]


def test_a_forced_retrain_of_a_named_snapshot_restores_its_data_from_the_remote(pipeline, refreshed, trained):
    """The trigger form: a chosen snapshot, epochs, a forced promotion with a reason. The snapshot's files are gone
    from the data root (another worker, a clean-up), so its data version comes back from the DVC remote."""
    import mlflow

    record = refreshed["results"]["version"]
    shutil.rmtree(record["tiles"])
    again = pipeline.run(
        "cloudscreen_training",
        {"snapshot": record["snapshot"], "epochs": 1, "force_promote": True, "reason": "e2e: audited override"},
    )
    assert again["state"] == "success", again["task_states"]
    data = again["results"]["training_data"]
    assert data["data_version"] == record["data_version"]
    assert data["tiles"].startswith(str(pipeline.data / "restored" / record["data_version"]))
    summary = again["results"]["summary"]
    assert summary["decision"] == "forced"
    assert summary["run_id"] != trained["results"]["summary"]["run_id"]  # another DAG run trains afresh

    mlflow.set_tracking_uri(pipeline.tracking_uri)
    champion = mlflow.MlflowClient().get_model_version_by_alias(REGISTERED, tracking.CHAMPION)
    assert champion.run_id == summary["run_id"]
