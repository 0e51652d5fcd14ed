"""Expected archive digests: the Checksum value and the parsing of sha256sum/md5sum files.

Pure text handling, no I/O: fetching a checksum file is a transport's job (tasks.lib.transports.read_small), so both
the archive and its checksum file come over the same schemes with the same retries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

from tasks.lib.errors import ConfigError, DownloadError

Algorithm = Literal["sha256", "md5"]
_HEX_LENGTHS: dict[str, int] = {"sha256": 64, "md5": 32}
_CHECKSUM_LINE_RE = re.compile(r"(?P<hex>[0-9a-fA-F]{64}|[0-9a-fA-F]{32})(?:\s+\*?(?P<name>\S.*?))?\s*")


@dataclass(frozen=True)
class Checksum:
    """An expected digest; the algorithm follows from the hex length when parsed from text."""

    algorithm: Algorithm
    digest: str

    def __post_init__(self) -> None:
        length = _HEX_LENGTHS.get(self.algorithm)
        if length is None:
            raise ConfigError(f"checksum algorithm {self.algorithm!r}: expected one of {sorted(_HEX_LENGTHS)}")
        if not re.fullmatch(rf"[0-9a-fA-F]{{{length}}}", self.digest):
            raise ConfigError(f"{self.algorithm} checksum {self.digest!r}: expected {length} hexadecimal digits")
        # Compare digests case-insensitively by storing one canonical form.
        object.__setattr__(self, "digest", self.digest.lower())

    @classmethod
    def from_hex(cls, text: str) -> Checksum:
        """64 hex digits are a SHA-256, 32 an MD5."""
        text = text.strip()
        if len(text) == _HEX_LENGTHS["sha256"]:
            return cls("sha256", text)
        if len(text) == _HEX_LENGTHS["md5"]:
            return cls("md5", text)
        raise ConfigError(f"checksum {text!r}: expected 64 (sha256) or 32 (md5) hexadecimal digits")


def parse_checksum_text(text: str, archive_name: str, where: str) -> Checksum:
    """The checksum of `archive_name` in sha256sum/md5sum output ("HEX  name", "HEX *name") or a bare hex digest.

    Args:
        text: the checksum file's contents.
        archive_name: the line to pick when the file lists several archives.
        where: the checksum file's URL, for error messages.

    Raises:
        DownloadError: a line is not a checksum line, there is none, or several lines and not exactly one for
            `archive_name`.
    """
    entries: list[tuple[str, str | None]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _CHECKSUM_LINE_RE.fullmatch(line)
        if match is None:
            raise DownloadError(f"{where}: not a checksum line: {line[:100]!r}")
        entries.append((match["hex"], match["name"]))
    if not entries:
        raise DownloadError(f"{where}: no checksum found")
    if len(entries) == 1:
        return Checksum.from_hex(entries[0][0])
    named = [hex_ for hex_, name in entries if name is not None and PurePosixPath(name).name == archive_name]
    if len(named) != 1:
        raise DownloadError(f"{where}: expected exactly one line for {archive_name!r}, found {len(named)}")
    return Checksum.from_hex(named[0])
