"""Real servers on loopback: a small HTTP file server with failure switches, the GCS emulator, the MLflow server."""

from __future__ import annotations

import re
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

GCS_BUCKET = "cloudscreen"


@dataclass(frozen=True)
class SeenRequest:
    path: str
    range: str | None
    if_range: str | None


@dataclass
class LoopbackHTTP:
    """Serves files under `root`; the switches below change how the next responses behave.

    drop_after: the next GET response stops after this many body bytes and the connection is closed
        (a download killed mid-way); one-shot.
    ignore_range: answer every request with 200 and the whole file, as servers without Range support do.
    fail_next: statuses (e.g. 503) to answer the next requests with, one per request; only requests whose
        path starts with `fail_prefix` count (clients such as google-cloud-storage send side requests).
    """

    root: Path
    base_url: str = ""
    drop_after: int | None = None
    ignore_range: bool = False
    fail_next: list[int] = field(default_factory=list)
    fail_prefix: str = "/"
    requests: list[SeenRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, name: str) -> str:
        return f"{self.base_url}/{urllib.parse.quote(name)}"

    @staticmethod
    def etag(path: Path) -> str:
        stat = path.stat()
        return f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"'


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 so requests keeps connections alive, as it would against a real server.
    protocol_version = "HTTP/1.1"

    @property
    def state(self) -> LoopbackHTTP:
        return self.server.state  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output readable
        pass

    def do_GET(self) -> None:
        state = self.state
        with state.lock:
            state.requests.append(SeenRequest(self.path, self.headers.get("Range"), self.headers.get("If-Range")))
            failing = state.fail_next and self.path.startswith(state.fail_prefix)
            status = state.fail_next.pop(0) if failing else None
            drop_after, state.drop_after = state.drop_after, None
        if status is not None:
            self.send_error(status)
            return
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        path = (state.root / rel).resolve()
        if not path.is_relative_to(state.root.resolve()) or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        etag = LoopbackHTTP.etag(path)
        start, code = 0, 200
        wanted = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        match = re.fullmatch(r"bytes=(\d+)-", wanted or "")
        if match and not state.ignore_range and if_range in (None, etag):
            start, code = int(match[1]), 206
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        self.send_response(code)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", formatdate(path.stat().st_mtime, usegmt=True))
        self.send_header("Accept-Ranges", "none" if state.ignore_range else "bytes")
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if drop_after is not None:
            self.wfile.write(body[:drop_after])
            self.wfile.flush()
            # Closing with fewer bytes than Content-Length promised is what a killed transfer looks like.
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[LoopbackHTTP]:
    """A threaded HTTP server on 127.0.0.1 (random port) serving files from its own temporary directory."""
    root = tmp_path / "http-root"
    root.mkdir()
    state = LoopbackHTTP(root=root)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.state = state  # type: ignore[attr-defined]
    host, port = server.server_address[:2]
    state.base_url = f"http://{host}:{port}"
    thread = threading.Thread(target=server.serve_forever, name="loopback-http", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def gcs_emulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """gcp-storage-emulator in memory on a free loopback port with the default bucket; yields (host, bucket).

    STORAGE_EMULATOR_HOST points google-cloud-storage (and subprocesses) at it for the test's duration.
    """
    from ops.gcs_emulator import local_gcs_emulator

    with local_gcs_emulator(GCS_BUCKET) as host:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", host)
        yield host, GCS_BUCKET


@pytest.fixture
def mlflow_server(gcs_emulator: tuple[str, str], tmp_path: Path) -> Iterator[str]:
    """`mlflow server` (through mlflow/server.sh) on a free loopback port with a SQLite store in the test's temporary
    directory and artifacts proxied to the emulator bucket under mlflow/; yields the tracking URI.

    Function scope, like `gcs_emulator`: each test gets an empty store and bucket. Starting takes 10-20 s here.
    """
    from ops.tracking_server import mlflow_server as start

    emulator, bucket = gcs_emulator
    with start(
        backend_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}",
        artifacts_destination=f"gs://{bucket}/mlflow",
        env={"STORAGE_EMULATOR_HOST": emulator},
    ) as uri:
        yield uri
