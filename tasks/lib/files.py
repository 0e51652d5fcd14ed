"""Local files written so that readers never see half of one: atomic files and directories, JSON, digests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
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


def jsonable(value: Any) -> Any:
    """NaN and infinities (undefined metrics) become null, as JSON has none; tuples become lists."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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


def path_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, or of a directory tree (relative names and file digests, in sorted order)."""
    if not path.is_dir():
        return file_digest(path, algorithm)
    h = hashlib.new(algorithm)
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{item.relative_to(path).as_posix()}:{file_digest(item, algorithm)}\n".encode())
    return h.hexdigest()


def folders_fingerprint(folders: list[Path], *extra: bytes) -> str:
    """Identity of a set of patch folders, cheap to recompute: name, size and modification time of every file.

    `extra` (params, upstream reports) is mixed in, so a change there counts as a change of input too.
    """
    h = hashlib.sha256()
    for item in extra:
        h.update(hashlib.sha256(item).digest())
    for folder in folders:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            st = entry.stat()
            h.update(f"{folder.name}/{entry.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
