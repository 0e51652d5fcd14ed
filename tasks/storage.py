"""Where bytes live: atomic local writes, checksums, and the object-store client (GCS or its emulator)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHUNK_BYTES = 1 << 20


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success rename it onto `final`, on error remove it.

    Readers therefore see either the old complete file or the new complete file, never a partial one.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        tmp.chmod(0o644)  # mkstemp creates 0600; the result is an ordinary shared file
        tmp.replace(final)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (indent 2, trailing newline)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; on success it replaces `final` as a whole.

    A crash leaves only a `.<name>.*.tmp` sibling, never a half-filled `final`.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        if final.exists():
            # rename() cannot replace a non-empty directory: move the stale one aside first.
            stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".stale", dir=final.parent))
            final.replace(stale / final.name)
            tmp.replace(final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            tmp.replace(final)
    finally:
        if tmp.exists():
            # Rename before deleting: writers still running elsewhere (Dask tasks on other processes) address files
            # by the old path, so they can no longer create anything in the tree while it is being removed.
            doomed = tmp.with_name(tmp.name + ".failed")
            tmp.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in chunks."""
    h = hashlib.new(algorithm)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(chunk)
    return h.hexdigest()


def gcs_client():
    """A google-cloud-storage client; honours STORAGE_EMULATOR_HOST (anonymous) and otherwise uses ADC.

    Credentials come from the environment at call time (Workload Identity, ADC), never from files in the image.
    """
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(
            project=os.environ.get("GOOGLE_CLOUD_PROJECT", "cloudscreen-local"),
            credentials=AnonymousCredentials(),
        )
    return storage.Client()


def split_gs_url(url: str) -> tuple[str, str]:
    """`gs://bucket/path/to/blob` → (bucket, path/to/blob)."""
    bucket, _, blob = url.removeprefix("gs://").partition("/")
    if not bucket or not blob:
        raise ValueError(f"{url!r}: expected gs://BUCKET/PATH")
    return bucket, blob
