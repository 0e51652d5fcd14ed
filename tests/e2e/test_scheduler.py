"""Backfills through the real scheduler: `airflow standalone`, the REST API, the refresh DAG on three small mirrors.

What an operator does in the UI, driven over the REST API: backfill three weekly intervals of cloudscreen_refresh,
then re-run one of them. Each interval must get its own snapshot (files, record, data version, Asset event), and the
re-run must reproduce the interval's data version while its steps find their outputs complete and skip.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.e2e.conftest import INTERVALS, REFRESH, TRAINING, E2EStack, utc_midnight

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ASSET = "cloudscreen_training_data"
STAGES = ("raw", "validated", "tiles", "samples", "versions")
RUN_TIMEOUT = 900.0  # three refresh runs, two at a time, on 2 shared cores: about 2-3 minutes here
STEPS = ("download", "validate", "tile", "sample", "version")


def backfill(stack: E2EStack, first: str, last: str, reprocess: str) -> dict[str, Any]:
    """Create a backfill of the refresh DAG's intervals from `first` to `last` (dates, inclusive) and wait until the
    scheduler has completed it; its record."""
    client = stack.airflow.client
    request = {
        "dag_id": REFRESH,
        "from_date": utc_midnight(first),
        "to_date": utc_midnight(last),
        "reprocess_behavior": reprocess,
        "max_active_runs": 2,  # as the DAG's own max_active_runs: two intervals at a time
    }
    created = client.post("/api/v2/backfills", request, ok=(200, 201, 409))
    if "id" not in created:
        # 409: the client sends a request the locked SQLite database refused (503) again, and the API may have
        # committed the backfill before refusing: that running backfill is this one when its dates are these.
        running = [b for b in client.collect("/api/v2/backfills", "backfills", {"dag_id": REFRESH})
                   if b["completed_at"] is None]  # fmt: skip
        assert [(b["from_date"][:10], b["to_date"][:10]) for b in running] == [(first, last)], (created, running)
        created = running[0]
    return stack.wait_for(
        REFRESH,
        lambda: (b := client.get(f"/api/v2/backfills/{created['id']}"))["completed_at"] and b,
        f"backfill {created['id']} of {REFRESH} from {first} to {last}",
        RUN_TIMEOUT,
    )


def results(stack: E2EStack, run_id: str) -> dict[str, Any]:
    """Each step's XCom (what the step returned) of one refresh run."""
    return {step: stack.airflow.client.xcom(REFRESH, run_id, step) for step in STEPS}


def records(stack: E2EStack) -> dict[str, dict[str, Any]]:
    folder = stack.data_root / "snapshots"
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def refresh_events(stack: E2EStack) -> list[dict[str, Any]]:
    events = stack.airflow.client.collect(
        "/api/v2/assets/events", "asset_events", {"source_dag_id": REFRESH, "order_by": "timestamp"}
    )
    return [e for e in events if e["name"] == ASSET]


@pytest.fixture(scope="module")
def backfilled(e2e_stack: E2EStack) -> dict[str, Any]:
    """The three intervals backfilled once: the runs by snapshot, each run's step results, the snapshot records."""
    client = e2e_stack.airflow.client
    assert client.dag(TRAINING)["is_paused"], "the training DAG must stay paused: these tests train nothing"
    client.set_paused(REFRESH, False)  # the scheduler runs no task of a paused DAG, backfilled or not
    backfill(e2e_stack, INTERVALS[0], INTERVALS[-1], reprocess="none")
    runs = {run["logical_date"][:10]: run for run in client.dag_runs(REFRESH)}
    return {
        "runs": runs,
        "results": {snapshot: results(e2e_stack, run["dag_run_id"]) for snapshot, run in runs.items()},
        "records": records(e2e_stack),
        "events": refresh_events(e2e_stack),
    }


def test_backfill_creates_one_successful_run_per_interval(backfilled):
    runs = backfilled["runs"]
    assert sorted(runs) == list(INTERVALS)
    for snapshot, run in runs.items():
        assert run["run_type"] == "backfill", run
        assert run["state"] == "success", run
        assert run["logical_date"] == utc_midnight(snapshot)


def test_each_interval_is_its_own_snapshot(backfilled, e2e_stack):
    records = backfilled["records"]
    assert sorted(records) == list(INTERVALS), "one snapshot record per interval, named by its logical date"
    for snapshot, record in records.items():
        assert record["snapshot"] == snapshot
        for stage in STAGES:
            assert (e2e_stack.data_root / stage / snapshot).is_dir(), f"no {stage}/{snapshot}"
        download = backfilled["results"][snapshot]["download"]
        assert download["url"].endswith(f"mirror-{snapshot}.tar.gz"), download  # the interval's own archive
        assert download["skipped"] is False
        assert backfilled["results"][snapshot]["version"]["data_version"] == record["data_version"]
    versions = {r["data_version"] for r in records.values()}
    assert len(versions) == len(INTERVALS), f"each mirror differs, so each data version must: {versions}"


def test_each_interval_updates_the_training_data_asset(backfilled):
    events = backfilled["events"]
    assert len(events) == len(INTERVALS), events
    by_snapshot = {e["extra"]["snapshot"]: e for e in events}
    assert sorted(by_snapshot) == list(INTERVALS)
    for snapshot, event in by_snapshot.items():
        assert event["extra"]["data_version"] == backfilled["records"][snapshot]["data_version"]
        assert event["source_run_id"] == backfilled["runs"][snapshot]["dag_run_id"]
        assert event["extra"]["as_of"] == backfilled["records"][snapshot]["as_of"]


def test_rerunning_an_interval_reproduces_its_data_version_and_skips_its_steps(backfilled, e2e_stack):
    snapshot = INTERVALS[1]
    before = backfilled["records"][snapshot]
    done = backfill(e2e_stack, snapshot, snapshot, reprocess="completed")
    runs = {run["logical_date"][:10]: run for run in e2e_stack.airflow.client.dag_runs(REFRESH)}
    assert sorted(runs) == list(INTERVALS), "a re-run reuses the interval's run; it creates no new one"
    run = runs[snapshot]
    assert run["state"] == "success", run
    assert run["dag_run_id"] == backfilled["runs"][snapshot]["dag_run_id"]
    assert run["end_date"] > backfilled["runs"][snapshot]["end_date"], f"backfill {done['id']} did not re-run it"

    again = results(e2e_stack, run["dag_run_id"])
    assert again["download"]["skipped"] is True
    assert again["validate"]["skipped"] is True
    assert again["tile"]["skipped"] is True
    assert all(s["skipped"] is True for s in again["sample"]["sets"].values()), again["sample"]
    assert again["version"]["data_version"] == before["data_version"]
    assert records(e2e_stack)[snapshot]["data_version"] == before["data_version"]

    events = refresh_events(e2e_stack)
    assert len(events) == len(INTERVALS) + 1
    assert events[-1]["extra"]["snapshot"] == snapshot
    assert events[-1]["extra"]["data_version"] == before["data_version"]
