"""A gzip seek index: the archive inflated once, so that any part of it can later be inflated on its own.

Deflate cannot start mid-stream: a reader needs the bit where a block starts and the 32 KiB window before it.
rapidgzip (PyPI) records such seek points every few MiB while it inflates, exports them as an index file, and imports
that index to start inflating at the nearest point before any offset. So a file of N seek points can be read in N
independent pieces, on as many machines, each piece fetched with range requests.

The pass that builds the index also hashes the compressed bytes, in order, whatever order rapidgzip reads them in
(it reads ahead in parallel): the archive's checksum is known when the index is, before anything is built from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import rapidgzip

from tasks.lib.files import atomic_path

# Decompressed bytes read at a time (here and by tasks.lib.archive_stream): a few tar members' worth, so tarfile's
# 512-byte header reads are served from a buffer instead of one call into the inflater each.
READ_BUFFER = 1 << 20


@dataclass(frozen=True)
class SeekIndex:
    """What the indexing pass learnt of the archive."""

    path: Path  # the exported index (rapidgzip's format, which indexed_gzip also reads)
    points: tuple[int, ...]  # uncompressed offsets where inflation can start, ascending, the first 0
    size: int  # uncompressed bytes
    compressed_bytes: int
    digest: str  # of the compressed bytes, in the algorithm asked for


def build_index(
    open_raw: Callable[[], IO[bytes]],
    out: Path,
    *,
    algorithm: str,
    spacing: int = 4 << 20,
    threads: int = 1,
    progress: Callable[[int], Any] = lambda n: None,
) -> SeekIndex:
    """Inflate the gzip file `open_raw()` opens once, writing its seek index to `out`, and hash it.

    Args:
        open_raw: opens the compressed file for reading (seekable: a local file, a google-cloud-storage BlobReader).
        spacing: compressed bytes between seek points (rapidgzip's chunk size): the finest a file can be cut.
        threads: rapidgzip's parallel inflation.
        progress: called with each count of compressed bytes hashed.
    """
    with open_raw() as raw:
        hashed = _InOrderHasher(raw, hashlib.new(algorithm), progress)
        with rapidgzip.RapidgzipFile(hashed, parallelization=threads, chunk_size=spacing) as gz:
            size = 0
            while chunk := gz.read(READ_BUFFER):
                size += len(chunk)
            points = tuple(sorted(gz.block_offsets().values()))
            with atomic_path(out) as tmp, tmp.open("wb") as f:
                gz.export_index(f)
        hashed.finish()
    return SeekIndex(out, points, size, hashed.count, hashed.hasher.hexdigest())


@contextlib.contextmanager
def open_indexed(raw: IO[bytes], index: Path) -> Iterator[io.BufferedReader]:
    """The uncompressed bytes of `raw` as a seekable, buffered file, starting where `index` says is nearest."""
    with rapidgzip.RapidgzipFile(raw, parallelization=1) as gz:
        with index.open("rb") as f:
            gz.import_index(f)
        yield io.BufferedReader(_Unclosed(gz), READ_BUFFER)


class _Unclosed(io.RawIOBase):
    """rapidgzip's file as a raw stream for io.BufferedReader, which must not close it: rapidgzip's threads abort the
    interpreter unless its own `with` block closes it."""

    def __init__(self, gz: Any) -> None:
        self._gz = gz

    def readinto(self, buffer: Any) -> int:
        return self._gz.readinto(buffer)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._gz.seek(offset, whence)

    def tell(self) -> int:
        return self._gz.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


class _InOrderHasher(io.RawIOBase):
    """A seekable file that hashes its bytes in file order as they are read, in whatever order they are read.

    Bytes read at or before the hashed frontier extend it; a read that jumps past the frontier first hashes the gap
    (one extra read of it). `finish` hashes what no read reached (a trailer, padding), so the digest is of the whole
    file.
    """

    def __init__(self, raw: IO[bytes], hasher: Any, progress: Callable[[int], Any]) -> None:
        self._raw = raw
        self.hasher = hasher
        self._progress = progress
        self.count = 0  # the frontier: bytes [0, count) are hashed
        self._position = raw.tell()

    def _hash_to(self, end: int) -> None:
        if end <= self.count:
            return
        self._raw.seek(self.count)
        while self.count < end:
            data = self._raw.read(min(end - self.count, READ_BUFFER))
            if not data:
                break
            self._take(data)
        self._raw.seek(self._position)

    def _take(self, data: bytes | memoryview) -> None:
        self.hasher.update(data)
        self.count += len(data)
        self._progress(len(data))

    def readinto(self, buffer: Any) -> int:
        if self._position > self.count:
            self._hash_to(self._position)
        data = self._raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        start, self._position = self._position, self._position + n
        if start <= self.count < self._position:
            self._take(memoryview(data)[self.count - start :])
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._position = self._raw.seek(offset, whence)
        return self._position

    def tell(self) -> int:
        return self._position

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def finish(self) -> None:
        end = self._raw.seek(0, os.SEEK_END)
        self._hash_to(end)
