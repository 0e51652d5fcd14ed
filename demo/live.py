"""What `make demo` shows while it runs: one line per step and per DAG task (state, duration), live on a terminal.

Each DAG run goes to `python -m demo.airflow_local` in a subprocess whose whole output (Airflow's task logs, the
trainer's log) goes to a file; this process reads the run's task instances from the Airflow metadata database once a
second (read-only) and draws them. On a terminal the running task's line counts up in place, and the training task
shows a bar over its epochs (read from the trainer's `Epoch N/M` lines in the log); elsewhere (a pipe, CI) only the
finished lines are printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from demo import airflow_local

POLL_SECONDS = 1.0
_DONE = {"success", "failed", "skipped", "upstream_failed", "removed"}
_EPOCH = re.compile(rb"Epoch (\d+)/(\d+)")
_TAIL_BYTES = 65536
_NAME_WIDTH = 40
_RUNNING = f"  {{desc:<{_NAME_WIDTH}}} {'running':<15} {{elapsed}}{{postfix}}"  # tqdm's format of a running line


def _line(name: str, state: str, seconds: float | None) -> str:
    took = f"{seconds:6.1f} s" if seconds is not None else ""
    return f"  {name:<{_NAME_WIDTH}} {state:<15} {took}".rstrip()


class Console:
    """Lines for a person: finished steps as plain lines, the running one as a tqdm line that updates in place."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()

    def print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def bar(self, name: str) -> Any:
        from tqdm import tqdm

        return tqdm(
            desc=name,
            total=None,
            file=self.stream,
            leave=False,
            disable=not self.live,
            dynamic_ncols=True,
            bar_format=_RUNNING,
        )

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """A step of this process (no DAG): its line counts up while the block runs, then says how long it took."""
        bar, stop = self.bar(name), threading.Event()

        def tick() -> None:
            while not stop.wait(POLL_SECONDS):
                bar.refresh()

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        started, state = time.monotonic(), "failed"
        try:
            yield
            state = "done"
        finally:
            stop.set()
            ticker.join()
            bar.close()
            self.print(_line(name, state, time.monotonic() - started))


class _TaskLines:
    """The lines of one DAG run's tasks, from successive reads of its task instances."""

    def __init__(self, console: Console, dag_id: str, log: Path) -> None:
        self.console, self.dag_id, self.log = console, dag_id, log
        self.printed: set[tuple[str, int]] = set()
        self.running: dict[tuple[str, int], tuple[Any, float]] = {}  # bar, first seen running (monotonic)

    def update(self, rows: list[airflow_local.TaskRow]) -> None:
        for row in rows:
            key = (row.task_id, row.map_index)
            if key in self.printed:
                continue
            name = row.task_id if row.map_index < 0 else f"{row.task_id}[{row.map_index}]"
            if row.state in _DONE:
                seen = self.running.pop(key, None)
                if seen:
                    seen[0].close()
                duration = row.duration if row.duration is not None else (time.monotonic() - seen[1] if seen else None)
                state = row.state if row.try_number <= 1 else f"{row.state} (try {row.try_number})"
                self.console.print(_line(name, state, duration if row.state != "skipped" else None))
                self.printed.add(key)
            elif row.state in ("running", "up_for_retry", "queued", "scheduled", "deferred", "restarting"):
                if key not in self.running:
                    self.running[key] = (self.console.bar(name), time.monotonic())
                bar = self.running[key][0]
                if row.state == "up_for_retry":
                    bar.set_postfix_str(f"  retrying after try {row.try_number}", refresh=False)
                elif row.task_id.startswith("train"):
                    self._epochs(bar)
                bar.refresh()

    def _epochs(self, bar: Any) -> None:
        """The trainer's latest `Epoch N/M` line (Keras writes it as each epoch begins) as a bar over the epochs."""
        found: list[tuple[bytes, bytes]] = []
        with contextlib.suppress(OSError), self.log.open("rb") as f:
            f.seek(max(0, self.log.stat().st_size - _TAIL_BYTES))
            found = _EPOCH.findall(f.read())
        if found:
            epoch, epochs = (int(x) for x in found[-1])
            bar.bar_format = _RUNNING.replace("{postfix}", "  epoch {n}/{total} {bar:20}{postfix}")
            bar.total, bar.n = epochs, epoch

    def close(self) -> None:
        for bar, _ in self.running.values():
            bar.close()
        self.running.clear()


def run_dag(
    console: Console, dag_id: str, *, conf: dict[str, Any], home: Path, logs: Path
) -> airflow_local.DagRunOutcome:
    """Run `dag_id` with dag.test() in a subprocess, its output in logs/<dag_id>.log; draw its tasks meanwhile."""
    logs.mkdir(parents=True, exist_ok=True)
    log, out = logs / f"{dag_id}.log", logs / f"{dag_id}.json"
    out.unlink(missing_ok=True)
    after = airflow_local.latest_run_key(home)
    console.print(f"{dag_id}  (log: {_short(log)})")
    command = [sys.executable, "-m", "demo.airflow_local", dag_id, "--home", str(home), "--conf", json.dumps(conf)]
    lines = _TaskLines(console, dag_id, log)
    with log.open("wb") as output:
        proc = subprocess.Popen(
            [*command, "--out", str(out)], stdout=output, stderr=subprocess.STDOUT, env=os.environ.copy()
        )
        try:
            while proc.poll() is None:
                lines.update(airflow_local.task_rows(home, dag_id, after)[1])
                time.sleep(POLL_SECONDS)
            lines.update(airflow_local.task_rows(home, dag_id, after)[1])
        finally:
            lines.close()
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    if not out.is_file():
        raise SystemExit(f"{dag_id}: dag.test() exited {proc.returncode} without an outcome; see {log}")
    return airflow_local.read_outcome(out)


def _short(path: Path) -> str:
    """A path relative to the working directory when it lies below it (the lines fit a terminal)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
