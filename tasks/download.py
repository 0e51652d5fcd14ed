"""Fetch a dataset archive (http, https, gs, file or a local path), verify its checksum and extract it safely.

Layout under the destination directory:

    <archive>            the verified archive, kept so a lost extraction is redone without refetching
    <archive>.part       an interrupted download, resumed on the next run (HTTP Range, GCS offset, seek)
    <archive>.part.json  what the part was fetched from (url, ETag / Last-Modified, GCS generation, stat),
                         so a resume never glues bytes of two different remote versions together
    extracted/           the archive's contents, renamed into place only once fully extracted
    download.json        the manifest, written last: its presence means the whole step completed
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import tarfile
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal, TypeVar

import requests
import tenacity
import zstandard
from pydantic import Field, model_validator
from tqdm import tqdm

from tasks.lib import cli
from tasks.lib.config import StepParams, load_section
from tasks.lib.errors import ChecksumMismatchError, ConfigError, DownloadError, UnsafeArchiveError
from tasks.lib.files import atomic_dir, write_json
from tasks.lib.gcs import gcs_client, split_gs_url

log = logging.getLogger(__name__)
_T = TypeVar("_T")

MANIFEST_NAME = "download.json"
EXTRACTED_DIR = "extracted"
PART_SUFFIX = ".part"
SIDECAR_SUFFIX = ".part.json"

Algorithm = Literal["sha256", "md5"]
_HEX_LENGTHS: dict[str, int] = {"sha256": 64, "md5": 32}
# Archive suffix → compression; the longest suffixes come first so ".tar.gz" is not taken for ".tar".
_ARCHIVE_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".tar.gz", "gz"),
    (".tgz", "gz"),
    (".tar.bz2", "bz2"),
    (".tbz2", "bz2"),
    (".tar.zst", "zst"),
    (".tzst", "zst"),
    (".tar", ""),
)
# A checksum file is a few lines; a bigger answer is a wrong URL, not something to hold in memory.
_MAX_CHECKSUM_FILE_BYTES = 1 << 20
_CHECKSUM_LINE_RE = re.compile(r"(?P<hex>[0-9a-fA-F]{64}|[0-9a-fA-F]{32})(?:\s+\*?(?P<name>\S.*?))?\s*")


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


@dataclass(frozen=True)
class _Source:
    kind: Literal["http", "gs", "file"]
    url: str  # normalised: local paths become absolute file:// URIs
    name: str  # the archive's file name
    path: Path | None = None  # local file for kind "file"


class _TransientError(Exception):
    """A failure worth retrying (network, timeout, 5xx, 429); anything else fails at once."""


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
    archive_name = _parse_source(url).name
    return url, _parse_checksum_text(_read_small(checksum_url, params), archive_name, checksum_url)


def download(*, url: str, dest: Path, checksum: Checksum, params: DownloadParams) -> DownloadResult:
    """Fetch `url` into `dest`, verify it against `checksum`, extract it safely and write the manifest.

    Reruns are cheap: a completed download is left alone, a verified archive is re-extracted without
    refetching, and an interrupted download resumes where it stopped.

    Returns:
        Where the dataset root, the archive and the manifest are, and whether nothing had to be done.

    Raises:
        DownloadError: unsupported URL or archive type, the source does not exist, or transient failures
            outlasted the retries.
        ChecksumMismatchError: the fetched bytes are not the expected ones (the download is discarded).
        UnsafeArchiveError: a member would escape the destination or is not a regular file or directory.
    """
    src = _parse_source(url)
    compression = _compression(src)
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

    done = _completed(manifest_path, src, checksum, archive, dest)
    if done is not None:
        root = dest / done.root
        log.info("%s: already downloaded; dataset root %s", src.url, root)
        return DownloadResult(root=root, archive=archive, manifest=manifest_path, skipped=True)

    dest.mkdir(parents=True, exist_ok=True)
    # The manifest means "complete"; a stale one must not outlive a rerun that fails half-way.
    manifest_path.unlink(missing_ok=True)
    if not _verified_archive(archive, checksum):
        # Whatever is extracted belongs to an earlier request; leaving it would pass for this one's output.
        shutil.rmtree(dest / EXTRACTED_DIR, ignore_errors=True)
        _fetch(src, archive, checksum, params)
    members = _extract(archive, dest / EXTRACTED_DIR, compression)
    root = _dataset_root(dest / EXTRACTED_DIR)
    manifest = _Manifest(
        url=src.url,
        algorithm=checksum.algorithm,
        checksum=checksum.digest,
        archive=src.name,
        size=archive.stat().st_size,
        root=root.relative_to(dest).as_posix(),
        members=members,
    )
    write_json(manifest_path, asdict(manifest))
    log.info("downloaded %s: %d bytes, %d members; dataset root %s", src.url, manifest.size, members, root)
    return DownloadResult(root=root, archive=archive, manifest=manifest_path, skipped=False)


# --- sources and checksums ------------------------------------------------------------------------------


def _parse_source(url: str) -> _Source:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        src = _Source("http", url, urllib.parse.unquote(PurePosixPath(parts.path).name))
    elif scheme == "gs":
        try:
            _, blob = split_gs_url(url)
        except ValueError as exc:
            raise DownloadError(str(exc)) from exc
        src = _Source("gs", url, PurePosixPath(blob).name)
    elif scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise DownloadError(f"{url}: file URLs must be file:///absolute/path (no host)")
        path = Path(urllib.request.url2pathname(parts.path))
        src = _Source("file", path.as_uri(), path.name, path)
    elif "://" in url:
        raise DownloadError(f"{url}: unsupported URL scheme {scheme!r} (use http, https, gs, file or a path)")
    else:
        # Plain paths are relative to the working directory; the absolute URI keeps reruns comparable.
        path = Path(url).absolute()
        src = _Source("file", path.as_uri(), path.name, path)
    if src.name in ("", ".", "..") or "/" in src.name or "\x00" in src.name:
        raise DownloadError(f"{url}: cannot derive an archive file name from the URL")
    return src


def _compression(src: _Source) -> str:
    for suffix, compression in _ARCHIVE_SUFFIXES:
        if src.name.lower().endswith(suffix):
            return compression
    supported = ", ".join(s for s, _ in _ARCHIVE_SUFFIXES)
    raise DownloadError(f"{src.url}: unsupported archive type {src.name!r} (expected one of {supported})")


def _parse_checksum_text(text: str, archive_name: str, where: str) -> Checksum:
    """Accept sha256sum/md5sum output ("HEX  name", "HEX *name") or a bare hex digest."""
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


def _read_small(url: str, params: DownloadParams) -> str:
    """The text of a small file (a checksum file) from any supported scheme, with the same retries."""
    src = _parse_source(url)

    def attempt() -> bytes:
        if src.kind == "http":
            with requests.Session() as session:
                return _http_read_small(session, src.url, params)
        if src.kind == "gs":
            return _gcs_read_small(src.url, params)
        if src.path is None:
            raise DownloadError(f"{src.url}: unsupported checksum URL")
        try:
            with src.path.open("rb") as f:
                data = f.read(_MAX_CHECKSUM_FILE_BYTES + 1)
        except OSError as exc:
            raise DownloadError(f"{src.url}: {exc}") from exc
        if len(data) > _MAX_CHECKSUM_FILE_BYTES:
            raise DownloadError(f"{src.url}: larger than {_MAX_CHECKSUM_FILE_BYTES} bytes; not a checksum file")
        return data

    data = _with_retries(src.url, params, attempt)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DownloadError(f"{src.url}: not a text checksum file") from exc


# --- idempotence ----------------------------------------------------------------------------------------


def _completed(manifest_path: Path, src: _Source, checksum: Checksum, archive: Path, dest: Path) -> _Manifest | None:
    """The manifest of an earlier run of this very download whose outputs are still in place, else None.

    The same archive (name and checksum) counts whatever URL it came from: a mirror, or a server on another port,
    serves the same bytes.
    """
    try:
        manifest = _Manifest(**_read_json(manifest_path))
    except (OSError, ValueError, TypeError):
        return None
    wanted = (src.name, checksum.algorithm, checksum.digest)
    if (manifest.archive, manifest.algorithm, manifest.checksum) != wanted:
        return None
    try:
        size_ok = archive.stat().st_size == manifest.size
    except OSError:
        return None
    return manifest if size_ok and (dest / manifest.root).is_dir() else None


def _verified_archive(archive: Path, checksum: Checksum) -> bool:
    """True if a previous run left a complete archive with the expected digest; a wrong one is removed."""
    if not archive.is_file():
        return False
    actual = _hash_file(hashlib.new(checksum.algorithm), archive, "verify").hexdigest()
    if actual == checksum.digest:
        log.debug("%s: archive present and verified; not refetching", archive)
        return True
    log.warning("%s: %s %s does not match %s; refetching", archive, checksum.algorithm, actual, checksum.digest)
    archive.unlink()
    return False


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


# --- fetching -------------------------------------------------------------------------------------------


class _Part:
    """The partial download plus a running hash of its bytes, so a resume does not rehash after each retry."""

    def __init__(self, path: Path, algorithm: str) -> None:
        self.path = path
        self.sidecar = path.with_name(path.name.removesuffix(PART_SUFFIX) + SIDECAR_SUFFIX)
        self._algorithm = algorithm
        self.hasher = hashlib.new(algorithm)
        self.size = 0

    def adopt(self, url: str) -> dict[str, Any]:
        """Keep a part left by an earlier run of the same URL (hashing its bytes); discard anything else.

        Returns:
            The sidecar's record of the remote version the part's bytes came from (empty if none).
        """
        state: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            state = _read_json(self.sidecar)
        if not self.path.is_file() or state.get("url") != url:
            if self.path.exists():
                log.warning("%s: partial download of unknown origin; starting over", self.path)
            self.discard()
            return {}
        _hash_file(self.hasher, self.path, "resume")
        self.size = self.path.stat().st_size
        log.debug("%s: resuming after %d bytes", self.path, self.size)
        return state

    def record(self, state: dict[str, Any]) -> None:
        write_json(self.sidecar, state)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.sidecar.unlink(missing_ok=True)
        self.hasher = hashlib.new(self._algorithm)
        self.size = 0

    @contextlib.contextmanager
    def appending(self, total: int | None) -> Iterator[_Sink]:
        with self.path.open("ab") as f, _bar(total, self.size, self.path.name.removesuffix(PART_SUFFIX)) as bar:
            yield _Sink(self, f, bar)


class _Sink:
    """Appends to the part, hashing and counting each chunk; also the file object GCS downloads into."""

    def __init__(self, part: _Part, f: IO[bytes], bar: tqdm) -> None:
        self._part = part
        self._f = f
        self._bar = bar

    def write(self, data: bytes) -> int:
        self._f.write(data)
        self._part.hasher.update(data)
        self._part.size += len(data)
        self._bar.update(len(data))
        return len(data)


def _fetch(src: _Source, archive: Path, checksum: Checksum, params: DownloadParams) -> None:
    """Download into the part file (resuming, retrying), verify the digest and rename it to `archive`."""
    part = _Part(archive.with_name(archive.name + PART_SUFFIX), checksum.algorithm)
    state = part.adopt(src.url)
    if src.kind == "http":
        with requests.Session() as session:
            _with_retries(src.url, params, lambda: _http_attempt(session, src.url, part, state, params))
    elif src.kind == "gs":
        client = gcs_client()
        _with_retries(src.url, params, lambda: _gcs_attempt(client, src.url, part, state, params))
    elif src.path is not None:
        path = src.path
        _with_retries(src.url, params, lambda: _file_attempt(path, src.url, part, state, params))

    actual = part.hasher.hexdigest()
    if actual != checksum.digest:
        part.discard()
        raise ChecksumMismatchError(
            f"{src.url}: {checksum.algorithm} mismatch: expected {checksum.digest}, got {actual}; "
            "the download was discarded"
        )
    part.path.replace(archive)
    part.sidecar.unlink(missing_ok=True)


def _with_retries(url: str, params: DownloadParams, attempt: Callable[[], _T]) -> _T:
    """Run `attempt`, retrying transient failures with exponential backoff; each retry resumes."""

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning("%s: %s; retry %d of %d in %.1f s", url, exc, state.attempt_number, params.retries, wait)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(params.retries + 1),
        wait=tenacity.wait_exponential(multiplier=params.backoff_seconds, max=params.backoff_max_seconds),
        retry=tenacity.retry_if_exception_type(_TransientError),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        return retrying(attempt)
    except _TransientError as exc:
        raise DownloadError(f"{url}: failed after {params.retries + 1} attempt(s); last error: {exc}") from exc


# Failures of the transport itself: worth a retry, unlike a status that says the request is wrong.
_HTTP_TRANSIENT = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    ConnectionError,
    TimeoutError,
)


def _describe(exc: BaseException) -> str:
    """One line naming the error: servers' HTML error pages end up in exception text and the CLI reports
    errors on a single line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}{'…' if len(text) > 300 else ''}"


def _http_timeout(params: DownloadParams) -> tuple[float, float]:
    return (params.timeout_seconds, params.timeout_seconds)


def _check_http_status(url: str, response: requests.Response) -> None:
    status = response.status_code
    if status == 429 or status >= 500:
        raise _TransientError(f"HTTP {status} {response.reason}")
    if status >= 400:
        raise DownloadError(f"{url}: HTTP {status} {response.reason}")
    if status not in (200, 206):
        raise DownloadError(f"{url}: unexpected HTTP {status} {response.reason}")


def _http_attempt(
    session: requests.Session, url: str, part: _Part, state: dict[str, Any], params: DownloadParams
) -> None:
    # Identity encoding: a server that gzips on the fly would change the bytes we hash and break byte ranges.
    headers = {"Accept-Encoding": "identity"}
    offset = part.size
    if offset:
        headers["Range"] = f"bytes={offset}-"
        validator = _if_range_validator(state)
        if validator:
            # The server sends the whole (new) file instead of a range if the remote changed since.
            headers["If-Range"] = validator
    try:
        with session.get(url, headers=headers, stream=True, timeout=_http_timeout(params)) as response:
            if response.status_code == 416 and offset:
                total = _content_range_total(response)
                if total == offset:
                    log.debug("%s: part already complete (%d bytes)", url, offset)
                    return
                log.warning("%s: saved part (%d bytes) does not fit the remote file; starting over", url, offset)
                part.discard()
                state.clear()
                return _http_attempt(session, url, part, state, params)
            _check_http_status(url, response)
            etag = response.headers.get("ETag")
            if response.status_code == 206:
                start = _content_range_start(response)
                if start != offset or (state.get("etag") and etag and etag != state["etag"]):
                    log.warning("%s: range answer does not continue the saved part; starting over", url)
                    response.close()
                    part.discard()
                    state.clear()
                    return _http_attempt(session, url, part, state, params)
                total = _content_range_total(response)
            else:
                if offset:
                    log.warning("%s: server sent the whole file instead of a range; starting over", url)
                    part.discard()
                state.clear()
                state.update(url=url, etag=etag, last_modified=response.headers.get("Last-Modified"))
                part.record(state)
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
            with part.appending(total) as sink:
                for chunk in response.iter_content(chunk_size=params.chunk_bytes):
                    sink.write(chunk)
    except _HTTP_TRANSIENT as exc:
        raise _TransientError(_describe(exc)) from exc
    except requests.RequestException as exc:
        raise DownloadError(f"{url}: {_describe(exc)}") from exc
    if total is not None and part.size != total:
        raise _TransientError(f"connection ended after {part.size} of {total} bytes")


def _if_range_validator(state: dict[str, Any]) -> str | None:
    etag = state.get("etag")
    # If-Range needs a strong validator (RFC 9110 §13.1.5); a weak ETag falls back to Last-Modified.
    if etag and not etag.startswith("W/"):
        return str(etag)
    last_modified = state.get("last_modified")
    return str(last_modified) if last_modified else None


def _content_range_start(response: requests.Response) -> int | None:
    match = re.fullmatch(r"bytes (\d+)-\d+/(?:\d+|\*)", response.headers.get("Content-Range", "").strip())
    return int(match[1]) if match else None


def _content_range_total(response: requests.Response) -> int | None:
    match = re.fullmatch(r"bytes (?:\d+-\d+|\*)/(\d+)", response.headers.get("Content-Range", "").strip())
    return int(match[1]) if match else None


def _http_read_small(session: requests.Session, url: str, params: DownloadParams) -> bytes:
    try:
        with session.get(url, stream=True, timeout=_http_timeout(params)) as response:
            _check_http_status(url, response)
            data = b""
            for chunk in response.iter_content(chunk_size=65536):
                data += chunk
                if len(data) > _MAX_CHECKSUM_FILE_BYTES:
                    raise DownloadError(f"{url}: larger than {_MAX_CHECKSUM_FILE_BYTES} bytes; not a checksum file")
            return data
    except _HTTP_TRANSIENT as exc:
        raise _TransientError(_describe(exc)) from exc
    except requests.RequestException as exc:
        raise DownloadError(f"{url}: {_describe(exc)}") from exc


@contextlib.contextmanager
def _gcs_errors(url: str) -> Iterator[None]:
    """Sort google-cloud-storage failures into retryable and final ones."""
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth

    try:
        yield
    except (
        api.ServerError,
        api.TooManyRequests,
        auth.TransportError,
        *_HTTP_TRANSIENT,
    ) as exc:
        raise _TransientError(_describe(exc)) from exc
    except (api.GoogleAPICallError, auth.GoogleAuthError, requests.RequestException) as exc:
        raise DownloadError(f"{url}: {_describe(exc)}") from exc


def _gcs_attempt(client: Any, url: str, part: _Part, state: dict[str, Any], params: DownloadParams) -> None:
    bucket_name, blob_name = split_gs_url(url)
    with _gcs_errors(url):
        bucket = client.bucket(bucket_name)
        blob = bucket.get_blob(blob_name, timeout=params.timeout_seconds, retry=None)
        if blob is None:
            raise DownloadError(f"{url}: no such object")
        generation, total = blob.generation, blob.size
        if part.size and (state.get("generation") != generation or part.size > total):
            log.warning(
                "%s: object changed since the partial download (now generation %s); starting over",
                url,
                generation,
            )
            part.discard()
        state.clear()
        state.update(url=url, generation=generation)
        part.record(state)
        if part.size < total:
            # Pinning the generation makes GCS fail rather than serve bytes of a newer object mid-download.
            pinned = bucket.blob(blob_name, generation=generation)
            with part.appending(total) as sink:
                # retry=None: retries are ours (tenacity), so backoff and resume work alike for every scheme.
                pinned.download_to_file(
                    sink,
                    start=part.size or None,
                    raw_download=True,
                    checksum=None,
                    timeout=_http_timeout(params),
                    retry=None,
                )
    if part.size != total:
        raise _TransientError(f"download ended after {part.size} of {total} bytes")


def _gcs_read_small(url: str, params: DownloadParams) -> bytes:
    bucket_name, blob_name = split_gs_url(url)
    with _gcs_errors(url):
        blob = gcs_client().bucket(bucket_name).get_blob(blob_name, timeout=params.timeout_seconds, retry=None)
        if blob is None:
            raise DownloadError(f"{url}: no such object")
        if (blob.size or 0) > _MAX_CHECKSUM_FILE_BYTES:
            raise DownloadError(f"{url}: larger than {_MAX_CHECKSUM_FILE_BYTES} bytes; not a checksum file")
        data: bytes = blob.download_as_bytes(timeout=_http_timeout(params), retry=None, checksum=None)
        return data


def _file_attempt(path: Path, url: str, part: _Part, state: dict[str, Any], params: DownloadParams) -> None:
    try:
        stat = path.stat()
    except FileNotFoundError as exc:
        raise DownloadError(f"{url}: no such file") from exc
    except OSError as exc:
        raise DownloadError(f"{url}: {exc}") from exc
    if not path.is_file():
        raise DownloadError(f"{url}: not a regular file")
    version = {"url": url, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if part.size and (state != version or part.size > stat.st_size):
        log.warning("%s: file changed since the partial copy; starting over", url)
        part.discard()
    state.clear()
    state.update(version)
    part.record(state)
    try:
        with path.open("rb") as f, part.appending(stat.st_size) as sink:
            f.seek(part.size)
            for chunk in iter(lambda: f.read(params.chunk_bytes), b""):
                sink.write(chunk)
    except OSError as exc:
        raise DownloadError(f"{url}: {exc}") from exc


def _hash_file(hasher: Any, path: Path, what: str) -> Any:
    size = path.stat().st_size
    with path.open("rb") as f, _bar(size, 0, f"{what} {path.name}") as bar:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            hasher.update(chunk)
            bar.update(len(chunk))
    return hasher


def _bar(total: int | None, initial: int, desc: str) -> tqdm:
    # disable=None hides the bar when stderr is not a terminal (Airflow logs, CI, pytest).
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None)


# --- extraction -----------------------------------------------------------------------------------------


class _CountingReader:
    """Feeds the extraction progress bar with compressed bytes as tarfile consumes them."""

    def __init__(self, raw: IO[bytes], bar: tqdm) -> None:
        self._raw = raw
        self._bar = bar

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._bar.update(len(data))
        return data


def _member_problem(member: tarfile.TarInfo) -> str | None:
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


def _extract(archive: Path, target: Path, compression: str) -> int:
    """Stream-extract `archive` into `target` (replaced as a whole on success); return the member count."""
    members = 0
    with (
        atomic_dir(target) as tmp,
        archive.open("rb") as raw,
        _bar(archive.stat().st_size, 0, f"extract {archive.name}") as bar,
    ):
        reader: Any = _CountingReader(raw, bar)
        if compression == "zst":
            # read_across_frames: multi-threaded zstd writes several frames; stopping at the first truncates.
            reader = zstandard.ZstdDecompressor().stream_reader(reader, read_across_frames=True)
        mode = "r|" if compression == "zst" else f"r|{compression}"
        try:
            with tarfile.open(fileobj=reader, mode=mode) as tar:
                while (member := tar.next()) is not None:
                    problem = _member_problem(member)
                    if problem:
                        raise UnsafeArchiveError(f"{archive}: refusing member {member.name!r}: it {problem}")
                    # The data filter re-checks paths, links and modes: a second line of defence.
                    tar.extract(member, tmp, filter="data")
                    # Stream mode keeps every TarInfo; the full dataset has millions of members.
                    tar.members.clear()
                    members += 1
        except tarfile.FilterError as exc:
            name = exc.tarinfo.name if exc.tarinfo else "?"
            raise UnsafeArchiveError(f"{archive}: refusing member {name!r}: {exc}") from exc
        except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
            raise DownloadError(f"{archive}: cannot read as a tar archive: {exc}") from exc
    return members


def _dataset_root(extracted: Path) -> Path:
    entries = list(extracted.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return extracted


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
