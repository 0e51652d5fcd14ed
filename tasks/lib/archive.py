"""Safe extraction of tar archives (plain, gzip, bzip2, zstd) and finding the dataset inside.

Only regular files and directories with relative paths that stay inside the target are extracted; anything else
(absolute paths, '..', links, devices, FIFOs) refuses the whole archive. Extraction streams, so an archive of
millions of members needs neither a seekable file nor memory for its member list.
"""

from __future__ import annotations

import re
import tarfile
from pathlib import Path, PurePosixPath
from typing import IO, Any

import zstandard
from tqdm import tqdm

from tasks.lib.errors import DownloadError, UnsafeArchiveError
from tasks.lib.transports import byte_bar

# Archive suffix → compression; the longest suffixes come first so ".tar.gz" is not taken for ".tar".
ARCHIVE_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".tar.gz", "gz"),
    (".tgz", "gz"),
    (".tar.bz2", "bz2"),
    (".tbz2", "bz2"),
    (".tar.zst", "zst"),
    (".tzst", "zst"),
    (".tar", ""),
)


def compression_of(name: str, url: str) -> str:
    """The compression of the archive file `name` ("gz", "bz2", "zst", or "" for a plain tar) from its suffix.

    Raises:
        DownloadError: `name` has none of the supported suffixes (the message names `url`).
    """
    for suffix, kind in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return kind
    supported = ", ".join(s for s, _ in ARCHIVE_SUFFIXES)
    raise DownloadError(f"{url}: unsupported archive type {name!r} (expected one of {supported})")


def extract(archive: Path, target: Path, compression: str) -> int:
    """Stream-extract `archive` into the existing directory `target`, member by member; return the member count.

    A failure leaves `target` half-filled: extract into a temporary directory (tasks.lib.files.atomic_dir).

    Raises:
        UnsafeArchiveError: a member would escape `target` or is not a regular file or directory.
        DownloadError: the file is not a readable tar archive of that compression.
    """
    members = 0
    with archive.open("rb") as raw, byte_bar(archive.stat().st_size, 0, f"extract {archive.name}") as bar:
        reader: Any = _CountingReader(raw, bar)
        if compression == "zst":
            # read_across_frames: multi-threaded zstd writes several frames; stopping at the first truncates.
            reader = zstandard.ZstdDecompressor().stream_reader(reader, read_across_frames=True)
        mode = "r|" if compression == "zst" else f"r|{compression}"
        try:
            with tarfile.open(fileobj=reader, mode=mode) as tar:
                while (member := tar.next()) is not None:
                    problem = member_problem(member)
                    if problem:
                        raise UnsafeArchiveError(f"{archive}: refusing member {member.name!r}: it {problem}")
                    # The data filter re-checks paths, links and modes: a second line of defence.
                    tar.extract(member, target, filter="data")
                    # Stream mode keeps every TarInfo; the full dataset has millions of members.
                    tar.members.clear()
                    members += 1
        except tarfile.FilterError as exc:
            name = exc.tarinfo.name if exc.tarinfo else "?"
            raise UnsafeArchiveError(f"{archive}: refusing member {name!r}: {exc}") from exc
        except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
            raise DownloadError(f"{archive}: cannot read as a tar archive: {exc}") from exc
    return members


def dataset_root(extracted: Path, item_name: re.Pattern[str]) -> Path:
    """Where the dataset's item folders are: the single top-level folder that wraps everything, else `extracted`.

    A single top-level folder whose name matches `item_name` is an item itself (an archive of one patch), not a
    wrapper, so `extracted` is the root then.
    """
    entries = list(extracted.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not item_name.fullmatch(entries[0].name):
        return entries[0]
    return extracted


def item_folders(root: Path, item_name: re.Pattern[str]) -> list[Path]:
    """The directories directly under `root` whose names match `item_name`, sorted."""
    return sorted(p for p in root.iterdir() if p.is_dir() and item_name.fullmatch(p.name))


class _CountingReader:
    """Feeds the extraction progress bar with compressed bytes as tarfile consumes them."""

    def __init__(self, raw: IO[bytes], bar: tqdm) -> None:
        self._raw = raw
        self._bar = bar

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._bar.update(len(data))
        return data


def member_problem(member: tarfile.TarInfo) -> str | None:
    """Why a member may not be extracted, or None. Only plain files and directories inside the target pass."""
    path = PurePosixPath(member.name)
    if member.name.startswith("/") or path.is_absolute():
        return "has an absolute path"
    if ".." in path.parts:
        return "has a '..' path component"
    if member.isreg() or member.isdir():
        return None
    kinds = {
        "symlink": member.issym(),
        "hard link": member.islnk(),
        "character device": member.ischr(),
        "block device": member.isblk(),
        "FIFO": member.isfifo(),
    }
    kind = next((k for k, v in kinds.items() if v), f"member of tar type {member.type!r}")
    return f"is a {kind}; only regular files and directories are allowed"
