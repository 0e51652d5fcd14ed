"""Run the project's DAGs in this process with `dag.test()`, against a local Airflow home (SQLite).

What `make demo` and the end-to-end tests use: the real DAG files, the real task code and Airflow's own dependency
and trigger-rule handling, without a scheduler. `configure()` must run before anything imports Airflow (Airflow reads
its configuration once, at import).

    python -m demo.airflow_local DAG_ID [--conf JSON] [--logical-date YYYY-MM-DD] [--out RESULT.json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DAGS = REPO / "dags"


def airflow_env(home: Path) -> dict[str, str]:
    """The variables that point Airflow at `home` and at the project's DAGs (no examples, no DAG pausing)."""
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
    }


def configure(home: Path) -> None:
    """Set the Airflow environment of this process and migrate the metadata database once."""
    if "airflow" in sys.modules and os.environ.get("AIRFLOW_HOME") != str(home):
        raise RuntimeError("Airflow was imported before configure(): its configuration is already fixed")
    home.mkdir(parents=True, exist_ok=True)
    os.environ.update(airflow_env(home))
    marker = home / ".migrated"
    if not marker.exists():
        # The CLI in a subprocess: migrating in-process would import Airflow with whatever logging it sets up.
        airflow = Path(sys.executable).parent / "airflow"
        subprocess.run([str(airflow), "db", "migrate"], check=True, env=os.environ.copy(), capture_output=True)
        marker.touch()


@dataclass(frozen=True)
class DagRunOutcome:
    dag_id: str
    run_id: str
    state: str
    seconds: float  # wall time of dag.test()
    task_states: dict[str, str]
    task_seconds: dict[str, float]  # each task instance's own duration (what the tasks computed)
    task_tries: dict[str, int]  # attempts each task made (1: it never retried)
    results: dict[str, Any]  # each task's return value (XCom)


def run_dag(
    dag_id: str, *, conf: dict[str, Any] | None = None, logical_date: dt.datetime | None = None
) -> DagRunOutcome:
    """Run one DAG run to completion in this process; its states, durations and results."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    bag = DagBag(dag_folder=str(DAGS))
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    started = time.monotonic()
    kwargs: dict[str, Any] = {"run_conf": conf or {}}
    if logical_date is not None:
        kwargs["logical_date"] = logical_date
    dag_run = bag.dags[dag_id].test(**kwargs)
    seconds = time.monotonic() - started
    with create_session() as session:
        instances = dag_run.get_task_instances(session=session)
        states = {ti.task_id: str(getattr(ti.state, "value", ti.state)) for ti in instances}
        durations = {ti.task_id: float(ti.duration or 0.0) for ti in instances}
        tries = {ti.task_id: int(ti.try_number or 0) for ti in instances}
        rows = session.scalars(XComModel.get_many(run_id=dag_run.run_id, dag_ids=dag_id, key="return_value")).all()
        results = {row.task_id: XComModel.deserialize_value(row) for row in rows}
    return DagRunOutcome(
        dag_id=dag_id,
        run_id=dag_run.run_id,
        state=str(getattr(dag_run.state, "value", dag_run.state)),
        seconds=seconds,
        task_states=states,
        task_seconds=durations,
        task_tries=tries,
        results=results,
    )


def read_outcome(path: Path) -> DagRunOutcome:
    """An outcome as `--out` wrote it."""
    return DagRunOutcome(**json.loads(path.read_text()))


@dataclass(frozen=True)
class TaskRow:
    """One task instance as the metadata database holds it while its DAG run goes on."""

    task_id: str
    map_index: int
    state: str | None  # None: not scheduled yet
    duration: float | None  # set once it has finished
    try_number: int


def _read_only(home: Path) -> sqlite3.Connection | None:
    database = home / "airflow.db"  # Airflow's default SQLite store under AIRFLOW_HOME, as configure() leaves it
    if not database.is_file():
        return None
    return sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=2.0)


def latest_run_key(home: Path) -> int:
    """The newest DAG run's row id (0 when there is none): runs started later have larger ones."""
    connection = _read_only(home)
    if connection is None:
        return 0
    with contextlib.closing(connection):
        return int(connection.execute("SELECT COALESCE(MAX(id), 0) FROM dag_run").fetchone()[0])


def task_rows(home: Path, dag_id: str, after: int) -> tuple[str | None, list[TaskRow]]:
    """The first run of `dag_id` newer than row id `after` and its task instances, read without writing.

    Reading while a run writes can meet a locked database: that read returns no rows and the next one catches up.
    """
    connection = _read_only(home)
    if connection is None:
        return None, []
    with contextlib.closing(connection):
        try:
            found = connection.execute(
                "SELECT run_id FROM dag_run WHERE dag_id = ? AND id > ? ORDER BY id LIMIT 1", (dag_id, after)
            ).fetchone()
            if found is None:
                return None, []
            rows = connection.execute(
                "SELECT task_id, map_index, state, duration, try_number FROM task_instance"
                " WHERE dag_id = ? AND run_id = ? ORDER BY start_date IS NULL, start_date, task_id, map_index",
                (dag_id, found[0]),
            ).fetchall()
        except sqlite3.OperationalError:  # locked, or the schema is being migrated
            return None, []
    return found[0], [TaskRow(t, int(m), s, d, int(n or 0)) for t, m, s, d, n in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dag_id")
    p.add_argument("--conf", type=json.loads, default={}, help="the run's conf (trigger form values) as JSON")
    p.add_argument("--logical-date", type=dt.date.fromisoformat)
    p.add_argument("--home", type=Path, default=Path(os.environ.get("AIRFLOW_HOME") or REPO / ".local" / "airflow"))
    p.add_argument("--out", type=Path, help="write the outcome as JSON here")
    args = p.parse_args()
    configure(args.home)
    logical = dt.datetime.combine(args.logical_date, dt.time(), dt.UTC) if args.logical_date else None
    outcome = run_dag(args.dag_id, conf=args.conf, logical_date=logical)
    if args.out:
        args.out.write_text(json.dumps(asdict(outcome), indent=2, default=str))
    print(f"{outcome.dag_id} {outcome.run_id}: {outcome.state} in {outcome.seconds:.0f} s")
    sys.exit(0 if outcome.state == "success" else 1)


if __name__ == "__main__":
    main()
