"""Fetch a dataset archive (http, https, gs, file or a local path), verify its checksum and extract it safely.

Layout under the destination directory:

    <archive>            the verified archive, kept so a lost extraction is redone without refetching
    <archive>.part       an interrupted download and, beside it, <archive>.part.json: what it was fetched
                         from, so the next run resumes it safely (tasks.lib.transports)
    extracted/           the archive's contents, renamed into place only once fully extracted and found to hold
                         BigEarthNet patch folders
    download.json        the manifest, written last: its presence means the whole step completed

The transports live in tasks.lib.transports, checksum parsing in tasks.lib.checksums, safe extraction in
tasks.lib.archive; this module decides what to do (skip, re-extract, fetch) and records the result.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from tasks.lib import cli
from tasks.lib.archive import compression_of, dataset_root, extract, item_folders
from tasks.lib.checksums import Checksum, parse_checksum_text
from tasks.lib.config import StepParams, load_section
from tasks.lib.errors import ConfigError, DownloadError
from tasks.lib.files import atomic_dir, write_json
from tasks.lib.outputs import completed, fingerprint
from tasks.lib.transports import fetch, hash_file, parse_source, read_small

log = logging.getLogger(__name__)

MANIFEST_NAME = "download.json"
EXTRACTED_DIR = "extracted"


class SourceParams(StepParams):
    """One named archive: where it is and exactly one way to know its checksum."""

    url: str = Field(min_length=1)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    md5: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{32}$")
    checksum_url: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_checksum(self) -> SourceParams:
        given = [k for k in ("sha256", "md5", "checksum_url") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of sha256, md5, checksum_url (got {given or 'none'})")
        return self


class DownloadParams(StepParams):
    """The `download` section of params.yaml."""

    sources: dict[str, SourceParams]
    retries: int = Field(ge=0)
    backoff_seconds: float = Field(ge=0)
    backoff_max_seconds: float = Field(ge=0)
    timeout_seconds: float = Field(gt=0)
    chunk_bytes: int = Field(gt=0)


@dataclass(frozen=True)
class DownloadResult:
    root: Path  # the dataset root: extracted/<top> for a single top-level folder, else extracted/
    archive: Path
    manifest: Path
    skipped: bool  # True when an earlier run had already completed the same download


@dataclass(frozen=True)
class _Manifest:
    url: str
    algorithm: str
    checksum: str
    archive: str
    size: int
    root: str  # relative to the destination directory
    members: int
    input: dict[str, str]  # {"fingerprint": ...} of the archive's name and checksum (tasks.lib.outputs)


def resolve_request(
    *,
    url: str | None,
    source: str | None,
    sha256: str | None = None,
    md5: str | None = None,
    checksum_url: str | None = None,
    params: DownloadParams,
) -> tuple[str, Checksum]:
    """Turn the CLI's choices (a named source, or a URL with a checksum option) into a URL and its checksum.

    A checksum URL is fetched here (same schemes and retries as the archive itself).

    Raises:
        ConfigError: neither or both of url/source, an unknown source, no checksum or more than one.
        DownloadError: the checksum URL could not be read or holds no usable digest.
        SourceUnavailableError: the checksum URL failed on every attempt in a way that may pass.
    """
    explicit = {"sha256": sha256, "md5": md5, "checksum_url": checksum_url}
    given = [k for k, v in explicit.items() if v is not None]
    if source is not None:
        if url is not None:
            raise ConfigError("give exactly one of --url or --source, not both")
        if given:
            raise ConfigError(f"--source {source}: its checksum comes from params; do not also pass {given}")
        if source not in params.sources:
            raise ConfigError(f"--source {source!r}: not in download.sources (known: {sorted(params.sources)})")
        chosen = params.sources[source]
        url, sha256, md5, checksum_url = chosen.url, chosen.sha256, chosen.md5, chosen.checksum_url
    elif url is None:
        raise ConfigError("give exactly one of --url or --source")
    elif len(given) > 1:
        raise ConfigError(f"{url}: give only one of --sha256, --md5, --checksum-url (got {given})")
    if sha256 is not None:
        return url, Checksum("sha256", sha256)
    if md5 is not None:
        return url, Checksum("md5", md5)
    if checksum_url is None:
        raise ConfigError(f"{url}: a checksum is required: pass --sha256, --md5 or --checksum-url")
    archive_name = parse_source(url).name
    return url, parse_checksum_text(read_small(checksum_url, params), archive_name, checksum_url)


def download(*, url: str, dest: Path, checksum: Checksum, params: DownloadParams) -> DownloadResult:
    """Fetch `url` into `dest`, verify it against `checksum`, extract it safely and write the manifest.

    Reruns are cheap: a completed download is left alone, a verified archive is re-extracted without
    refetching, and an interrupted download resumes where it stopped.

    Returns:
        Where the dataset root, the archive and the manifest are, and whether nothing had to be done.

    Raises:
        DownloadError: unsupported URL or archive type, the source does not exist, or the archive holds no
            BigEarthNet patch folders (permanent).
        SourceUnavailableError: the source failed on every attempt in a way that may pass (transient; a partial
            download is kept and resumed by the next run).
        ChecksumMismatchError: the fetched bytes are not the expected ones (the download is discarded).
        UnsafeArchiveError: a member would escape the destination or is not a regular file or directory.
    """
    src = parse_source(url)
    compression = compression_of(src.name, src.url)
    archive = dest / src.name
    manifest_path = dest / MANIFEST_NAME
    log.info(
        "download %s into %s (%s %s; retries %d, timeout %.0f s)",
        src.url,
        dest,
        checksum.algorithm,
        checksum.digest,
        params.retries,
        params.timeout_seconds,
    )
    if dest.exists() and not dest.is_dir():
        raise DownloadError(f"{dest}: destination exists and is not a directory")

    # The URL is left out: the same archive from a mirror, or a server on another port, is the same download.
    input_fingerprint = fingerprint(src.name, checksum.algorithm, checksum.digest)
    done = _completed(manifest_path, input_fingerprint, archive, dest)
    if done is not None:
        root = dest / done["root"]
        log.info("%s: already downloaded; dataset root %s", src.url, root)
        return DownloadResult(root=root, archive=archive, manifest=manifest_path, skipped=True)

    dest.mkdir(parents=True, exist_ok=True)
    # The manifest means "complete"; a stale one must not outlive a rerun that fails half-way.
    manifest_path.unlink(missing_ok=True)
    if not _verified_archive(archive, checksum):
        # Whatever is extracted belongs to an earlier request; leaving it would pass for this one's output.
        shutil.rmtree(dest / EXTRACTED_DIR, ignore_errors=True)
        fetch(src, archive, checksum, params)
    members, root = _extract_patches(archive, dest / EXTRACTED_DIR, compression)
    manifest = _Manifest(
        url=src.url,
        algorithm=checksum.algorithm,
        checksum=checksum.digest,
        archive=src.name,
        size=archive.stat().st_size,
        root=root.relative_to(dest).as_posix(),
        members=members,
        input={"fingerprint": input_fingerprint},
    )
    write_json(manifest_path, asdict(manifest))
    log.info("downloaded %s: %d bytes, %d members; dataset root %s", src.url, manifest.size, members, root)
    return DownloadResult(root=root, archive=archive, manifest=manifest_path, skipped=False)


# --- idempotence ----------------------------------------------------------------------------------------


def _completed(manifest_path: Path, input_fingerprint: str, archive: Path, dest: Path) -> dict[str, Any] | None:
    """The manifest of an earlier run of this very download whose outputs are still in place, else None."""
    done = completed(
        manifest_path,
        input_fingerprint,
        requires=(archive, dest / EXTRACTED_DIR),
        what=f"the download of {archive.name}",
    )
    if done is None:
        return None
    root = done.get("root")
    try:
        intact = archive.stat().st_size == done.get("size") and isinstance(root, str) and (dest / root).is_dir()
    except OSError:
        intact = False
    if not intact:
        log.info("%s: the archive's size or the extracted dataset root changed: doing the work again", manifest_path)
        return None
    return done


def _verified_archive(archive: Path, checksum: Checksum) -> bool:
    """True if a previous run left a complete archive with the expected digest; a wrong one is removed."""
    if not archive.is_file():
        return False
    actual = hash_file(hashlib.new(checksum.algorithm), archive, "verify").hexdigest()
    if actual == checksum.digest:
        log.debug("%s: archive present and verified; not refetching", archive)
        return True
    log.warning("%s: %s %s does not match %s; refetching", archive, checksum.algorithm, actual, checksum.digest)
    archive.unlink()
    return False


# --- extraction -----------------------------------------------------------------------------------------


def _extract_patches(archive: Path, extracted: Path, compression: str) -> tuple[int, Path]:
    """Extract `archive` into `extracted` (replaced as a whole, and only if it holds patch folders).

    Returns:
        The member count and the dataset root inside `extracted`.

    Raises:
        DownloadError: the archive holds no BigEarthNet patch folders (nothing is left at `extracted`).
    """
    patch_name = _patch_name_re()
    with atomic_dir(extracted) as tmp:
        members = extract(archive, tmp, compression)
        root = dataset_root(tmp, patch_name)
        if not item_folders(root, patch_name):
            raise DownloadError(f"{archive}: the archive holds no BigEarthNet patch folders ({_found(tmp, root)})")
    return members, extracted / root.relative_to(tmp)


def _patch_name_re() -> re.Pattern[str]:
    # Imported here: tasks.lib.bigearthnet loads pandas (seconds), and only this check needs it.
    from tasks.lib.bigearthnet import PATCH_NAME_RE

    return PATCH_NAME_RE


def _found(extracted: Path, root: Path) -> str:
    """What the archive holds instead of patch folders, for the error message."""
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    if not entries:
        return "it is empty"
    where = "at its top level" if root == extracted else f"in its top folder {root.name}/"
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    return f"no folder named like S2A_MSIL2A_20170613T101031_87_48 {where}, which holds {shown}"


# --- command line ---------------------------------------------------------------------------------------


def main() -> None:
    p = cli.parser("Fetch a dataset archive, verify its checksum, extract it safely; print the dataset root.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="http(s)://, gs://, file:// URL or local path of the archive")
    where.add_argument("--source", metavar="NAME", help="a named source from download.sources in params")
    p.add_argument("--dest", type=Path, required=True, help="directory for the archive, extracted/ and manifest")
    check = p.add_mutually_exclusive_group()
    check.add_argument("--sha256", metavar="HEX")
    check.add_argument("--md5", metavar="HEX")
    check.add_argument("--checksum-url", metavar="URL", help="a sha256sum/md5sum file or bare hex digest")
    args = p.parse_args()
    cli.configure_logging(args.verbose)
    params = load_section("download", DownloadParams, args.params, args.overrides)
    url, checksum = resolve_request(
        url=args.url,
        source=args.source,
        sha256=args.sha256,
        md5=args.md5,
        checksum_url=args.checksum_url,
        params=params,
    )
    result = download(url=url, dest=args.dest, checksum=checksum, params=params)
    print(result.root)


if __name__ == "__main__":
    cli.run(main)
