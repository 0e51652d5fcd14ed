"""Fetching an archive, or a small file such as its checksum, over http(s)://, gs:// or file:// (or a local path).

Every transport writes into the same part file, resumes where an earlier attempt or run stopped (HTTP Range, GCS
read offset, seek), and retries what may pass by itself (network errors, timeouts, HTTP 5xx and 429) with
exponential backoff. A source that fails every attempt raises SourceUnavailableError (transient: a later run may
succeed); a request that is wrong (404, 403, no such object or file) raises DownloadError at once.

Beside the archive being fetched:

    <archive>.part       the bytes received so far
    <archive>.part.json  what the part was fetched from (url, ETag / Last-Modified, GCS generation, stat),
                         so a resume never glues bytes of two different remote versions together
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal, Protocol, TypeVar

import requests
import tenacity
from tqdm import tqdm

from tasks.lib.checksums import Checksum
from tasks.lib.errors import ChecksumMismatchError, DownloadError, SourceUnavailableError
from tasks.lib.files import write_json
from tasks.lib.gcs import gcs_client, split_gs_url

log = logging.getLogger(__name__)
_T = TypeVar("_T")

PART_SUFFIX = ".part"
SIDECAR_SUFFIX = ".part.json"

# A checksum file is a few lines; a bigger answer is a wrong URL, not something to hold in memory.
_MAX_CHECKSUM_FILE_BYTES = 1 << 20


class TransferParams(Protocol):
    """What the transports take from the download params."""

    @property
    def retries(self) -> int: ...

    @property
    def backoff_seconds(self) -> float: ...

    @property
    def backoff_max_seconds(self) -> float: ...

    @property
    def timeout_seconds(self) -> float: ...

    @property
    def chunk_bytes(self) -> int: ...


@dataclass(frozen=True)
class Source:
    """Where an archive is and which transport fetches it."""

    kind: Literal["http", "gs", "file"]
    url: str  # normalised: local paths become absolute file:// URIs
    name: str  # the archive's file name
    path: Path | None = None  # local file for kind "file"


def parse_source(url: str) -> Source:
    """The transport and archive file name for `url`.

    Raises:
        DownloadError: an unsupported scheme, a file URL with a host, a malformed gs:// URL, or no file name.
    """
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        src = Source("http", url, urllib.parse.unquote(PurePosixPath(parts.path).name))
    elif scheme == "gs":
        try:
            _, blob = split_gs_url(url)
        except ValueError as exc:
            raise DownloadError(str(exc)) from exc
        src = Source("gs", url, PurePosixPath(blob).name)
    elif scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise DownloadError(f"{url}: file URLs must be file:///absolute/path (no host)")
        path = Path(urllib.request.url2pathname(parts.path))
        src = Source("file", path.as_uri(), path.name, path)
    elif "://" in url:
        raise DownloadError(f"{url}: unsupported URL scheme {scheme!r} (use http, https, gs, file or a path)")
    else:
        # Plain paths are relative to the working directory; the absolute URI keeps reruns comparable.
        path = Path(url).absolute()
        src = Source("file", path.as_uri(), path.name, path)
    if src.name in ("", ".", "..") or "/" in src.name or "\x00" in src.name:
        raise DownloadError(f"{url}: cannot derive an archive file name from the URL")
    return src


def fetch(src: Source, archive: Path, checksum: Checksum, params: TransferParams) -> None:
    """Download `src` into the part file beside `archive` (resuming, retrying), verify it and rename it to `archive`.

    Raises:
        DownloadError: the source does not exist or refuses the request (permanent).
        SourceUnavailableError: every attempt failed in a way that may pass (transient); the part file is kept,
            so the next run resumes.
        ChecksumMismatchError: the fetched bytes are not the expected ones (the part file is discarded).
    """
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


def read_small(url: str, params: TransferParams) -> str:
    """The text of a small file (a checksum file) from any supported scheme, with the same retries.

    Raises:
        DownloadError: the file is missing, larger than 1 MiB or not UTF-8 text (permanent).
        SourceUnavailableError: every attempt failed in a way that may pass (transient).
    """
    src = parse_source(url)

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


def hash_file(hasher: Any, path: Path, what: str) -> Any:
    """Feed the bytes of `path` to `hasher` (a hashlib object), showing a progress bar labelled `what`."""
    size = path.stat().st_size
    with path.open("rb") as f, byte_bar(size, 0, f"{what} {path.name}") as bar:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            hasher.update(chunk)
            bar.update(len(chunk))
    return hasher


def byte_bar(total: int | None, initial: int, desc: str) -> tqdm:
    """A progress bar counting bytes."""
    # disable=None hides the bar when stderr is not a terminal (Airflow logs, CI, pytest).
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None)


# --- the part file ------------------------------------------------------------------------------------------------


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
        hash_file(self.hasher, self.path, "resume")
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
        with self.path.open("ab") as f, byte_bar(total, self.size, self.path.name.removesuffix(PART_SUFFIX)) as bar:
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


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


# --- retries ------------------------------------------------------------------------------------------------------


def _with_retries(url: str, params: TransferParams, attempt: Callable[[], _T]) -> _T:
    """Run `attempt`, retrying transient failures with exponential backoff; each retry resumes.

    An attempt signals "worth another try" by raising SourceUnavailableError with what went wrong (without the
    URL); any other error ends the retries at once.
    """

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning("%s: %s; retry %d of %d in %.1f s", url, exc, state.attempt_number, params.retries, wait)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(params.retries + 1),
        wait=tenacity.wait_exponential(multiplier=params.backoff_seconds, max=params.backoff_max_seconds),
        retry=tenacity.retry_if_exception_type(SourceUnavailableError),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        return retrying(attempt)
    except SourceUnavailableError as exc:
        attempts = params.retries + 1
        raise SourceUnavailableError(f"{url}: failed after {attempts} attempt(s); last error: {exc}") from exc


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


# --- http(s):// ---------------------------------------------------------------------------------------------------


def _http_timeout(params: TransferParams) -> tuple[float, float]:
    return (params.timeout_seconds, params.timeout_seconds)


def _check_http_status(url: str, response: requests.Response) -> None:
    status = response.status_code
    if status == 429 or status >= 500:
        raise SourceUnavailableError(f"HTTP {status} {response.reason}")
    if status >= 400:
        raise DownloadError(f"{url}: HTTP {status} {response.reason}")
    if status not in (200, 206):
        raise DownloadError(f"{url}: unexpected HTTP {status} {response.reason}")


def _http_attempt(
    session: requests.Session, url: str, part: _Part, state: dict[str, Any], params: TransferParams
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
        raise SourceUnavailableError(_describe(exc)) from exc
    except requests.RequestException as exc:
        raise DownloadError(f"{url}: {_describe(exc)}") from exc
    if total is not None and part.size != total:
        raise SourceUnavailableError(f"connection ended after {part.size} of {total} bytes")


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


def _http_read_small(session: requests.Session, url: str, params: TransferParams) -> bytes:
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
        raise SourceUnavailableError(_describe(exc)) from exc
    except requests.RequestException as exc:
        raise DownloadError(f"{url}: {_describe(exc)}") from exc


# --- gs:// --------------------------------------------------------------------------------------------------------


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
        raise SourceUnavailableError(_describe(exc)) from exc
    except (api.GoogleAPICallError, auth.GoogleAuthError, requests.RequestException) as exc:
        raise DownloadError(f"{url}: {_describe(exc)}") from exc


def _gcs_attempt(client: Any, url: str, part: _Part, state: dict[str, Any], params: TransferParams) -> None:
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
        raise SourceUnavailableError(f"download ended after {part.size} of {total} bytes")


def _gcs_read_small(url: str, params: TransferParams) -> bytes:
    bucket_name, blob_name = split_gs_url(url)
    with _gcs_errors(url):
        blob = gcs_client().bucket(bucket_name).get_blob(blob_name, timeout=params.timeout_seconds, retry=None)
        if blob is None:
            raise DownloadError(f"{url}: no such object")
        if (blob.size or 0) > _MAX_CHECKSUM_FILE_BYTES:
            raise DownloadError(f"{url}: larger than {_MAX_CHECKSUM_FILE_BYTES} bytes; not a checksum file")
        data: bytes = blob.download_as_bytes(timeout=_http_timeout(params), retry=None, checksum=None)
        return data


# --- file:// and local paths --------------------------------------------------------------------------------------


def _file_attempt(path: Path, url: str, part: _Part, state: dict[str, Any], params: TransferParams) -> None:
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
