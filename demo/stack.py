"""`airflow standalone` as a managed process: started on a loopback port, waited for, driven over REST, taken down.

What `make up` and the end-to-end scheduler tests use. `airflow_standalone()` starts the venv's `airflow standalone`
(scheduler, DAG processor, API server + UI, triggerer; SQLite, LocalExecutor) as the leader of a new session with
its own AIRFLOW_HOME, waits until `/api/v2/monitor/health` reports every component healthy, reads the generated
admin password, logs in over the REST API (a JWT from `POST /auth/token`), creates the pools the DAGs need and yields
an `AirflowStack`. On exit every process of the session is terminated (SIGTERM, then SIGKILL after a grace period):
the API server's workers, the executor's workers and the task supervisors, which put each task in a process group of
its own, included. Nothing here imports Airflow: it drives processes and HTTP.

    python -m demo.stack [--home DIR] [--port PORT]    run Airflow alone in the foreground until Ctrl-C
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from demo.airflow_local import REPO, airflow_env
from ops.tracking_server import free_port, port_free
from tasks.lib.errors import StackError

log = logging.getLogger(__name__)

AIRFLOW = Path(sys.executable).parent / "airflow"
PASSWORD_FILE = "simple_auth_manager_passwords.json.generated"
ADMIN = "admin"
HEALTH_PATH = "/api/v2/monitor/health"
COMPONENTS = ("metadatabase", "scheduler", "triggerer", "dag_processor")
OUTPUT_FILE = "standalone.log"
REQUEST_TIMEOUT = 30.0
LOCKED_RETRY_SECONDS = 60.0  # how long a request refused with "database is locked" (SQLite) is retried
PROBE_TIMEOUT = 5.0
START_TIMEOUT = 300.0  # a fresh home migrates its SQLite database first: about a minute on 2 busy cores
STOP_TIMEOUT = 30.0  # SIGTERM grace for every process of the session before SIGKILL
TAIL_CHARS = 4000


# --- the REST client ----------------------------------------------------------------------------------------------


class AirflowClient:
    """A small client of the Airflow 3 REST API (`/api/v2`) that logs in as one user of the simple auth manager."""

    def __init__(self, base_url: str, username: str, password: str, timeout: float = REQUEST_TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        self.username = username
        self.timeout = timeout
        self._password = password
        self._session = requests.Session()
        self._session.trust_env = False  # loopback never goes through a proxy from the environment
        self._token: str | None = None

    def token(self) -> str:
        """A JWT for the user (`POST /auth/token`), fetched once and again when the API says it expired."""
        if self._token is None:
            response = self._session.post(
                f"{self.base_url}/auth/token",
                json={"username": self.username, "password": self._password},
                timeout=self.timeout,
            )
            if response.status_code != 201:
                raise StackError(f"login as {self.username!r} failed: {response.status_code} {response.text[:300]}")
            self._token = response.json()["access_token"]
        return self._token

    def request(self, method: str, path: str, *, ok: Iterable[int] = (200, 201, 204), **kwargs: Any) -> Any:
        """Call `path` (e.g. `/api/v2/dags`); the decoded JSON body, or None for an empty one. A request refused
        because the SQLite database was locked (503) is sent again for a while.

        Raises:
            StackError: the status is not in `ok`; the message has the method, path, status and body.
        """
        relogged, deadline = False, time.monotonic() + LOCKED_RETRY_SECONDS
        while True:
            headers = {"Authorization": f"Bearer {self.token()}"}
            response = self._session.request(
                method, self.base_url + path, headers=headers, timeout=self.timeout, **kwargs
            )
            if response.status_code == 401 and not relogged:
                self._token, relogged = None, True  # expired: log in again once
                continue
            # SQLite takes one writer at a time: a write racing the scheduler's is refused and rolled back.
            if response.status_code == 503 and "locked" in response.text and time.monotonic() < deadline:
                log.info("%s %s: the database is locked; trying again", method, path)
                time.sleep(1.0)
                continue
            break
        if response.status_code not in set(ok):
            raise StackError(f"{method} {path}: {response.status_code} {response.text[:1000]}")
        return response.json() if response.content else None

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def find(self, path: str) -> Any:
        """GET `path`; None when it does not exist (404)."""
        try:
            return self.get(path)
        except StackError as exc:
            if f"GET {path}: 404 " in str(exc):
                return None
            raise

    def post(self, path: str, body: Any, **kwargs: Any) -> Any:
        return self.request("POST", path, json=body, **kwargs)

    def patch(self, path: str, body: Any, **kwargs: Any) -> Any:
        return self.request("PATCH", path, json=body, **kwargs)

    def collect(self, path: str, key: str, params: Mapping[str, Any] | None = None, page: int = 100) -> list[Any]:
        """Every item of a paginated collection (`{key: [...], "total_entries": N}`)."""
        items: list[Any] = []
        while True:
            body = self.get(path, params={**(params or {}), "limit": page, "offset": len(items)})
            items.extend(body[key])
            if not body[key] or len(items) >= body["total_entries"]:
                return items

    def dag(self, dag_id: str) -> dict[str, Any] | None:
        """The DAG's record (is_paused, ...), or None while the DAG processor has not parsed it yet."""
        return self.find(f"/api/v2/dags/{dag_id}")

    def set_paused(self, dag_id: str, paused: bool) -> None:
        self.patch(f"/api/v2/dags/{dag_id}", {"is_paused": paused})

    def dag_runs(self, dag_id: str) -> list[dict[str, Any]]:
        return self.collect(f"/api/v2/dags/{dag_id}/dagRuns", "dag_runs", {"order_by": "logical_date"})

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return self.collect(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances", "task_instances")

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        """A task's XCom value, deserialised by the API server."""
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}"
        return self.get(path, params={"deserialize": "true", "stringify": "false"})["value"]

    def ensure_pool(self, name: str, slots: int, description: str = "") -> None:
        """Create the pool, or set its slots and description when it exists."""
        body = {"name": name, "slots": slots, "description": description or None, "include_deferred": False}
        if self.find(f"/api/v2/pools/{name}") is None:
            self.post("/api/v2/pools", body)
        else:
            self.patch(f"/api/v2/pools/{name}", body)

    def import_errors(self) -> list[dict[str, Any]]:
        return self.collect("/api/v2/importErrors", "import_errors")

    def wait_for_dags(self, dag_ids: Iterable[str], timeout: float = 180.0) -> dict[str, dict[str, Any]]:
        """Wait until the DAG processor has parsed every DAG; their records.

        Raises:
            StackError: a DAG file failed to import (the message has the traceback) or not all DAGs appeared in time.
        """
        wanted = list(dag_ids)
        deadline = time.monotonic() + timeout
        while True:
            found = {dag_id: self.dag(dag_id) for dag_id in wanted}
            if all(found.values()):
                return found  # type: ignore[return-value]
            errors = self.import_errors()
            if errors:
                details = "\n".join(f"{e['filename']}:\n{e['stack_trace']}" for e in errors)
                raise StackError(f"DAG import errors:\n{details}")
            if time.monotonic() > deadline:
                missing = sorted(k for k, v in found.items() if not v)
                raise StackError(f"DAGs {missing} did not appear within {timeout:.0f} s")
            time.sleep(1.0)


# --- the stack ----------------------------------------------------------------------------------------------------


@dataclass
class AirflowStack:
    """A running `airflow standalone`: where it serves, who may log in, a logged-in client and its output."""

    url: str
    home: Path
    username: str
    password: str
    client: AirflowClient
    output: Path  # everything the standalone command and its components printed
    process: subprocess.Popen[bytes] = field(repr=False)

    def output_tail(self, chars: int = TAIL_CHARS) -> str:
        return _tail(self.output, chars)

    def component_output(self, component: str, lines: int = 50) -> str:
        """The last lines one component printed: scheduler, dag-processor, api-server, triggerer or standalone."""
        prefix = f"{component:10} |"  # how the standalone command labels each component's lines
        with self.output.open(errors="replace") as f:
            picked = [line.rstrip("\n") for line in f if line.startswith(prefix)]
        return "\n".join(picked[-lines:])

    def task_logs(self, dag_id: str | None = None, states: Iterable[str] | None = None) -> dict[str, str]:
        """Task log files under `$AIRFLOW_HOME/logs` (relative path → text), optionally of one DAG only, and only
        of the task instances whose state (from the REST API) is in `states`."""
        root = self.home / "logs"
        pattern = f"dag_id={dag_id}/**/*.log" if dag_id else "dag_id=*/**/*.log"
        logs = {str(p.relative_to(root)): p.read_text(errors="replace") for p in sorted(root.glob(pattern))}
        if states is None:
            return logs
        wanted = set(states)
        keep = set()
        for dag in {dag_id} if dag_id else {p.split("/")[0].removeprefix("dag_id=") for p in logs}:
            for run in self.client.dag_runs(dag):
                for ti in self.client.task_instances(dag, run["dag_run_id"]):
                    if ti["state"] in wanted:
                        keep.add(f"dag_id={dag}/run_id={run['dag_run_id']}/task_id={ti['task_id']}/")
        return {path: text for path, text in logs.items() if any(path.startswith(k) for k in keep)}


@contextlib.contextmanager
def airflow_standalone(
    home: Path,
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    pools: Mapping[str, int] | None = None,
    dags: Iterable[str] = (),
    output: Path | None = None,
    start_timeout: float = START_TIMEOUT,
) -> Iterator[AirflowStack]:
    """Run `airflow standalone` in a new session; yield the stack once it is healthy, logged in and set up.

    Args:
        home: AIRFLOW_HOME (created; its database is migrated by the standalone command itself).
        port: the API server's port (UI and REST API); None or 0 picks a free one.
        host: the interface the API server binds; the stack's URL uses 127.0.0.1 for 0.0.0.0.
        env: variables on top of this process's environment and `airflow_env(home)`, e.g. CLOUDSCREEN_PARAMS,
            STORAGE_EMULATOR_HOST or AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION (here: True unless set).
        cwd: the working directory of every Airflow process and so of every task (default: `home`).
        pools: pool name → slots, created (or updated) before the stack is yielded.
        dags: DAG ids to wait for (parsed by the DAG processor) before the stack is yielded.
        output: file for the processes' output (default: `home/standalone.log`, truncated).
        start_timeout: seconds to wait for the components to report healthy.

    Raises:
        StackError: the port is taken, Airflow exited or did not become healthy in time (with the tail of its
            output), or a DAG failed to import.
    """
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    if not AIRFLOW.exists():
        raise StackError(f"{AIRFLOW}: no airflow executable beside this Python (run `make setup`)")
    if not port:
        port = free_port(host)
    elif not port_free(host, port):
        raise StackError(f"port {port} on {host} is already in use: stop what listens there or choose another port")
    url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
    process_env = {
        **os.environ,
        **airflow_env(home),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        # The one admin user whose generated password the standalone command writes to PASSWORD_FILE.
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__API__HOST": host,
        "AIRFLOW__API__PORT": str(port),
        # Also where task processes reach the Execution API (`{base_url}/execution/`).
        "AIRFLOW__API__BASE_URL": url,
        "AIRFLOW__API__WORKERS": "1",
        "NO_COLOR": "1",  # plain `component | line` output
        **(env or {}),
        # The standalone command starts its components as `airflow ...` from PATH: this environment's.
        "PATH": os.pathsep.join([str(AIRFLOW.parent), os.environ.get("PATH", "")]),
    }
    output = output or home / OUTPUT_FILE
    log.info("starting airflow standalone at %s (AIRFLOW_HOME %s, output %s)", url, home, output)
    started = time.monotonic()
    with output.open("wb") as sink:
        proc = subprocess.Popen(
            [str(AIRFLOW), "standalone"],
            env=process_env,
            cwd=str(cwd or home),
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its pid is the session id every descendant keeps
        )
    try:
        _wait_healthy(proc, url, output, start_timeout)
        password = _admin_password(home, proc, output)
        client = AirflowClient(url, ADMIN, password)
        stack = AirflowStack(url, home, ADMIN, password, client, output, proc)
        for name, slots in (pools or {}).items():
            client.ensure_pool(name, slots, "created by demo.stack")
        client.wait_for_dags(dags)
        log.info("airflow ready at %s after %.0f s (session %d)", url, time.monotonic() - started, proc.pid)
        yield stack
    finally:
        stop_session(proc)
        log.info("airflow at %s stopped", url)


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, output: Path, timeout: float) -> None:
    session = requests.Session()
    session.trust_env = False
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while True:
        if proc.poll() is not None:
            raise StackError(f"airflow standalone exited with status {proc.returncode}" + _tail_message(output))
        try:
            response = session.get(url + HEALTH_PATH, timeout=PROBE_TIMEOUT)
            if response.ok:
                body = response.json()
                status = {c: (body.get(c) or {}).get("status") for c in COMPONENTS}
                if all(s == "healthy" for s in status.values()):
                    return
        except (requests.RequestException, ValueError):
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise StackError(
                f"airflow at {url} was not healthy within {timeout:.0f} s (last status {status or 'none'})"
                + _tail_message(output)
            )
        time.sleep(1.0)


def _admin_password(home: Path, proc: subprocess.Popen[bytes], output: Path, timeout: float = 30.0) -> str:
    path = home / PASSWORD_FILE
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise StackError(f"{path}: the admin password was not written" + _tail_message(output))
        time.sleep(0.5)
    return json.loads(path.read_text())[ADMIN]


# --- stopping a session -------------------------------------------------------------------------------------------


def stop_session(proc: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT) -> None:
    """Terminate every process of the session `proc` leads and wait until none is left: SIGTERM, then SIGKILL.

    A session, not a process group: Airflow's task supervisors move each task into a process group of its own, but
    nothing leaves the session.
    """
    sid = proc.pid
    for sig, grace in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        for pid in _session_members(sid) or [sid]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader
            if not _session_members(sid):
                return
            time.sleep(0.2)
        if sig == signal.SIGTERM:
            log.warning("session %d still has processes %.0f s after SIGTERM; killing them", sid, grace)
    log.error("session %d still has processes after SIGKILL: %s", sid, _session_members(sid))


def _session_members(sid: int) -> list[int]:
    """Live (not zombie) processes whose session id is `sid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # pid (comm) state ppid pgrp session ...; comm may contain spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


# --- helpers ------------------------------------------------------------------------------------------------------


def _tail(path: Path, chars: int = TAIL_CHARS) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _tail_message(path: Path) -> str:
    text = _tail(path).strip()
    return f"\n--- the end of {path} ---\n{text}" if text else f"; {path} is empty"


def interruptible() -> None:
    """Make SIGTERM (kill, a container stop) and SIGINT (Ctrl-C, even when inherited as ignored, as `cmd &` does)
    raise KeyboardInterrupt in this process, so that every context manager unwinds and stops its servers."""

    def _interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def wait_for_interrupt() -> None:
    """Block until Ctrl-C or SIGTERM (see `interruptible`)."""
    interruptible()
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)


def main() -> None:
    from tasks.lib.cli import configure_logging

    p = argparse.ArgumentParser(description="Run `airflow standalone` alone in the foreground until Ctrl-C.")
    p.add_argument("--home", type=Path, default=REPO / ".local" / "airflow", help="AIRFLOW_HOME")
    p.add_argument("--port", type=int, default=0, help="API server port (0: a free one)")
    args = p.parse_args()
    configure_logging(verbose=False)
    interruptible()
    with contextlib.suppress(KeyboardInterrupt), airflow_standalone(args.home, port=args.port, cwd=REPO) as stack:
        print(f"Airflow at {stack.url}: user {stack.username}, password {stack.password}; output in {stack.output}")
        print("Ctrl-C stops it.", flush=True)
        wait_for_interrupt()


if __name__ == "__main__":
    from tasks.lib import cli

    cli.run(main)
