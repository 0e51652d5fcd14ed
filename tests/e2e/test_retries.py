"""Errors say whether to retry, and the DAGs act on it: under Airflow's own retry handling (`dag.test()`), a permanent
fault fails its task on the first attempt, while a transient one is retried as the task's retries allow."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import write_params

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
RETRIES = 2  # Airflow retries of the I/O tasks in this module's params (the e2e params file sets none)


class _Busy(http.server.BaseHTTPRequestHandler):
    """A server that is always busy: 503 for everything, a fault that may pass by itself."""

    def do_GET(self) -> None:
        self.send_response(503, "Service Unavailable")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args) -> None:  # keep the test output quiet
        pass


@pytest.fixture(scope="module")
def busy_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Busy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def refresh(tmp_path_factory):
    """Run the refresh DAG once with a trigger form; the outcome (states, tries) as demo.airflow_local writes it."""
    root = tmp_path_factory.mktemp("retries")
    params = write_params(root / "params.yaml", data_root=root / "data")
    data = yaml.safe_load(params.read_text())
    data["pipeline"] |= {
        "retries": RETRIES,
        "retry_delay_seconds": 0.5,
        "retry_exponential_backoff": 1.0,
        "max_retry_delay_seconds": 0.5,
    }
    data["download"] |= {"retries": 0, "backoff_seconds": 0.0}  # the step's own retries: one attempt per task try
    params.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {**os.environ, "CLOUDSCREEN_PARAMS": str(params), "PYTHONPATH": str(REPO)}
    env.pop("AIRFLOW_HOME", None)

    def run(name: str, form: dict) -> dict:
        out = root / f"{name}.json"
        subprocess.run(
            [sys.executable, "-m", "demo.airflow_local", "cloudscreen_refresh", "--home", str(root / "airflow"),
             "--conf", json.dumps(form), "--out", str(out)],
            cwd=root, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        return json.loads(out.read_text())

    return root, run


def _checksum_file(root: Path, archive_name: str) -> str:
    path = root / f"{archive_name}.sha256"
    path.write_text(f"{'0' * 64}  {archive_name}\n")
    return f"file://{path}"


def test_a_permanent_error_fails_the_task_on_its_first_attempt(refresh):
    root, run = refresh
    form = {
        "source": f"file://{root}/no-such-archive.tar.gz",
        "checksum_url": _checksum_file(root, "no-such-archive.tar.gz"),
    }
    outcome = run("permanent", form)
    assert outcome["state"] == "failed"
    assert outcome["task_states"]["download"] == "failed"
    assert outcome["task_tries"]["download"] == 1, "a missing file will be missing on every retry"
    assert outcome["task_states"]["validate"] == "upstream_failed"


def test_a_transient_error_is_retried_as_the_task_allows(refresh, busy_server):
    root, run = refresh
    form = {"source": f"{busy_server}/archive.tar.gz", "checksum_url": _checksum_file(root, "archive.tar.gz")}
    outcome = run("transient", form)
    assert outcome["state"] == "failed"
    assert outcome["task_states"]["download"] == "failed"
    assert outcome["task_tries"]["download"] == RETRIES + 1, "a busy server may answer on a later attempt"
