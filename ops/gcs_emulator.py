"""gcp-storage-emulator on a loopback port: the object store of the embedded default (demo, tests, `make up`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def local_gcs_emulator(bucket: str, data_dir: Path | None = None, start_timeout: float = 10.0) -> Iterator[str]:
    """Run gcp-storage-emulator on a free loopback port (in memory, or persisted under `data_dir`) with `bucket`
    created; yield its URL for STORAGE_EMULATOR_HOST. For the embedded default and tests, never production."""
    import socket
    import threading

    from gcp_storage_emulator.server import create_server

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = create_server(
        "127.0.0.1",
        port,
        in_memory=data_dir is None,
        default_bucket=bucket,
        data_dir=str(data_dir.resolve()) if data_dir else None,  # the emulator insists on an absolute path
    )
    # Server.start() waits forever when the port was taken in the meantime (the bind error dies with its thread),
    # so start it from a helper thread and give up after a while instead of hanging.
    starter = threading.Thread(target=server.start, name="gcs-emulator-start", daemon=True)
    starter.start()
    starter.join(timeout=start_timeout)
    if starter.is_alive():
        raise RuntimeError(f"gcp-storage-emulator did not start on 127.0.0.1:{port}")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
