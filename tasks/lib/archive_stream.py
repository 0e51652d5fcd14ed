"""A tar archive read once, as a stream, one patch folder at a time: no extracted tree, no seekable file needed.

The same members are refused as by extraction (tasks.lib.archive.member_problem: absolute paths, '..', links,
devices, FIFOs), by name, before anything of the archive is used. The compressed bytes are hashed as they are read,
so the archive's checksum is known when the stream ends, and nothing built from it need be published before.

range_folders reads the same folders from one range of the uncompressed archive (a seekable file: tasks.lib.gzip_index
opens one at any seek point), so that a cluster's workers can read one archive in pieces.

Patch folders must be contiguous in the archive, as tar writes a directory tree: a folder whose members come back
after another folder's is refused (tasks.download extracts such an archive). Only the folder being read is held in
memory, so memory stays flat whatever the archive's size.

gzip is inflated with ISA-L (`isal.igzip`): measured on a 2,000-patch mirror on this 2-core machine it inflates 2.6x
faster than zlib and 1.5x faster than rapidgzip with two threads, whose parallel inflation does not pay when the
cores are already busy parsing tar headers and decoding bands (docs/benchmarks.md, "Streaming ingest").
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import io
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

import zstandard
from isal import igzip, isal_zlib

from tasks.lib.archive import member_problem
from tasks.lib.errors import DownloadError, UnsafeArchiveError
from tasks.lib.gzip_index import READ_BUFFER


@dataclass
class StreamedFolder:
    """One folder directly under the dataset root, as the archive holds it."""

    name: str
    files: dict[str, bytes] = field(default_factory=dict)  # the wanted regular files directly in it: name → bytes
    entries: set[str] = field(default_factory=set)  # the names of everything directly in it (files and folders)


@dataclass
class StreamStats:
    """What the stream saw besides the folders; complete once the iteration has ended."""

    members: int = 0
    compressed_bytes: int = 0
    root: str = ""  # the dataset root inside the archive ("" when the folders are at its top level)
    stray_files: list[str] = field(default_factory=list)  # files directly under the root (validate's ignored files)
    digest: str | None = None  # of the compressed file, once it has been read to its end
    start: int | None = None  # of a range (range_folders): the header where its first folder starts
    end: int | None = None  # of a range: the header where the next range's first folder starts (None: the end)


def stream_folders(
    archive: Path,
    compression: str,
    *,
    algorithm: str,
    wanted: Callable[[str], set[str]],
    is_item: re.Pattern[str],
    stats: StreamStats,
    progress: Callable[[int], Any] = lambda n: None,
) -> Iterator[StreamedFolder]:
    """The folders directly under the archive's dataset root, each with the bytes of its wanted files.

    The dataset root is found as extraction finds it (tasks.lib.archive.dataset_root): the single top-level folder
    when its name is not an item's (`is_item`), else the archive's top level. When the iteration ends, `stats` holds
    the member count, the stray files and the `algorithm` digest of the whole compressed file.

    Args:
        wanted: folder name → the file names in it whose bytes are wanted (others are listed, not read).
        progress: called with each count of compressed bytes read.

    Raises:
        UnsafeArchiveError: a member has an absolute path or '..', or is not a regular file or directory.
        DownloadError: not a readable tar archive of that compression, members outside the single top folder, or a
            folder whose members are not contiguous.
    """
    with archive.open("rb") as raw:
        hashed = _HashingReader(raw, hashlib.new(algorithm), progress)
        decompressed = _decompressor(hashed, compression)
        try:
            with tarfile.open(fileobj=_ForwardReader(decompressed), mode="r:") as tar:
                yield from _folders(tar, archive, wanted, is_item, stats)
            # The end-of-archive blocks may leave padding and the compressed trailer unread: the digest is of all.
            while decompressed.read(READ_BUFFER):
                pass
            while hashed.read(READ_BUFFER):
                pass
        except (tarfile.TarError, zstandard.ZstdError, EOFError, OSError, zlib.error, isal_zlib.error) as exc:
            raise DownloadError(f"{archive}: cannot read as a tar archive: {exc}") from exc
        stats.compressed_bytes = hashed.count
        stats.digest = hashed.hasher.hexdigest()


def _folders(
    tar: tarfile.TarFile,
    archive: Path | str,
    wanted: Callable[[str], set[str]],
    is_item: re.Pattern[str],
    stats: StreamStats,
    *,
    root: str | None = None,
    stop: int | None = None,
    first: tarfile.TarInfo | None = None,
) -> Iterator[StreamedFolder]:
    """The folders of the members from `first` (else the next one) on; up to the first folder that starts at or after
    `stop` (see _FolderStart) when one is given. `root` is the dataset root when already known."""
    top = root  # the single top-level folder ("" if none), once the first member has shown whether there is one
    current: StreamedFolder | None = None
    wanted_now: set[str] = set()
    done: set[str] = set()
    boundary = _FolderStart(stop, root) if stop is not None else None
    if root is not None:
        stats.root = root
    for member in _members(tar, first):
        if boundary is not None and boundary.reached(member):
            stats.end = member.offset
            break
        stats.members += 1
        problem = member_problem(member)
        if problem:
            raise UnsafeArchiveError(f"{archive}: refusing member {member.name!r}: it {problem}")
        parts = _parts(member.name)
        if not parts:
            continue
        if top is None:
            top = _root_of(member, parts, is_item)
            stats.root = top
            if boundary is not None:
                boundary.root = top
        if top:
            if parts[0] != top:
                raise DownloadError(
                    f"{archive}: member {member.name!r} is outside the top folder {top}/: the stream reads archives "
                    "whose patch folders are under one top folder or at the top level (tasks.download extracts others)"
                )
            parts = parts[1:]
            if not parts:
                continue
        if len(parts) == 1 and not member.isdir():
            stats.stray_files.append(parts[0])
            continue
        folder = parts[0]
        if current is None or folder != current.name:
            if folder in done:
                raise DownloadError(
                    f"{archive}: member {member.name!r} of folder {folder} comes after other folders' members: the "
                    "stream reads archives whose folders are contiguous, as tar writes them (tasks.download extracts "
                    "others)"
                )
            if current is not None:
                yield current
            done.add(folder)
            current = StreamedFolder(folder)
            wanted_now = wanted(folder)
        if len(parts) == 1:
            continue
        current.entries.add(parts[1])
        if len(parts) == 2 and member.isreg() and parts[1] in wanted_now:
            # The same name twice: extraction keeps the last copy, and so does this.
            current.files[parts[1]] = _data(tar, member)
    if top is None and root is None:
        raise DownloadError(f"{archive}: the archive is empty")
    if current is not None:
        yield current


def _parts(name: str) -> tuple[str, ...]:
    """PurePosixPath(name).parts, split directly when the name has nothing to normalise (a plain relative path):
    most of a walk's time is per member."""
    if not name or name.startswith(("/", "./")) or name.endswith(("/", "/.")) or "//" in name or "/./" in name:
        return PurePosixPath(name).parts
    return tuple(name.split("/")) if name != "." else ()


def _data(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """A regular member's bytes, read where they are: what extractfile(member).read() returns, without its three
    layers of file objects (a sparse member, whose holes extractfile fills, still goes through it)."""
    if member.issparse():
        return tar.extractfile(member).read()
    tar.fileobj.seek(member.offset_data)
    data = tar.fileobj.read(member.size)
    if len(data) != member.size:
        raise tarfile.ReadError(f"unexpected end of data in {member.name!r}")
    return data


def _members(tar: tarfile.TarFile, first: tarfile.TarInfo | None = None) -> Iterator[tarfile.TarInfo]:
    if first is not None:
        yield first
    while (member := tar.next()) is not None:
        tar.members.clear()  # the list of every TarInfo would grow with the archive
        yield member


# --- ranges: one archive read in pieces, each from its own seek point ---------------------------------------------


def range_folders(
    tar_bytes: IO[bytes],
    archive: str,
    *,
    start: int,
    stop: int | None,
    root: str | None,
    exact: bool,
    wanted: Callable[[str], set[str]],
    is_item: re.Pattern[str],
    stats: StreamStats,
) -> Iterator[StreamedFolder]:
    """The folders of one range of a tar archive read from a seekable file of its uncompressed bytes.

    A range holds the folders that start (see _FolderStart) at or after `start` and before `stop` (None: the end).
    Where its first folder starts is known only to the range before, which read up to it: without `exact`, this
    range looks for the first tar header at or after `start` and walks from there to its first folder start. The
    header is found by its checksum, which file contents could in principle imitate, so the range records where it
    began (`stats.start`) and the range before where it ended (`stats.end`): where the two differ, the caller reads
    this range again with `exact` from the end the range before found, which is certain (it was walked from the
    archive's start, by induction). With `exact`, `start` is a member's header (0 for the first range).

    Every member from this range's first folder start on is checked as stream_folders checks them; the members
    before it belong to the range before and are not. `stats.start` stays None when no folder starts in the range.
    """
    if exact:
        tar_bytes.seek(start)
        with tarfile.open(fileobj=tar_bytes, mode="r:") as tar:
            stats.start = start
            yield from _folders(tar, archive, wanted, is_item, stats, root=root, stop=stop)
        return
    header = _next_header(tar_bytes, start)
    if header is None:
        return
    tar_bytes.seek(header)
    lead_in = _FolderStart(start, root)
    with contextlib.ExitStack() as stack:
        try:
            tar = stack.enter_context(tarfile.open(fileobj=tar_bytes, mode="r:"))
            first = next((m for m in _members(tar) if lead_in.reached(m)), None)
        except tarfile.TarError:
            return  # not a header after all: the caller reads the range again from the range before's end
        if first is None:
            return
        stats.start = first.offset
        yield from _folders(tar, archive, wanted, is_item, stats, root=root, stop=stop, first=first)


def dataset_root(tar_bytes: IO[bytes], is_item: re.Pattern[str]) -> str:
    """The dataset root as stream_folders finds it, from the archive's first member."""
    tar_bytes.seek(0)
    with tarfile.open(fileobj=tar_bytes, mode="r:") as tar:
        member = tar.next()
    if member is None:
        raise DownloadError("the archive is empty")
    parts = _parts(member.name)
    return _root_of(member, parts, is_item) if parts else ""


def _root_of(first: tarfile.TarInfo, parts: tuple[str, ...], is_item: re.Pattern[str]) -> str:
    """The dataset root, from the archive's first member: its single top folder when that is not an item's."""
    wrapped = not is_item.fullmatch(parts[0]) and (first.isdir() or len(parts) > 1)
    return parts[0] if wrapped else ""


class _FolderStart:
    """Finds where a range ends and the next begins: among the members whose own header is at or after `offset`, less
    the first of them, the first whose folder differs from the folder of the member before it.

    Both ranges decide it from the same members, so both find the same one. A member's place is its own header's, not
    that of the pax or GNU long-name header before it; the first member is left out because the range after may have
    found its header without the long name before it, that is, truncated.
    """

    def __init__(self, offset: int, root: str | None) -> None:
        self.offset = offset
        self.root = root
        self._previous: str | None = None
        self._first_seen = False

    def reached(self, member: tarfile.TarInfo) -> bool:
        if member.offset_data - tarfile.BLOCKSIZE < self.offset:
            return False
        if not self._first_seen:
            self._first_seen = True
            return False
        folder = _folder_of(member, self.root or "")
        if folder is None:
            return False
        if self._previous is not None and folder != self._previous:
            return True
        self._previous = folder
        return False


def _folder_of(member: tarfile.TarInfo, root: str) -> str | None:
    """The folder directly under `root` a member belongs to; None for the root itself and files directly in it."""
    parts = _parts(member.name)
    if root:
        if not parts or parts[0] != root:
            return None
        parts = parts[1:]
    if not parts or (len(parts) == 1 and not member.isdir()):
        return None
    return parts[0]


def _next_header(tar_bytes: IO[bytes], offset: int) -> int | None:
    """The first 512-byte block at or after `offset` (on tar's 512-byte grid) that parses as a tar header."""
    position = -(-offset // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    tar_bytes.seek(position)
    while len(block := tar_bytes.read(tarfile.BLOCKSIZE)) == tarfile.BLOCKSIZE:
        try:
            tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
            return position
        except tarfile.HeaderError:
            position += tarfile.BLOCKSIZE
    return None


def _decompressor(raw: IO[bytes], compression: str) -> IO[bytes]:
    if compression == "gz":
        return io.BufferedReader(igzip.IGzipFile(fileobj=raw, mode="rb"), READ_BUFFER)
    if compression == "bz2":
        return io.BufferedReader(bz2.BZ2File(raw, mode="rb"), READ_BUFFER)
    if compression == "zst":
        # read_across_frames: multi-threaded zstd writes several frames; stopping at the first truncates.
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return io.BufferedReader(reader, READ_BUFFER)
    return raw


class _HashingReader:
    """Hashes and counts the compressed bytes as the inflater reads them."""

    def __init__(self, raw: IO[bytes], hasher: Any, progress: Callable[[int], Any]) -> None:
        self._raw = raw
        self.hasher = hasher
        self._progress = progress
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.hasher.update(data)
        self.count += len(data)
        self._progress(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return self._raw.closed

    def close(self) -> None:
        pass  # the caller closes the file


class _ForwardReader:
    """A stream that tarfile may open in its random-access mode ("r:"): `seek` only ever skips forward.

    tarfile's stream mode ("r|") copies its whole read buffer on every read; its random-access mode reads each header
    and member where it is, which over a forward-only stream is what a stream reader does anyway. Measured here it
    walks a mirror's members 1.5x faster.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._position = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._position += len(data)
        return data

    def tell(self) -> int:
        return self._position

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            position += self._position
        elif whence != io.SEEK_SET:
            raise io.UnsupportedOperation("a forward-only stream cannot seek from its end")
        if position < self._position:
            raise tarfile.ReadError(f"cannot seek back to byte {position} of a stream at byte {self._position}")
        while self._position < position:
            if not self.read(min(position - self._position, READ_BUFFER)):
                break
        return self._position
