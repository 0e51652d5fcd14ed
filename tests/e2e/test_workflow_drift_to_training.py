"""Retraining on drift through the real scheduler: `airflow standalone` with `pipeline.retrain_on: drift`.

A stack of its own, whose scheduler creates runs from Asset events (the shared stack's turns that off, with the time
schedules): the start date lies in the future, so no time-scheduled run can start while the test runs. The refresh
DAG refreshes one snapshot, through the scheduler, and announces it on `cloudscreen_training_data`; training must not
follow it. Then the `cloudscreen_drift` event that the screening DAG's monitoring emits on a drift verdict is created
over the REST API (as the UI's "Create Asset Event" does; tests/e2e/test_dag_runs.py checks that a real screening of a
drifted snapshot emits it): the scheduler must start one training run, for that event alone, which trains the
snapshot and records in its MLflow run why it trained.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mlflow
import pytest

from tasks.lib import pipeline
from tests.e2e.conftest import INTERVALS, REFRESH, TRAINING, E2EStack, start_stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SNAPSHOT = INTERVALS[0]
REFRESH_TIMEOUT = 600.0
TRAINING_TIMEOUT = 900.0  # one training run (1 epoch on 48 patches), evaluation and gate: a few minutes here
REASONS = ["B04_mean: wasserstein 1.412 >= 0.08", "B03_mean: wasserstein 1.377 >= 0.08"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2EStack]:
    overrides = ["pipeline.retrain_on=drift", "pipeline.start_date=2099-01-01"]
    with start_stack(tmp_path_factory.mktemp("drift"), snapshots=[SNAPSHOT], params=overrides, job_schedule=True) as s:
        yield s


def finished_runs(stack: E2EStack, dag_id: str, what: str, timeout: float) -> list[dict[str, Any]]:
    """The DAG's runs once there is one and every one has finished."""
    client = stack.airflow.client

    def done() -> list[dict[str, Any]] | None:
        runs = client.dag_runs(dag_id)
        return runs if runs and all(r["state"] in ("success", "failed") for r in runs) else None

    return stack.wait_for(dag_id, done, what, timeout)


@pytest.fixture(scope="module")
def retrained(stack: E2EStack) -> dict[str, Any]:
    client = stack.airflow.client
    client.set_paused(TRAINING, False)
    client.set_paused(REFRESH, False)
    client.post(f"/api/v2/dags/{REFRESH}/dagRuns", {"logical_date": None, "conf": {"snapshot": SNAPSHOT}})
    refreshes = finished_runs(stack, REFRESH, f"the refresh of {SNAPSHOT}", REFRESH_TIMEOUT)
    (drift_asset,) = [
        a for a in client.collect("/api/v2/assets", "assets") if a["name"] == pipeline.DRIFT_ASSET["name"]
    ]
    extra = {"snapshot": SNAPSHOT, "decision": "drift", "reasons": REASONS}
    drift = client.post("/api/v2/assets/events", {"asset_id": drift_asset["id"], "extra": extra})
    runs = finished_runs(stack, TRAINING, "the training run the drift event starts", TRAINING_TIMEOUT)
    run_id = runs[0]["dag_run_id"]
    return {
        "refreshes": refreshes,
        "new_data": client.collect(
            "/api/v2/assets/events", "asset_events", {"source_dag_id": REFRESH, "order_by": "timestamp"}
        ),
        "drift": drift,
        "runs": runs,
        "upstream": client.get(f"/api/v2/dags/{TRAINING}/dagRuns/{run_id}/upstreamAssetEvents")["asset_events"],
        "training_data": client.xcom(TRAINING, run_id, "training_data"),
        "trained": client.xcom(TRAINING, run_id, "training_result"),
    }


def test_a_new_snapshot_alone_starts_no_training_run(retrained):
    assert [r["state"] for r in retrained["refreshes"]] == ["success"], retrained["refreshes"]
    announced = [e for e in retrained["new_data"] if e["name"] == pipeline.TRAINING_DATA_ASSET["name"]]
    assert [e["extra"]["snapshot"] for e in announced] == [SNAPSHOT]
    assert len(retrained["runs"]) == 1, f"one training run, for the drift event: {retrained['runs']}"
    assert announced[0]["id"] not in [e["id"] for e in retrained["upstream"]]


def test_the_drift_event_starts_a_training_run_of_the_drifted_snapshot(retrained):
    (run,) = retrained["runs"]
    assert run["run_type"] == "asset_triggered" and run["state"] == "success", run
    assert [e["id"] for e in retrained["upstream"]] == [retrained["drift"]["id"]], retrained["upstream"]
    assert retrained["training_data"]["snapshot"] == SNAPSHOT


def test_the_training_run_records_why_it_trained(retrained, stack):
    data = retrained["training_data"]
    assert data["trigger"] == "drift"
    assert data["trigger_reasons"] == f"snapshot {SNAPSHOT}: drift: " + "; ".join(REASONS)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{stack.data_root.parent / 'mlflow.db'}")
    tags = client.get_run(retrained["trained"]["run_id"]).data.tags
    assert tags[pipeline.TAG_TRIGGER] == "drift"
    assert tags[pipeline.TAG_TRIGGER_REASONS] == data["trigger_reasons"]
