"""Serve the champion over HTTP: MLflow's scoring protocol, following the registry alias without a restart.

`POST /invocations` takes raw uint16 patches (n, 120, 120, 3) in R, G, B order (B04, B03, B02) as JSON
(`{"inputs": [...]}`, MLflow's tensor input; `instances` too), as a `.npy` body, or as the B04, B03 and B02 GeoTIFFs of
one BigEarthNet patch folder in a multipart upload. Each answer carries, per patch, the probability of cloud and the
decision at the version's operating threshold, and the version that scored. `/ping` (200, empty) and `/health` (503
until a model is loaded, then 200) are for probes, `/version` returns the version in service.

A background thread re-resolves the model URI every `refresh_seconds`; when the alias names another version, that
version is loaded in full beside the one in service, then one reference is swapped: requests in flight finish on the
version they started with and say so. A failed refresh keeps the version in service.

Bad input is a 4xx naming the fault, never a 500: 400 for a body that cannot be parsed (malformed JSON, not a .npy
file, a corrupt TIFF, a broken multipart body), 413 for a body over `max_body_mb`, 415 for an unsupported content type,
422 for a parsed body that is not patches the model takes (shape, dtype, band count or order, NaN, an empty batch).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import Field

from tasks.lib import bigearthnet as ben
from tasks.lib import cli
from tasks.lib.config import StepParams, load_section
from tasks.lib.errors import ModelVersionError, RequestError
from tasks.lib.scoring import DEFAULT_MODEL, ModelVersion, Scorer, load_scorer, resolve_version
from tasks.lib.tiles import DTYPE, PATCH_SHAPE, RGB_CHANNELS

log = logging.getLogger(__name__)

SECTION = "serve"
JSON_TYPES = frozenset({"application/json"})
NPY_TYPES = frozenset({"application/x-npy", "application/npy", "application/octet-stream"})
MULTIPART_TYPE = "multipart/form-data"
ACCEPTED = "application/json, application/x-npy (or application/octet-stream) or multipart/form-data"
INPUT_KEYS = ("inputs", "instances")  # MLflow's tensor inputs; its dataframe_* forms do not fit image tensors
UINT16_MAX = int(np.iinfo(DTYPE).max)
NPY_MAGIC = b"\x93NUMPY"
# Bodies up to this size (one patch as JSON, a few as .npy) are scored on the event loop when a slot is free: a few ms
# of work, where the hop to a worker thread and back costs about as much as HTTP itself.
INLINE_BYTES = 512 * 1024


class ServeParams(StepParams):
    """How tasks.serve runs: params.yaml's `serve` section (or `--set serve.KEY=VALUE`)."""

    model: str = DEFAULT_MODEL  # models:/NAME@ALIAS (followed) or models:/NAME/VERSION (pinned)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    refresh_seconds: float = Field(default=30.0, gt=0)  # how often the alias is re-resolved
    max_body_mb: float = Field(default=100.0, gt=0)  # larger bodies get 413 (a JSON batch of 64 is ~20 MB)
    concurrency: int = Field(default=2, ge=1)  # requests decoded and scored at once; the others wait, bodies read
    access_log: bool = True


@dataclass(frozen=True)
class Loaded:
    """One version in service: what it is and its scorer. Swapped as a whole, never changed."""

    version: ModelVersion
    scorer: Scorer


class Champion:
    """The version in service behind a model URI, kept current with the registry by `follow`."""

    def __init__(self, model_uri: str, first: ModelVersion) -> None:
        self.model_uri = model_uri
        self._first = first
        self.current: Loaded | None = None  # read once per request; replaced by one assignment
        self.failed: str = ""  # why the first load failed

    @property
    def follows_an_alias(self) -> bool:
        return "@" in self.model_uri

    def load_first(self) -> None:
        self.current = Loaded(self._first, load_scorer(self._first))
        log.info("serving %s (threshold %s)", self._first.uri, self._first.threshold)

    def refresh(self) -> bool:
        """Resolve the URI again; when it names another version (or new tags), load it and swap. True on a swap."""
        current = self.current
        found = resolve_version(self.model_uri)
        if current is None or found == current.version:
            return False
        if found.uri == current.version.uri:  # same weights, new tags (a changed threshold): no reload
            self.current = Loaded(found, current.scorer)
        else:
            self.current = Loaded(found, load_scorer(found))  # loaded in full before anyone sees it
        log.info("%s now names %s (threshold %s); was %s", self.model_uri, found.uri, found.threshold,
                 current.version.uri)  # fmt: skip
        return True

    def follow(self, stop: threading.Event, interval: float, on_failure: Callable[[], None]) -> None:
        """Load the first version, then refresh every `interval` seconds until `stop` (only for an alias)."""
        try:
            self.load_first()
        except Exception as exc:  # any reason the model cannot load ends the server (exit code 2)
            self.failed = f"{self._first.uri}: {exc}"
            log.error("cannot load %s", self.failed)
            on_failure()
            return
        while self.follows_an_alias and not stop.wait(interval):
            try:
                self.refresh()
            except Exception as exc:  # a registry that is down, a version without a threshold: keep serving
                log.warning("refresh of %s failed, still serving %s: %s", self.model_uri, self._served(), exc)

    def _served(self) -> str:
        return self.current.version.uri if self.current else "nothing"


# --- decoding: request bodies → (n, *PATCH_SHAPE) uint16 patches ---------------------------------------------------

_SHAPE_TEXT = "(n, " + ", ".join(map(str, PATCH_SHAPE)) + ")"
_BLANK = rb"[ \t\r\n]*"  # JSON's four blanks only (re's \s would also take \f and \v, which JSON refuses)
_FAST_HEAD = re.compile(_BLANK + rb"\{" + _BLANK + rb'"(?:inputs|instances)"' + _BLANK + rb":" + _BLANK + rb"(?=\[)")
_FAST_TAIL = re.compile(rb"\]" + _BLANK + rb"\}" + _BLANK + rb"\Z")
_CHUNK = 1 << 19  # bytes of JSON read at once: one patch (~280 KB) in one go; larger ones were no faster here
_U64 = np.uint64


def _patch_tokens() -> bytes:
    """One well-formed patch of JSON integers with its blanks removed and each number written as `0`."""
    tokens = b"0"
    for size in reversed(PATCH_SHAPE):
        tokens = b"[" + b",".join([tokens] * size) + b"]"
    return tokens


# The token stream of n patches is `[` + (PATCH + `,`) * n with its last `,` made `]`: periodic, so any chunk of it is
# a window of a few periods of this template. _TOKEN_SLACK is, per template byte, how far the stream's byte may be from
# it (XOR): 0 for brackets and commas, 9 where a number starts (`0` to `9` are `0` XOR 0 to 9).
_PERIOD = len(_patch_tokens()) + 1
_TEMPLATE = np.frombuffer((_patch_tokens() + b",") * (2 + -(-_CHUNK // _PERIOD)), np.uint8)
_TOKEN_SLACK = np.where(ord("0") == _TEMPLATE, 9, 0).astype(np.uint8)
_ZEROS = _U64(0x3030303030303030)  # b"00000000"
_SEVENS, _HIGH = _U64(0x7676767676767676), _U64(0x8080808080808080)


def _fast_json(body: bytes) -> np.ndarray | None:
    """The patches of a body `{"inputs": <array of non-negative integers of shape (n, *PATCH_SHAPE)>}`, read by
    vectorised numpy (10 to 15 times faster than building Python lists, 1 to 1.5 ms a patch here); None for any other,
    which the general parser then reads (and explains when it is wrong).

    Exact, and never more lenient than `json.loads`: the body's tokens (each number as one token, blanks dropped)
    must be exactly those of n whole patches, proving the shape before a value is used, and any sign, decimal point,
    exponent, NaN, leading zero, number over 5 digits or other character leaves the body to the general parser.

    Raises:
        RequestError: 422 for a number over UINT16_MAX (the general parser's message).
    """
    head = _FAST_HEAD.match(body)
    tail = _FAST_TAIL.search(body, max(0, len(body) - 64))  # the closing `]}` and blanks: not searched through MBs
    if not head or not tail or tail.start() < head.end():
        return None
    first, stop = head.end(), tail.start() + 1  # the array: body[first:stop], from its `[` to its `]`
    values, count, pos = [], 0, first
    while pos < stop:
        end = body.find(b",", pos + _CHUNK, stop) if pos + _CHUNK < stop else -1  # chunks end before a comma
        end = stop if end < 0 else end
        scanned = _scan_chunk(body, pos, end)
        if scanned is None:
            return None
        tokens, numbers = scanned
        if pos == first:  # the array's opening `[`, outside the periodic template
            if tokens[0] != ord("["):
                return None
            tokens, count = tokens[1:], 1
        if end == stop:  # its closing `]` stands where the template's last comma would
            if tokens[-1] != ord("]"):
                return None
            tokens = tokens[:-1]
        at = (count - 1) % _PERIOD
        if (
            at + len(tokens) > len(_TEMPLATE)
            or not np.less_equal(tokens ^ _TEMPLATE[at : at + len(tokens)], _TOKEN_SLACK[at : at + len(tokens)]).all()
        ):
            return None
        count += len(tokens)
        values.append(numbers)
        pos = end
    n, rest = divmod(count, _PERIOD)  # `[` + n periods, the last comma counted as the closing `]`
    if n < 1 or rest:
        return None
    patches = np.concatenate(values)
    high = int(patches.max())
    if high > UINT16_MAX:
        raise RequestError(
            f"values from {int(patches.min())} to {high}: raw {DTYPE} patches hold 0 to {UINT16_MAX}", 422
        )
    return patches.astype(DTYPE).reshape(n, *PATCH_SHAPE)


def _scan_chunk(body: bytes, pos: int, end: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The tokens of body[pos:end] (uint8: each number's first digit, each bracket and comma; blanks dropped) and its
    numbers' values (uint64), parsed eight bytes at a time (SWAR); None for a control character that is not a JSON
    blank, a number with a leading zero or over 5 digits. The chunk must end before a comma or at the array's end, so
    that no number is cut."""
    text = np.frombuffer(body, np.uint8, end - pos, pos)
    digit = (text - np.uint8(48)) < 10  # uint8 wraps: only `0` to `9` land below 10
    inner = digit[1:] & digit[:-1]  # a digit after a digit: inside a number
    token = text > 32  # not a blank
    np.greater(token[1:], inner, out=token[1:])  # and not inside a number: one token per number
    if text.min() < 32:  # pretty-printed: are its control characters all JSON blanks (tab, LF, CR)?
        found = text[text < 32]
        if ((found != 9) & (found != 10) & (found != 13)).any():
            return None
    at = np.flatnonzero(digit & token).view(_U64) + _U64(pos & 7)  # each number's start, from the word at body[pos]
    if not at.size:
        return text.compress(token), at
    base = pos & ~7
    words = (end - base - 1) // 8 + 2  # up to the word after the one holding the chunk's last byte
    if base + 8 * words <= len(body):
        aligned = np.frombuffer(body, _U64, words, base)
    else:  # the body's last bytes: padded with zeros (never digits)
        aligned = np.frombuffer(body[base:] + bytes(base + 8 * words - len(body)), _U64)
    index, shift = at >> _U64(3), (at & _U64(7)) << _U64(3)
    # The 8 bytes from each number's first digit (little-endian: the first digit is the lowest byte).
    raw = (aligned.take(index) >> shift) | (aligned.take(index + _U64(1)) << (_U64(64) - shift))
    raw ^= _ZEROS  # digits are now 0 to 9; any other byte 10 or more
    not_digit = ((raw + _SEVENS) | raw) & _HIGH  # the top bit of each byte that is not a digit
    below = np.bitwise_count((not_digit & (~not_digit + _U64(1))) - _U64(1))  # 8 * digits + 7 bits below the first
    if below.max() > 8 * 5 + 7 or not ((raw | not_digit) & _U64(0x80FF)).all():  # over 5 digits; a leading 0
        return None
    # Left-pad to 8 digits (move them to the top bytes) and add pairs, quads, then the two halves.
    raw <<= np.uint8(64 + 7) - below
    raw = ((raw & _U64(0x0F0F0F0F0F0F0F0F)) * _U64(2561)) >> _U64(8)  # 10 * 256 + 1
    raw = ((raw & _U64(0x00FF00FF00FF00FF)) * _U64(6553601)) >> _U64(16)  # 100 * 65536 + 1
    raw = ((raw & _U64(0x0000FFFF0000FFFF)) * _U64(42949672960001)) >> _U64(32)  # 10000 * 2**32 + 1
    return text.compress(token), raw


def patches_from_json(body: bytes, bands: str | None = None) -> np.ndarray:
    """Patches from a JSON body holding exactly one of `inputs` or `instances`, and optionally `bands`.

    Raises:
        RequestError: 400 malformed JSON; 422 no input key, or values that are not patches.
    """
    declared = bands
    patches = _fast_json(body)
    if patches is None:
        try:
            document = json.loads(body)  # the standard parser accepts NaN, so a NaN gets its own message below
        except (ValueError, RecursionError) as exc:
            raise RequestError(f"malformed JSON: {exc}", 400) from exc
        if not isinstance(document, dict):
            raise RequestError(f'expected a JSON object {{"inputs": [...]}}, got a {type(document).__name__}', 422)
        keys = [key for key in INPUT_KEYS if key in document]
        if len(keys) != 1:
            others = sorted(set(document) - {"bands"})
            raise RequestError(
                f'expected exactly one of "inputs" or "instances" holding raw {DTYPE} patches {_SHAPE_TEXT}; '
                f"got keys {others}",
                422,
            )
        if "bands" in document:
            declared = _declared_in_body(document["bands"], declared)
        patches = _array_from_json(document[keys[0]])
    _check_bands(declared)
    return check_patches(patches)


def _declared_in_body(value: Any, query: str | None) -> str:
    if not isinstance(value, list) or not all(isinstance(band, str) for band in value):
        raise RequestError(f'"bands" must be a list of band names such as {list(RGB_CHANNELS)}, got {value!r}', 422)
    if query is not None and query.split(",") != value:
        raise RequestError(f'"bands" {value} and the query\'s bands={query} disagree', 422)
    return ",".join(value)


def _array_from_json(value: Any) -> np.ndarray:
    if not isinstance(value, list):
        raise RequestError(f"inputs must be an array of patches {_SHAPE_TEXT}, got a {type(value).__name__}", 422)
    try:
        array = np.asarray(value)
    except (ValueError, OverflowError) as exc:  # ragged nesting
        raise RequestError(f"inputs are not a rectangular array of patches {_SHAPE_TEXT}: {exc}", 422) from exc
    if array.size == 0:
        raise RequestError(f"empty batch: inputs hold no patch (shape {array.shape}); send at least one", 422)
    if array.dtype.kind == "f":
        if np.isnan(array).any():
            raise RequestError(f"inputs hold NaN at {int(np.isnan(array).sum())} values: raw {DTYPE} has no NaN", 422)
        raise RequestError(
            f"inputs hold non-integer numbers (dtype float): expected raw {DTYPE} digital numbers 0 to {UINT16_MAX}, "
            "not reflectance scaled or normalised",
            422,
        )
    if array.dtype.kind not in "iu":
        raise RequestError(
            f"inputs hold {_kind_name(array.dtype)}: expected raw {DTYPE} integers 0 to {UINT16_MAX}", 422
        )
    _check_range(array)
    return array.astype(DTYPE)


def _kind_name(dtype: np.dtype) -> str:
    return {"b": "booleans", "U": "strings", "S": "strings", "O": "values that are not all numbers (or too large)"}.get(
        dtype.kind, f"dtype {dtype}"
    )


def _check_range(array: np.ndarray) -> None:
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > UINT16_MAX:
        raise RequestError(f"values from {low} to {high}: raw {DTYPE} patches hold 0 to {UINT16_MAX}", 422)


def patches_from_npy(body: bytes, bands: str | None = None) -> np.ndarray:
    """Patches from a `.npy` file (np.save of a uint16 array (n, *PATCH_SHAPE)); pickled objects are refused. `bands`
    is what the client says the last axis holds (the query's `bands=`).

    Raises:
        RequestError: 400 not a .npy file; 422 an array that is not patches.
    """
    _check_bands(bands)
    if not body.startswith(NPY_MAGIC):
        raise RequestError("body is not a .npy file (no \\x93NUMPY magic); send np.save output", 400)
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise RequestError(f"unreadable .npy body: {exc}", 400) from exc
    if array.size and array.dtype.kind == "f" and np.isnan(array).any():
        raise RequestError(f"array holds NaN at {int(np.isnan(array).sum())} values (dtype {array.dtype})", 422)
    if array.dtype != np.dtype(DTYPE):
        raise RequestError(
            f"array dtype {array.dtype}: expected raw {DTYPE} digital numbers, not scaled or normalised", 422
        )
    return check_patches(array)


def check_patches(array: np.ndarray) -> np.ndarray:
    """The array if it is a non-empty batch (n, *PATCH_SHAPE); else a 422 saying what is wrong with its shape."""
    shape = tuple(array.shape)
    if array.size == 0:
        raise RequestError(f"empty batch: shape {shape} holds no patch; send at least one", 422)
    if shape[1:] == PATCH_SHAPE:
        return array
    if len(shape) == 4 and shape[1] == PATCH_SHAPE[2] and shape[2:] == PATCH_SHAPE[:2]:
        hint = f"channels first: move the band axis last (n, {PATCH_SHAPE[0]}, {PATCH_SHAPE[1]}, {PATCH_SHAPE[2]})"
    elif len(shape) == 4 and shape[1:3] == PATCH_SHAPE[:2]:
        hint = f"{shape[3]} bands: the model takes {len(RGB_CHANNELS)}, {', '.join(RGB_CHANNELS)} in that order"
    elif shape == PATCH_SHAPE:
        hint = "one patch without its batch axis: wrap it in a list"
    else:
        hint = f"patches are {PATCH_SHAPE[0]}×{PATCH_SHAPE[1]} px with {PATCH_SHAPE[2]} bands"
    raise RequestError(f"shape {shape}: expected {_SHAPE_TEXT}; {hint}", 422)


def _check_bands(declared: str | None) -> None:
    """A client may say which bands its last axis holds (`bands=B04,B03,B02`); anything else than the model's is
    refused rather than guessed at."""
    if declared is None:
        return
    bands = [band.strip() for band in declared.split(",")]
    expected = list(RGB_CHANNELS)
    if bands == expected:
        return
    unknown = [band for band in bands if band not in ben.BANDS]
    if unknown:
        raise RequestError(f"bands {bands}: {unknown} are not Sentinel-2 band names", 422)
    if len(bands) != len(expected):
        raise RequestError(
            f"{len(bands)} bands {bands}: the model takes {len(expected)}, {expected} in that order", 422
        )
    if sorted(bands) == sorted(expected):
        raise RequestError(f"band order {bands}: the model takes {expected} (R, G, B); reorder the last axis", 422)
    raise RequestError(f"bands {bands}: the model takes {expected} (R, G, B)", 422)


_BAND_IN_NAME = re.compile(r"^(?P<patch>.*)_(?P<band>B\d[\dA])\.tiff?$", re.IGNORECASE)


def band_of(field: str, filename: str | None) -> tuple[str, str | None]:
    """(band, patch id or None) of an uploaded file: its form field when that is a band name (`-F B04=@...`), else
    its BigEarthNet file name `<patch>_<band>.tif`."""
    match = _BAND_IN_NAME.match(Path(filename or "").name)
    patch = match["patch"] if match else None
    if field.upper() in ben.BANDS:
        return field.upper(), patch
    if match:
        return match["band"].upper(), patch
    raise RequestError(
        f"cannot tell which band the part {field!r} (file {filename!r}) holds: name the field B04, B03 or B02, or "
        "upload BigEarthNet's <patch>_<band>.tif files",
        422,
    )


def patches_from_band_files(files: list[tuple[str, str | None, bytes]]) -> np.ndarray:
    """One patch (1, *PATCH_SHAPE) from the B04, B03 and B02 GeoTIFFs of one BigEarthNet patch folder, given as
    (form field, file name, bytes).

    Raises:
        RequestError: 400 a corrupt TIFF; 422 a missing, repeated or unexpected band, files of different patches, or
            a band that is not a single uint16 image of the 10 m bands' size.
    """
    if not files:
        raise RequestError(f"no file in the multipart body: upload {', '.join(RGB_CHANNELS)} of one patch", 422)
    by_band: dict[str, bytes] = {}
    patches = set()
    for field, filename, data in files:
        band, patch = band_of(field, filename)
        if band in by_band:
            raise RequestError(f"band {band} uploaded twice", 422)
        by_band[band] = data
        if patch:
            patches.add(patch)
    extra = sorted(set(by_band) - set(RGB_CHANNELS))
    missing = [band for band in RGB_CHANNELS if band not in by_band]
    if extra or missing:
        raise RequestError(
            f"bands {sorted(by_band)}: the model takes exactly {', '.join(RGB_CHANNELS)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; not used: {extra}" if extra else ""),
            422,
        )
    if len(patches) > 1:
        raise RequestError(f"files of {len(patches)} different patches {sorted(patches)}: upload one patch", 422)
    planes = [_read_band(band, by_band[band]) for band in RGB_CHANNELS]
    return np.stack(planes, axis=-1)[None]


def _read_band(band: str, data: bytes) -> np.ndarray:
    """One band file's pixels, checked as tasks.validate checks a band of a patch folder."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            if len(tif.pages) != 1:
                raise RequestError(f"band {band}: {len(tif.pages)} images in the TIFF, expected 1", 422)
            array = tif.pages[0].asarray()
    except RequestError:
        raise
    except Exception as exc:  # tifffile raises many types for damaged files; all mean "unreadable"
        raise RequestError(f"band {band}: corrupt or unreadable TIFF ({len(data)} bytes): {exc}", 400) from exc
    size = ben.BAND_SIZES[band]
    if array.shape != (size, size):
        raise RequestError(f"band {band}: shape {'×'.join(map(str, array.shape))}, expected {size}×{size}", 422)
    if array.dtype != np.dtype(DTYPE):
        raise RequestError(f"band {band}: dtype {array.dtype}, expected {DTYPE}", 422)
    return array


def answer(scores: np.ndarray, version: ModelVersion) -> bytes:
    """The JSON answer: per patch the probability of cloud and the decision at the version's threshold (score >=
    threshold is cloud), and the version that scored."""
    predictions = [
        {"cloud_probability": float(p), "is_cloud": bool(p >= version.threshold)} for p in scores.astype(np.float64)
    ]
    model = {"name": version.name, "version": version.version, "threshold": version.threshold}
    return json.dumps({"predictions": predictions, "model": model}).encode()


# --- the HTTP application ------------------------------------------------------------------------------------------


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(f"Content-Length {declared!r} is not a number", 400)
        if int(declared) > limit:
            raise RequestError(f"body of {declared} bytes is over the limit of {limit} bytes (serve.max_body_mb)", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"body over the limit of {limit} bytes (serve.max_body_mb)", 413)
        chunks.append(chunk)
    return b"".join(chunks)


async def _band_files(request: Request, body: bytes) -> list[tuple[str, str | None, bytes]]:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def replay() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(request.headers, replay(), max_files=16, max_fields=16).parse()
    except MultiPartException as exc:
        raise RequestError(f"malformed multipart body: {exc.message}", 400) from exc
    except Exception as exc:  # python-multipart's own parse errors
        raise RequestError(f"malformed multipart body: {exc}", 400) from exc
    try:
        return [
            (field, value.filename, await value.read())
            for field, value in form.multi_items()
            if isinstance(value, UploadFile)
        ]
    finally:
        await form.close()


def create_app(champion: Champion, params: ServeParams) -> FastAPI:
    """The FastAPI application serving `champion`; its lifespan starts the thread that loads and follows it."""
    import anyio

    limit = int(params.max_body_mb * 1024 * 1024)
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = threading.Event()
        state["limiter"] = anyio.CapacityLimiter(params.concurrency)
        follower = threading.Thread(
            target=champion.follow,
            args=(stop, params.refresh_seconds, state.get("on_failure", lambda: None)),
            name="champion",
            daemon=True,
        )
        follower.start()
        yield
        stop.set()

    app = FastAPI(title="cloudscreen", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state  # main() puts the server's stop switch here as on_failure

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError) -> JSONResponse:
        log.info("%s %s refused with %d: %s", request.method, request.url.path, exc.status, exc)
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.get("/ping")
    async def ping() -> Response:
        return Response(status_code=200)

    @app.get("/health")
    async def health() -> Response:
        loaded = champion.current
        if loaded is None:
            return JSONResponse({"status": "loading", "model": champion.model_uri}, status_code=503)
        return JSONResponse({"status": "ok", "model": loaded.version.uri})

    @app.get("/version")
    async def version() -> Response:
        loaded = champion.current
        if loaded is None:
            return JSONResponse({"error": f"{champion.model_uri} is still loading"}, status_code=503)
        return JSONResponse(loaded.version.to_json())

    async def invocations(request: Request) -> Response:
        loaded = champion.current  # the version this request is answered by, whatever the alias does meanwhile
        if loaded is None:
            return JSONResponse({"error": f"{champion.model_uri} is still loading"}, status_code=503)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in JSON_TYPES | NPY_TYPES | {MULTIPART_TYPE}:
            raise RequestError(f"content type {kind or '(none)'!r} is not served; send {ACCEPTED}", 415)
        body = await _read_body(request, limit)
        bands = request.query_params.get("bands")
        decode: Callable[[], np.ndarray]
        if kind == MULTIPART_TYPE:
            if bands is not None:
                raise RequestError("bands= applies to arrays; uploaded files say their band by name", 422)
            decode = functools.partial(patches_from_band_files, await _band_files(request, body))
        elif kind in JSON_TYPES:
            decode = functools.partial(patches_from_json, body, bands)
        else:
            decode = functools.partial(patches_from_npy, body, bands)

        def work() -> bytes:
            return answer(loaded.scorer(decode()), loaded.version)

        limiter: anyio.CapacityLimiter = state["limiter"]
        inline = len(body) <= INLINE_BYTES
        if inline:
            try:
                limiter.acquire_nowait()  # still one of `concurrency` requests at once, and none jumps the queue
            except anyio.WouldBlock:
                inline = False
        if inline:
            try:
                content = work()
            finally:
                limiter.release()
        else:
            content = await anyio.to_thread.run_sync(work, limiter=limiter)
        return Response(content, media_type="application/json", headers={"X-Model-Version": loaded.version.version})

    # A plain Starlette route: FastAPI's parameter machinery has nothing to do here and costs per request.
    app.add_route("/invocations", invocations, methods=["POST"])
    return app


def serve(*, model_uri: str, params: ServeParams) -> None:
    """Serve `model_uri` until stopped (SIGINT, SIGTERM: requests in flight finish).

    Raises:
        ModelVersionError: the URI names no registered version, its version has no operating threshold, or its
            model cannot be loaded.
    """
    import uvicorn

    first = resolve_version(model_uri)  # refused here, before a port is bound, when it cannot serve
    log.info(
        "serving %s (now %s) on http://%s:%d; refresh every %ss, bodies up to %s MB",
        model_uri, first.uri, params.host, params.port, params.refresh_seconds, params.max_body_mb,
    )  # fmt: skip
    champion = Champion(model_uri, first)
    app = create_app(champion, params)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=params.host,
            port=params.port,
            log_config=None,  # the CLI's logging
            access_log=params.access_log,
            timeout_graceful_shutdown=30,
        )
    )

    def stop() -> None:
        server.should_exit = True

    app.state.serve["on_failure"] = stop
    server.run()
    if champion.failed:
        raise ModelVersionError(f"cannot load {champion.failed}")
    log.info("stopped serving %s", model_uri)


def main() -> None:
    p = cli.parser(__doc__.splitlines()[0])
    default = {name: field.default for name, field in ServeParams.model_fields.items()}
    p.add_argument(
        "--model", help=f"models:/NAME@ALIAS (followed) or models:/NAME/VERSION (default: {default['model']})"
    )
    p.add_argument("--host", help=f"address to bind (default: {default['host']}; 0.0.0.0 in a container)")
    p.add_argument("--port", type=int, help=f"port to bind (default: {default['port']})")
    p.add_argument(
        "--refresh-seconds",
        type=float,
        help=f"how often the alias is re-resolved (default: {default['refresh_seconds']})",
    )
    p.epilog = (
        'POST /invocations with application/json {"inputs": [...]}, a .npy body (application/x-npy) or the B04, '
        "B03, B02 GeoTIFFs of one patch (multipart/form-data); GET /ping, /health, /version. The tracking server "
        "is MLFLOW_TRACKING_URI. Other settings: --set serve.max_body_mb=..., serve.concurrency=..., "
        "serve.access_log=false."
    )
    args = p.parse_args()
    cli.configure_logging(args.verbose)
    cli_values = {"model": args.model, "host": args.host, "port": args.port, "refresh_seconds": args.refresh_seconds}
    overrides = [*args.overrides, *(f"{SECTION}.{k}={json.dumps(v)}" for k, v in cli_values.items() if v is not None)]
    params = load_section(SECTION, ServeParams, args.params, overrides)
    serve(model_uri=params.model, params=params)


if __name__ == "__main__":
    cli.run(main)
