"""The DAGs end to end with `dag.test()` on a small mirror and the local backend: real task code, real Airflow
dependency handling, a GCS emulator as the DVC remote, an MLflow SQLite store, and an SMTP server on loopback that
receives the alerts."""

from __future__ import annotations

import contextlib
import email
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ops.gcs_emulator import local_gcs_emulator
from tasks.lib import pipeline as pipeline_module
from tasks.lib import tracking
from tasks.lib.config import load_section
from tasks.mirror import MirrorParams, build_mirror
from tests.e2e.conftest import write_params

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
REGISTERED = "cloudscreen-classifier"
ALERTS_TO = "ops@cloudscreen.example"


class Inbox:
    """An aiosmtpd handler keeping every message it receives."""

    def __init__(self) -> None:
        self.messages: list[email.message.Message] = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"

    @staticmethod
    def text(message: email.message.Message) -> str:
        """Every text part of a message, decoded."""
        parts = message.walk() if message.is_multipart() else [message]
        return "\n".join(
            part.get_payload(decode=True).decode(errors="replace")
            for part in parts
            if part.get_content_maintype() == "text"
        )

    def subjects(self) -> list[str]:
        return [str(m["Subject"]) for m in self.messages]

    def wait_for(self, text: str, timeout: float = 30.0) -> email.message.Message:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.messages:
                if text in str(message["Subject"]):
                    return message
            time.sleep(0.2)
        raise AssertionError(f"no message whose subject holds {text!r}; received {self.subjects()}")


@contextlib.contextmanager
def smtp_server() -> Iterator[tuple[Inbox, int]]:
    from aiosmtpd.controller import Controller

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


class Pipeline:
    """A data root, a params file, an Airflow home and the environment every DAG run of this module gets."""

    def __init__(self, root: Path, emulator: str, archive: Path, smtp_port: int, inbox: Inbox):
        self.root = root
        self.data = root / "data"
        self.params = root / "params.yaml"
        self.inbox = inbox
        write_params(self.params, data_root=self.data)
        params = yaml.safe_load(self.params.read_text())
        params["pipeline"]["alerts"]["to"] = [ALERTS_TO]
        self.params.write_text(yaml.safe_dump(params, sort_keys=False))
        # One archive, given to the refresh's form: the params' source is the scheduler tests' per-interval archives.
        self.refresh_form = {"source": f"file://{archive}", "checksum_url": f"file://{archive}.sha256"}
        self.tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        self.env = {
            **os.environ,
            "CLOUDSCREEN_PARAMS": str(self.params),
            "STORAGE_EMULATOR_HOST": emulator,
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            # The alerts' SMTP server (pipeline.alerts.smtp_conn_id), plain SMTP on loopback.
            "AIRFLOW_CONN_SMTP_DEFAULT": f"smtp://127.0.0.1:{smtp_port}?disable_tls=true&disable_ssl=true",
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
    with local_gcs_emulator("cloudscreen") as emulator, smtp_server() as (inbox, port):
        yield Pipeline(root, emulator, mirror.archive, port, inbox)


@pytest.fixture(scope="module")
def refreshed(pipeline):
    return pipeline.run("cloudscreen_refresh", pipeline.refresh_form)


@pytest.fixture(scope="module")
def trained(pipeline, refreshed):
    return pipeline.run("cloudscreen_training")


def test_refresh_writes_one_snapshot_and_records_its_data_version(pipeline, refreshed):
    assert refreshed["state"] == "success"
    states = refreshed["task_states"]
    assert states.pop("ingest") == "skipped"  # params.yaml's pipeline.ingest: extract
    assert set(states.values()) == {"success"}
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
    length = f"{run.data.metrics['epochs_run']:.0f} epochs (stopped by {run.data.tags[tracking.TAG_STOPPED_BY]})"
    assert length in summary["text"]  # how long it trained, and why it stopped
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
    assert tags[pipeline_module.TAG_TRIGGER] == "manual"  # why it trained
    # One message for the gate's decision, to the configured address, with the reasons and the run.
    message = pipeline.inbox.wait_for(f"cloudscreen gate: {summary['decision']}")
    assert message["To"] == ALERTS_TO
    assert summary["run_id"] in pipeline.inbox.text(message)  # the challenger's run, linked


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
    assert again["task_states"]["new_champion"] == "success"  # the cloudscreen_champion Asset got its event
    pipeline.inbox.wait_for("cloudscreen gate: forced")


def test_screening_screens_the_newest_snapshot_with_the_champion_once(pipeline, refreshed, trained):
    """After the forced promotion above: the champion screens the snapshot (restored from the remote, its files were
    removed), at the threshold the gate recorded; a second run finds the screening done."""
    import mlflow

    mlflow.set_tracking_uri(pipeline.tracking_uri)
    champion = mlflow.MlflowClient().get_model_version_by_alias(REGISTERED, tracking.CHAMPION)
    threshold = float(champion.tags[tracking.TAG_OPERATING_THRESHOLD])
    record = refreshed["results"]["version"]

    first = pipeline.run("cloudscreen_screening")
    assert first["state"] == "success", first["task_states"]
    plan = first["results"]["plan"]
    assert plan["snapshots"] == [record["snapshot"]] and plan["version"] == str(champion.version)
    assert plan["threshold"] == threshold
    screened = first["results"]["screen"]
    assert not screened["skipped"] and screened["data_version"] == record["data_version"]
    out = pipeline.data / "screened" / record["snapshot"] / str(champion.version)
    assert screened["out"] == str(out) and (out / "clear.parquet").is_file()
    assert (
        screened["patches"] == refreshed["results"]["tile"]["patches"] and 0 <= screened["clear"] <= screened["patches"]
    )
    run = mlflow.MlflowClient().get_run(screened["mlflow_run_id"])
    assert run.data.tags[tracking.TAG_DAG_ID] == "cloudscreen_screening"
    assert run.data.tags[tracking.TAG_DATA_VERSION] == record["data_version"]
    assert first["results"]["summary"]["snapshots"] == [record["snapshot"]]
    # Monitored against the champion's own training data: the same snapshot, so ok, and no retraining requested.
    monitored = first["results"]["monitor"]
    assert monitored["reference"] == record["snapshot"] and monitored["decision"] == "ok", monitored["reasons"]
    assert first["task_states"]["request_retraining"] == "skipped"
    assert first["task_states"]["summary"] == "success"

    again = pipeline.run("cloudscreen_screening", {"snapshot": record["snapshot"]})
    assert again["state"] == "success" and again["results"]["screen"]["skipped"]
    assert again["results"]["screen"]["mlflow_run_id"] == screened["mlflow_run_id"]


def test_screening_refuses_a_version_without_a_threshold(pipeline, refreshed, trained):
    """A version the gate never promoted carries no threshold: the plan refuses it, at once, not at 0.5."""
    import mlflow

    mlflow.set_tracking_uri(pipeline.tracking_uri)
    run_id = trained["results"]["train_local"]["run_id"]
    bare = mlflow.register_model(tracking.run_model_uri(run_id), REGISTERED).version  # a fresh version, no tags
    failed = pipeline.run("cloudscreen_screening", {"model": f"models:/{REGISTERED}/{bare}"}, succeed=False)
    assert failed["state"] == "failed" and failed["task_states"]["plan"] == "failed"
    assert failed["task_tries"]["plan"] == 1  # permanent: no retries
    message = pipeline.inbox.wait_for("cloudscreen: cloudscreen_screening failed in plan")
    assert "operating threshold" in pipeline.inbox.text(message)


def test_a_snapshot_with_the_baseline_04_offset_is_drift_and_requests_retraining(pipeline, refreshed, trained):
    """A refresh of the same patches with processing baseline 04.00's +1,000, streamed (the refresh form's other
    ingest path): the screening's monitoring says drift, names the bands, emits the cloudscreen_drift Asset event and
    sends the alert."""
    shifted = build_mirror(
        out=pipeline.root / "shifted",
        params=load_section(
            "mirror", MirrorParams, overrides=["mirror.patches=160", "mirror.seed=5", "mirror.shifts=[offset=1000]"]
        ),
        workers=1,
    )
    archive = shifted.archive
    refresh = pipeline.run(
        "cloudscreen_refresh",
        {"snapshot": "offset", "source": f"file://{archive}", "checksum_url": f"file://{archive}.sha256",
         "ingest": "stream"},
    )  # fmt: skip
    assert refresh["state"] == "success", refresh["task_states"]
    states = refresh["task_states"]
    assert {states[t] for t in ("download", "validate", "tile")} == {"skipped"} and states["ingest"] == "success"
    tiles = Path(refresh["results"]["version"]["tiles"])
    assert tiles == pipeline.data / "ingested" / "offset" / "tiles" and refresh["results"]["tiles"]["patches"] > 0
    assert not (pipeline.data / "raw" / "offset").exists()  # nothing extracted
    ingested = refresh["results"]["ingest"]
    assert ingested["quarantined"] == 0 and Path(ingested["data_docs"]).is_file()
    screening = pipeline.run("cloudscreen_screening", {"snapshot": "offset"})
    assert screening["state"] == "success", screening["task_states"]
    monitored = screening["results"]["monitor"]
    assert monitored["decision"] == "drift" and monitored["reference"] == refreshed["results"]["version"]["snapshot"]
    assert any(reason.startswith("B04_mean: ") for reason in monitored["reasons"])
    request = screening["results"]["request_retraining"]
    assert request["snapshot"] == "offset" and request["decision"] == "drift"
    assert screening["results"]["summary"]["decisions"] == {"offset": "drift"}
    pipeline.inbox.wait_for("cloudscreen monitoring: drift in snapshot offset")
