"""demo.live and demo.airflow_local's read-only task query, on a small SQLite file shaped like Airflow's tables."""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path

from demo import airflow_local, live
from demo.run import wall_time


def _database(home: Path, runs: list[tuple[int, str, str]], tasks: list[tuple]) -> None:
    home.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(home / "airflow.db") as db:
        db.execute("CREATE TABLE dag_run (id INTEGER PRIMARY KEY, dag_id TEXT, run_id TEXT)")
        db.execute(
            "CREATE TABLE task_instance (task_id TEXT, dag_id TEXT, run_id TEXT, map_index INTEGER, state TEXT,"
            " start_date TEXT, end_date TEXT, duration REAL, try_number INTEGER)"
        )
        db.executemany("INSERT INTO dag_run VALUES (?, ?, ?)", runs)
        db.executemany("INSERT INTO task_instance VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", tasks)


def test_task_rows_reads_the_first_run_newer_than_the_mark(tmp_path: Path) -> None:
    _database(
        tmp_path,
        runs=[(1, "refresh", "old"), (2, "training", "other"), (3, "refresh", "new")],
        tasks=[
            ("download", "refresh", "old", -1, "success", "2026-01-01", "2026-01-01", 3.0, 1),
            ("validate", "refresh", "new", -1, "running", "2026-01-02 00:00:05", None, None, 1),
            ("download", "refresh", "new", -1, "success", "2026-01-02 00:00:01", "2026-01-02", 2.5, 2),
            ("tile", "refresh", "new", -1, None, None, None, None, 0),
        ],
    )
    assert airflow_local.latest_run_key(tmp_path) == 3
    run_id, rows = airflow_local.task_rows(tmp_path, "refresh", after=1)
    assert run_id == "new"
    # in the order they started; not started yet last
    assert [(r.task_id, r.state, r.duration, r.try_number) for r in rows] == [
        ("download", "success", 2.5, 2),
        ("validate", "running", None, 1),
        ("tile", None, None, 0),
    ]
    assert airflow_local.task_rows(tmp_path, "refresh", after=3) == (None, [])


def test_no_database_yet_means_no_rows(tmp_path: Path) -> None:
    assert airflow_local.latest_run_key(tmp_path) == 0
    assert airflow_local.task_rows(tmp_path, "refresh", after=0) == (None, [])


def test_each_task_gets_one_line_once_it_has_finished(tmp_path: Path) -> None:
    out = io.StringIO()  # not a terminal: no live lines, only the finished ones
    lines = live._TaskLines(live.Console(out), "training", tmp_path / "training.log")

    def row(task: str, state: str | None, duration: float | None = None, tries: int = 1) -> airflow_local.TaskRow:
        return airflow_local.TaskRow(task, -1, state, duration, tries)

    lines.update([row("train_local", "running"), row("evaluate", None)])
    assert out.getvalue() == ""
    lines.update([row("train_local", "success", 241.04), row("train_docker", "skipped"), row("evaluate", "running")])
    lines.update([row("train_local", "success", 241.04), row("evaluate", "failed", 3.0, tries=2)])
    lines.close()
    printed = out.getvalue().splitlines()
    assert len(printed) == 3
    assert printed[0].split() == ["train_local", "success", "241.0", "s"]
    assert printed[1].split() == ["train_docker", "skipped"]
    assert printed[2].split() == ["evaluate", "failed", "(try", "2)", "3.0", "s"]


def test_a_step_line_says_how_long_it_took() -> None:
    out = io.StringIO()
    with live.Console(out).step("BigEarthNet-format mirror"):
        pass
    assert out.getvalue().split()[:4] == ["BigEarthNet-format", "mirror", "done", "0.0"]


def test_the_wall_time_line_says_whether_the_target_was_met() -> None:
    assert wall_time(530).endswith("target under 10 min: met")
    assert wall_time(601).endswith("MISSED")
