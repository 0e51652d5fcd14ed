"""Start and stop the MLflow tracking server (mlflow/server.sh) for tests, the demo and `make tracking`.

mlflow/server.sh holds the server's configuration: environment variables with documented defaults, the same in a
container and here. This module runs that script in a process group of its own, waits until the server answers and
serves its store, and takes the whole group down again: `mlflow server` forks uvicorn (a supervisor and its workers)
and, when enabled, MLflow's job runner with about seven huey consumers; none of them may outlive the context.

    python -m ops.tracking_server [--with-emulator DIR]

runs the server in the foreground until Ctrl-C, configured by the same environment variables; with --with-emulator
it first starts gcp-storage-emulator with the artifact bucket persisted under DIR and points the server at it.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

from tasks.lib.errors import TrackingServerError

log = logging.getLogger(__name__)

SERVER_SCRIPT = Path(__file__).resolve().parent.parent / "mlflow" / "server.sh"
# /health answers before the store has been used; a store query proves the tracking API really works.
HEALTH_PATH = "/health"
STORE_PROBE_PATH = "/api/2.0/mlflow/experiments/search?max_results=1"
PROBE_TIMEOUT = 5.0
STOP_TIMEOUT = 15.0  # SIGTERM grace for the whole group before SIGKILL
TAIL_CHARS = 2500
# The emulator bucket when MLFLOW_ARTIFACTS_DESTINATION is unset: that of server.sh's default destination.
DEFAULT_BUCKET = "cloudscreen"


@contextlib.contextmanager
def mlflow_server(
    *,
    backend_uri: str,
    artifacts_destination: str,
    host: str = "127.0.0.1",
    port: int | None = None,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    start_timeout: float = 120.0,
) -> Iterator[str]:
    """Run mlflow/server.sh in its own process group; yield the tracking URI once the server serves its store.

    On exit the whole process group is terminated (SIGTERM, then SIGKILL after a grace period) and waited for.

    Args:
        backend_uri: MLFLOW_BACKEND_STORE_URI, e.g. `sqlite:////abs/path/mlflow.db`.
        artifacts_destination: MLFLOW_ARTIFACTS_DESTINATION, e.g. `gs://cloudscreen/mlflow`.
        host: interface to bind; the yielded URI uses 127.0.0.1 for 0.0.0.0.
        port: port to listen on; None or 0 picks a free one.
        workers: uvicorn worker processes.
        env: variables for the server on top of this process's environment, e.g. STORAGE_EMULATOR_HOST.
        start_timeout: seconds to wait for the server to become ready.

    Raises:
        TrackingServerError: the port is taken, server.sh rejected the configuration, the server exited or was not
            ready in time. The message ends with the tail of the server's output.
    """
    if not port:
        port = free_port(host)
    elif not port_free(host, port):
        raise TrackingServerError(f"port {port} on {host} is already in use; choose another port")
    client_host = "127.0.0.1" if host == "0.0.0.0" else host
    uri = f"http://{client_host}:{port}"
    server_env = {
        **_process_env(env),
        "MLFLOW_BACKEND_STORE_URI": backend_uri,
        "MLFLOW_ARTIFACTS_DESTINATION": artifacts_destination,
        "MLFLOW_HOST": host,
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": str(workers),
    }
    log.info("starting MLflow server at %s: backend %s, artifacts %s", uri, _redact(backend_uri), artifacts_destination)
    started = time.monotonic()
    with tempfile.TemporaryFile() as output:
        proc = _spawn(server_env, output)
        try:
            _wait_ready(proc, uri, output, start_timeout)
            log.info(
                "MLflow server ready at %s after %.1f s (process group %d)", uri, time.monotonic() - started, proc.pid
            )
            yield uri
        finally:
            _stop(proc)
            log.info("MLflow server at %s stopped", uri)


def _process_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    """This process's environment plus `extra`, with this interpreter's bin directory first on PATH, so server.sh
    finds the `mlflow` of the same environment (the project's .venv)."""
    merged = {**os.environ, **(extra or {})}
    bindir = Path(sys.executable).parent
    if (bindir / "mlflow").exists():
        merged["PATH"] = os.pathsep.join([str(bindir), merged.get("PATH", "")])
    return merged


def _spawn(env: Mapping[str, str], output: IO[bytes] | None) -> subprocess.Popen[bytes]:
    """server.sh as the leader of a new session (its pid is the group id); output to `output`, or ours when None."""
    if not SERVER_SCRIPT.is_file():
        raise TrackingServerError(f"{SERVER_SCRIPT}: the server start script is missing (run from a checkout)")
    return subprocess.Popen(
        ["bash", str(SERVER_SCRIPT)],
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
        start_new_session=True,
    )


def _wait_ready(proc: subprocess.Popen[bytes], uri: str, output: IO[bytes], timeout: float) -> None:
    # Loopback never goes through an HTTP proxy from the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise TrackingServerError(
                f"MLflow server for {uri} exited with status {proc.returncode} before it was ready" + _tail(output)
            )
        try:
            with opener.open(uri + HEALTH_PATH, timeout=PROBE_TIMEOUT) as response:
                response.read()
        except (OSError, http.client.HTTPException):
            pass  # not listening yet (HTTPError is an OSError too: the app may still be starting)
        else:
            try:
                with opener.open(uri + STORE_PROBE_PATH, timeout=PROBE_TIMEOUT) as response:
                    response.read()
                return
            except urllib.error.HTTPError as exc:
                body = exc.read(500).decode(errors="replace")
                raise TrackingServerError(
                    f"MLflow server at {uri} is up but its store fails: {STORE_PROBE_PATH} answered {exc.code}: {body}"
                    + _tail(output)
                ) from exc
            except (OSError, http.client.HTTPException):
                pass
        if time.monotonic() > deadline:
            raise TrackingServerError(f"MLflow server at {uri} was not ready within {timeout:.0f} s" + _tail(output))
        time.sleep(0.25)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the server's whole process group and wait until no member is left: SIGTERM, then SIGKILL."""
    group = proc.pid
    for sig, grace in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader: a zombie still counts as a member of its group
            if not _group_alive(group):
                return
            time.sleep(0.1)
        if sig == signal.SIGTERM:
            log.warning("MLflow server process group %d ignored SIGTERM for %.0f s; killing it", group, grace)
    log.error("MLflow server process group %d still has members after SIGKILL", group)


def _group_alive(group: int) -> bool:
    """Whether any process (zombies included) is left in process group `group`."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def _tail(output: IO[bytes] | None) -> str:
    if output is None:
        return "; see the server's output above"
    output.flush()
    output.seek(0, os.SEEK_END)
    size = output.tell()
    output.seek(max(0, size - TAIL_CHARS))
    text = output.read().decode(errors="replace").strip()
    if not text:
        return "; it printed nothing"
    if "\n" not in text:
        return f": {text}"
    # The last line usually names the cause (the script's message, the exception); the tail gives its context.
    return f": {text.splitlines()[-1]}\n--- the end of the server's output ---\n{text}"


def free_port(host: str) -> int:
    """A port on `host` that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    """Whether a server could bind `host:port` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT does not count
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _redact(uri: str) -> str:
    """The URI without its password, for logs."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _emulator_bucket() -> str:
    destination = os.environ.get("MLFLOW_ARTIFACTS_DESTINATION", "")
    if destination.startswith("gs://"):
        return destination.removeprefix("gs://").split("/")[0]
    return DEFAULT_BUCKET


def _cli() -> None:
    from tasks.lib.cli import configure_logging

    p = argparse.ArgumentParser(
        description="Run the MLflow tracking server (mlflow/server.sh) in the foreground until Ctrl-C. Configured "
        "by MLFLOW_BACKEND_STORE_URI, MLFLOW_ARTIFACTS_DESTINATION, MLFLOW_HOST, MLFLOW_PORT, MLFLOW_WORKERS and "
        "STORAGE_EMULATOR_HOST; defaults in mlflow/server.sh and mlflow/README.md.",
    )
    p.add_argument(
        "--with-emulator",
        type=Path,
        metavar="DIR",
        help="first start gcp-storage-emulator on a free loopback port, with the artifact bucket persisted under DIR, "
        "and send the server's gs:// traffic to it",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args()
    configure_logging(args.verbose)
    if not args.verbose:  # one log line per emulator request would drown the server's own
        logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
    # `kill` or a container stop must take the server down too: turn SIGTERM into a normal exit that runs `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    with contextlib.ExitStack() as stack:
        extra = {}
        if args.with_emulator:
            from ops.gcs_emulator import local_gcs_emulator

            bucket = _emulator_bucket()
            args.with_emulator.mkdir(parents=True, exist_ok=True)
            emulator = stack.enter_context(local_gcs_emulator(bucket, data_dir=args.with_emulator))
            extra["STORAGE_EMULATOR_HOST"] = emulator
            log.info(
                "GCS emulator at %s with bucket %s persisted under %s; other clients of the bucket need "
                "STORAGE_EMULATOR_HOST=%s",
                emulator, bucket, args.with_emulator, emulator,
            )  # fmt: skip
        proc = _spawn(_process_env(extra), output=None)
        try:
            status = proc.wait()
        except KeyboardInterrupt:
            status = 0
        finally:
            _stop(proc)
    if status:
        raise TrackingServerError(f"the MLflow server exited with status {status}")


if __name__ == "__main__":
    from tasks.lib import cli

    cli.run(_cli)
