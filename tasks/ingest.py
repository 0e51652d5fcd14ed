"""Ingest a BigEarthNet-S2 archive as one stream: checksum, validation and tiles without an extracted tree.

The archive is read once. Each patch folder goes from its tar members straight to validate's raster and JSON checks
and tile's band decoding, in worker processes, while the main process inflates and parses the tar. Writes under OUT
what download → validate → tile write for the same archive, byte for byte in the shards, index and stats:

    validated/      report.json (quarantined patches with reasons) and the Great Expectations Data Docs
    tiles/          band shards, index.parquet, metadata.parquet, stats.json, tiles.json
    <archive>       only for http(s):// and gs:// sources: fetched and verified first, then streamed
    ingest.json     the manifest, written last: its presence means the whole step completed

Shards come out in patch-name order, as the tile step writes them, whatever the archive's order: each patch's
channels are spooled into the shard files as they arrive and put in place once validation has said which patches
stay (an in-place permutation), so no second copy of the tiles ever exists on disk.

With DASK_SCHEDULER_ADDRESS set, a gzip archive (a local path or gs://) is instead indexed in one pass and read in
ranges by that cluster's workers, each from its own seek point (docs/steps/ingest.md, "On a Dask cluster").
"""

from __future__ import annotations

import bisect
import concurrent.futures as cf
import contextlib
import functools
import io
import json
import logging
import os
import shutil
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import numpy as np
from pydantic import Field

from tasks.download import DownloadParams, resolve_request
from tasks.lib import bigearthnet as ben
from tasks.lib import cli
from tasks.lib.archive import compression_of
from tasks.lib.archive_stream import StreamedFolder, StreamStats, dataset_root, range_folders, stream_folders
from tasks.lib.checksums import Checksum
from tasks.lib.config import StepParams, load_section
from tasks.lib.errors import (
    ChecksumMismatchError,
    DownloadError,
    TilingError,
    UnsafeArchiveError,
    ValidationFailedError,
)
from tasks.lib.files import atomic_dir, write_json
from tasks.lib.gcs import gcs_client, split_gs_url
from tasks.lib.gzip_index import SeekIndex, build_index, open_indexed
from tasks.lib.outputs import completed, fingerprint
from tasks.lib.tiles import (
    CHANNELS,
    DTYPE,
    MANIFEST_FILE,
    METADATA_FILE,
    PATCH_PX,
    SHARD_DIR,
    create_shard,
    patch_bytes,
    shard_name,
)
from tasks.lib.transports import Source, byte_bar, fetch, parse_source
from tasks.tile import (
    TileParams,
    fill_patch,
    merge_moments,
    metadata_frame,
    metadata_known,
    metadata_record_of_row,
    patches_per_shard,
    shard_moments,
    write_metadata_part,
    write_tables,
)
from tasks.validate import (
    DATA_DOCS_INDEX,
    REPORT_FILE,
    ValidateParams,
    check_patch_files,
    expected_files,
    failure_summary,
    write_report,
)

log = logging.getLogger(__name__)

INGEST_MANIFEST = "ingest.json"
_SEEK_INDEX = ".seek-index"  # in the tiles' temporary directory while the workers read the ranges
_RANGE_REQUEST = 8 << 20  # bytes per range request to the object store
SHARD_PATTERN = f"{SHARD_DIR}/shard-{{:05d}}.npy"  # tasks.lib.tiles.shard_name's, as a format string
VALIDATED_DIR = "validated"
TILES_DIR = "tiles"


class IngestParams(StepParams):
    """The `ingest` section of params.yaml (the checks and tiles follow the `validate` and `tile` sections)."""

    workers: int = Field(ge=1)
    batch_patches: int = Field(ge=1)
    in_flight: int = Field(ge=1)
    seek_spacing_kib: int = Field(ge=64)
    ranges_per_worker: int = Field(ge=1)


@dataclass(frozen=True)
class IngestResult:
    validated: Path  # holds report.json and the Data Docs
    tiles: Path | None  # None when validation failed (nothing is tiled then)
    report: dict[str, Any]
    patches: int  # tiled
    shards: int
    skipped: bool  # an earlier run had already completed the same ingest

    @property
    def success(self) -> bool:
        return bool(self.report["success"])


@dataclass
class _Streamed:
    """What the stream left for validation and tiling."""

    checks: list[Any] = field(default_factory=list)  # tasks.validate's per-patch checks
    rows: dict[str, int] = field(default_factory=dict)  # patch_id → spool row

    def add(self, check: Any, row: int) -> None:
        # Held until the end, one per patch: the strings many patches share (label names, dates, tiles) are kept
        # once (measured: 2 KB a patch before, the most of what grew with the archive).
        fields = check.row
        for key in ("acquisition_date", "tile_source"):
            if isinstance(fields.get(key), str):
                fields[key] = sys.intern(fields[key])
        if isinstance(fields.get("labels"), list):
            fields["labels"] = [sys.intern(label) for label in fields["labels"]]
        self.checks.append(check)
        self.rows[check.patch_id] = row

    stats: StreamStats = field(default_factory=StreamStats)


def ingest(
    *,
    url: str,
    checksum: Checksum,
    out: Path,
    params: IngestParams,
    validate_params: ValidateParams,
    tile_params: TileParams,
    download_params: DownloadParams,
) -> IngestResult:
    """Stream the archive at `url` into `out/validated` and `out/tiles`, verified against `checksum`.

    A local path or file:// URL is streamed where it is; an http(s):// or gs:// archive is fetched into `out` first
    (resuming, verified) and then streamed. Nothing appears at the final paths before the stream has ended with the
    expected digest. Re-running with the same archive name, checksum and params does nothing.

    Returns:
        The outputs; `success` is False (and `tiles` None) when validation failed: the report and Data Docs are
        written then, for inspection.

    Raises:
        ChecksumMismatchError: the archive's bytes are not the expected ones (a fetched copy is discarded).
        UnsafeArchiveError: a member has an absolute path or '..', or is a link, a device or a FIFO.
        DownloadError: the source cannot be read, is not a tar archive of its type, or holds no patch folders.
        SourceUnavailableError: fetching failed on every attempt in a way that may pass.
        TilingError: every patch was quarantined.
    """
    src = parse_source(url)
    compression = compression_of(src.name, src.url)
    validated, tiles, manifest_path = out / VALIDATED_DIR, out / TILES_DIR, out / INGEST_MANIFEST
    # As download's: the URL is left out, so the same archive from a mirror is the same ingest.
    input_fingerprint = fingerprint(
        src.name,
        checksum.algorithm,
        checksum.digest,
        validate_params.model_dump_json(),
        tile_params.model_dump_json(),
    )
    done = completed(
        manifest_path,
        input_fingerprint,
        requires=(validated / REPORT_FILE, tiles / MANIFEST_FILE),
        what=f"the ingest of {src.name}",
    )
    if done is not None:
        return IngestResult(validated, tiles, _read_report(validated), done["patches"], done["shards"], skipped=True)
    if out.exists() and not out.is_dir():
        raise DownloadError(f"{out}: destination exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # "complete" must not outlive a rerun that fails half-way
    _remove_leftovers(out)
    address = os.environ.get("DASK_SCHEDULER_ADDRESS")
    indexed = bool(address) and compression == "gz"
    if address and not indexed:
        log.info("a %s archive has no seek index: it is streamed here, not on the cluster at %s", compression, address)
    # The indexed path reads a local file or an object where it is (workers fetch byte ranges); others are fetched.
    archive = None if indexed and src.kind == "gs" else _local_archive(src, out, checksum, download_params)
    channels = CHANNELS[tile_params.bands]
    per_shard = patches_per_shard(tile_params, len(channels))
    log.info(
        "ingest %s into %s (%s %s): %s, bands %s, %d patches per shard",
        src.url,
        out,
        checksum.algorithm,
        checksum.digest,
        f"in ranges on the Dask cluster at {address}" if indexed else f"streamed, {params.workers} workers",
        "/".join(channels),
        per_shard,
    )

    report: dict[str, Any]
    with _runner(params.workers, address if indexed else None) as run, atomic_dir(validated) as vtmp:
        try:
            with atomic_dir(tiles) as ttmp:
                if indexed:
                    location = src.url if archive is None else str(archive)
                    streamed, spool = _ingest_ranges(location, ttmp, checksum, per_shard, channels, params,
                                                     validate_params)  # fmt: skip
                else:
                    spool = _Spool(ttmp, per_shard, len(channels))
                    streamed = _stream(archive, compression, checksum, spool, channels, run, params, validate_params)
                if streamed.stats.digest != checksum.digest:
                    if archive is not None and archive.parent == out:
                        archive.unlink(missing_ok=True)  # a fetched copy: the next run fetches it again
                    raise ChecksumMismatchError(
                        f"{src.url}: {checksum.algorithm} mismatch: expected {checksum.digest}, "
                        f"got {streamed.stats.digest}; nothing was written"
                    )
                report = write_report(
                    sorted(streamed.checks, key=lambda c: c.patch_id),
                    ignored=sorted(streamed.stats.stray_files),
                    source={"archive": src.url, "root": streamed.stats.root, "fingerprint": input_fingerprint},
                    out=vtmp,
                    params=validate_params,
                )
                if not report["success"]:
                    raise ValidationFailedError(failure_summary(report))  # leaves tiles/ unpublished
                tiled, shards = _write_tiles(ttmp, spool, streamed, report, run, tile_params)
        except ValidationFailedError:  # the report is published, nothing is tiled
            tiled = shards = 0
    if not report["success"]:
        log.warning("validation of %s failed: %s; nothing tiled", src.url, failure_summary(report))
        return IngestResult(validated, None, report, 0, 0, skipped=False)
    write_json(
        manifest_path,
        {
            "url": src.url,
            "algorithm": checksum.algorithm,
            "checksum": checksum.digest,
            "archive": src.name,
            "size": streamed.stats.compressed_bytes,
            "members": streamed.stats.members,
            "root": streamed.stats.root,
            "checked": report["checked"],
            "patches": tiled,
            "shards": shards,
            "validated": VALIDATED_DIR,
            "tiles": TILES_DIR,
            "input": {"fingerprint": input_fingerprint},
        },
    )
    log.info(
        "ingested %s: %d patches checked, %d quarantined, %d tiled into %d shards under %s",
        src.url,
        report["checked"],
        len(report["quarantined"]),
        tiled,
        shards,
        tiles,
    )
    return IngestResult(validated, tiles, report, tiled, shards, skipped=False)


# --- the stream ---------------------------------------------------------------------------------------------------


def _stream(
    archive: Path,
    compression: str,
    checksum: Checksum,
    spool: _Spool,
    channels: tuple[str, ...],
    run: _Runner,
    params: IngestParams,
    validate_params: ValidateParams,
) -> _Streamed:
    """Read the archive once; every folder is checked (and its channels spooled) by the workers, in batches."""
    streamed = _Streamed()
    patch_name = ben.PATCH_NAME_RE
    work = functools.partial(_check_batch, spool=spool.where(), channels=channels, validate_params=validate_params)
    pending: set[cf.Future] = set()
    batch: list[tuple[str, dict[str, bytes], list[str], int]] = []

    def collect(futures: set[cf.Future]) -> None:
        for future in futures:
            for check, row in future.result():
                streamed.add(check, row)

    def submit() -> None:
        nonlocal pending
        pending.add(run(work, batch))
        if len(pending) >= params.workers * params.in_flight:
            finished, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            collect(finished)

    with byte_bar(archive.stat().st_size, 0, f"ingest {archive.name}") as bar:
        folders: Iterator[StreamedFolder] = stream_folders(
            archive,
            compression,
            algorithm=checksum.algorithm,
            wanted=lambda name: set(expected_files(name)),
            is_item=patch_name,
            stats=streamed.stats,
            progress=bar.update,
        )
        try:
            for folder in folders:
                batch.append((folder.name, folder.files, sorted(folder.entries), spool.add()))
                if len(batch) >= params.batch_patches:
                    submit()
                    batch = []
            if batch:
                submit()
            collect(pending)
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    if not any(patch_name.fullmatch(c.patch_id) for c in streamed.checks):
        raise DownloadError(f"{archive}: the archive holds no BigEarthNet patch folders")
    return streamed


def _check_batch(
    batch: list[tuple[str, dict[str, bytes], list[str], int]],
    *,
    spool: _Where,
    channels: tuple[str, ...],
    validate_params: ValidateParams,
) -> list[tuple[Any, int]]:
    """In a worker: validate's checks of each patch; a patch they pass has its channels written to its spool row (only
    such a patch can be tiled; its metadata.parquet fields are its check's row)."""
    results = []
    for patch_id, files, entries, row in batch:
        check = check_patch_files(patch_id, files, entries, validate_params)
        if not check.reasons:
            pixels = np.empty((PATCH_PX, PATCH_PX, len(channels)), dtype=DTYPE)
            fill_patch([files[ben.band_file(patch_id, band)] for band in channels], out=pixels)
            with _RowFiles(spool, open_files=1) as rows:
                rows.write(row, pixels.data)
        results.append((check, row))
    return results


# --- ranges: the archive cut at seek points, each range read by a Dask worker -------------------------------------


@dataclass(frozen=True)
class _Range:
    number: int
    start: int  # uncompressed offset: where its first folder is looked for (exact: where it is)
    stop: int | None  # where the next range's is looked for (None: the archive's end)
    exact: bool  # `start` is known to be the first folder's header
    attempt: int = 0


@dataclass
class _RangeOutcome:
    number: int
    start: int | None  # the header where its first folder starts (None: no folder starts in it)
    end: int | None  # the header where the next range's first folder starts (None: it read to the archive's end)
    members: int
    stray_files: list[str]
    results: list[tuple[Any, int]]  # _check_batch's, rows counted in its own spool files
    files: list[str]  # its spool files, relative to the tiles directory
    # What stopped a range that searched for its start: real only if that start proves right (see _ingest_ranges).
    error: Exception | None = None


def _ingest_ranges(
    location: str,
    tmp: Path,
    checksum: Checksum,
    per_shard: int,
    channels: tuple[str, ...],
    params: IngestParams,
    validate_params: ValidateParams,
) -> tuple[_Streamed, _Spool]:
    """The archive at `location` (a local path or gs:// URL) indexed in one pass and then read in ranges by the
    workers of the Dask cluster at DASK_SCHEDULER_ADDRESS, each from its own seek point (byte-range reads from the
    object store), into spool files under `tmp`, which the workers must see (a LocalCluster, a shared filesystem).

    Raises:
        ChecksumMismatchError: the indexing pass hashed other bytes than expected; no range is read then.
    """
    from distributed import as_completed, get_client

    client = get_client()
    index_file = tmp / _SEEK_INDEX
    log.info("indexing %s (one pass, seek points every %d KiB)", location, params.seek_spacing_kib)
    started = time.perf_counter()
    index, root = client.submit(
        _index_archive, location, str(index_file), checksum.algorithm, params.seek_spacing_kib << 10, params.workers,
        pure=False,
    ).result()  # fmt: skip
    if index.digest != checksum.digest:
        raise ChecksumMismatchError(
            f"{location}: {checksum.algorithm} mismatch: expected {checksum.digest}, got {index.digest}; "
            "nothing was written"
        )
    log.info("indexed %s in %.1f s: %d seek points", location, time.perf_counter() - started, len(index.points))
    workers = sum(client.nthreads().values())
    cuts = _cuts(index.points, index.size, params.ranges_per_worker * workers)
    ranges = [_Range(k, cut, cuts[k + 1] if k + 1 < len(cuts) else None, exact=k == 0) for k, cut in enumerate(cuts)]
    work = functools.partial(
        _ingest_range,
        location=location,
        index=str(index_file),
        tiles=str(tmp),
        per_shard=per_shard,
        channels=channels,
        root=root,
        validate_params=validate_params,
    )
    log.info("reading %s in %d ranges on %d Dask workers", location, len(ranges), workers)
    started = time.perf_counter()
    outcomes: dict[int, _RangeOutcome] = {}
    futures = [client.submit(work, r, pure=False) for r in ranges]
    try:
        with byte_bar(index.size, 0, f"ingest {Path(location).name}") as bar:
            for future in as_completed(futures):
                outcome = future.result()
                outcomes[outcome.number] = outcome
                r = ranges[outcome.number]
                bar.update((r.stop or index.size) - r.start)
    except BaseException:
        client.cancel(futures)
        raise
    ordered = [outcomes[k] for k in range(len(ranges))]
    for k in range(1, len(ordered)):
        before, this = ordered[k - 1], ordered[k]
        if this.start == before.end:
            continue
        # The range found its first folder elsewhere than the range before (which walked to it from the start) did.
        log.warning("range %d of %s started at %s, not %s: read again from there", k, location, this.start, before.end)
        _discard(tmp, this.files)
        if before.end is None:  # the range before read to the archive's end: nothing is left for this one
            ordered[k] = _RangeOutcome(k, None, None, 0, [], [], [])
        else:
            again = replace(ranges[k], start=before.end, exact=True, attempt=1)
            ordered[k] = client.submit(work, again, pure=False).result()
    for outcome in ordered:
        if outcome.error is not None:  # the range began where the range before ended: what it met is in the archive
            raise outcome.error
    index_file.unlink()
    log.info("read %d ranges of %s in %.1f s", len(ranges), location, time.perf_counter() - started)
    return _merge_ranges(ordered, location, tmp, per_shard, len(channels), index, root)


def _cuts(points: tuple[int, ...], size: int, ranges: int) -> list[int]:
    """Where `ranges` ranges of about equal uncompressed size start: at seek points (the first at 0)."""
    cuts = [0]
    for k in range(1, ranges):
        i = bisect.bisect_left(points, k * size / ranges)
        if i < len(points) and points[i] > cuts[-1]:
            cuts.append(points[i])
    return cuts


def _index_archive(location: str, index: str, algorithm: str, spacing: int, threads: int) -> tuple[SeekIndex, str]:
    """On a worker: the seek index (and digest) of the archive, and its dataset root."""
    try:
        built = build_index(
            functools.partial(_open_archive, location), Path(index), algorithm=algorithm, spacing=spacing,
            threads=threads,
        )  # fmt: skip
    except ValueError as exc:  # rapidgzip's word for bytes that are not gzip
        raise DownloadError(f"{location}: cannot read as a gzip file: {exc}") from exc
    with _open_archive(location) as raw, open_indexed(raw, built.path) as tar_bytes:
        return built, dataset_root(tar_bytes, ben.PATCH_NAME_RE)


def _ingest_range(
    part: _Range,
    *,
    location: str,
    index: str,
    tiles: str,
    per_shard: int,
    channels: tuple[str, ...],
    root: str,
    validate_params: ValidateParams,
) -> _RangeOutcome:
    """On a worker: validate's checks of each folder of one range, the channels of those that pass into spool files
    of its own."""
    stats = StreamStats()
    pattern = f"{SHARD_DIR}/range-{part.number:05d}.{part.attempt}-{{:05d}}.npy"
    spool = _Spool(Path(tiles), per_shard, len(channels), pattern=pattern)
    results: list[tuple[Any, int]] = []
    error = None
    with _open_archive(location) as raw, open_indexed(raw, Path(index)) as tar_bytes:
        folders = range_folders(
            tar_bytes,
            location,
            start=part.start,
            stop=part.stop,
            root=root,
            exact=part.exact,
            wanted=lambda name: set(expected_files(name)),
            is_item=ben.PATCH_NAME_RE,
            stats=stats,
        )
        try:
            for folder in folders:
                batch = [(folder.name, folder.files, sorted(folder.entries), spool.add())]
                results += _check_batch(batch, spool=spool.where(), channels=channels, validate_params=validate_params)
        except (tarfile.TarError, EOFError, ValueError, UnsafeArchiveError, DownloadError) as exc:
            if isinstance(exc, tarfile.TarError | EOFError | ValueError):  # as stream_folders words it
                exc = DownloadError(f"{location}: cannot read as a tar archive: {exc}")
            if part.exact:
                raise exc from None
            # Walked from a header found by its checksum: a false one would lead into file data, so the driver
            # decides, once it knows whether this range began where the range before ended.
            error = exc
    return _RangeOutcome(
        part.number, stats.start, stats.end, stats.members, stats.stray_files, results, spool.names(), error
    )


def _merge_ranges(
    ordered: list[_RangeOutcome],
    location: str,
    tmp: Path,
    per_shard: int,
    channels: int,
    index: SeekIndex,
    root: str,
) -> tuple[_Streamed, _Spool]:
    """The ranges' outcomes as one stream's: their spool files renamed into one sequence, their rows numbered in it."""
    streamed = _Streamed()
    streamed.stats = StreamStats(root=root, digest=index.digest, compressed_bytes=index.compressed_bytes)
    files = 0
    for outcome in ordered:
        for name in outcome.files:
            (tmp / name).rename(tmp / SHARD_PATTERN.format(files))
            files += 1
        base = (files - len(outcome.files)) * per_shard
        for check, row in outcome.results:
            if check.patch_id in streamed.rows:
                raise DownloadError(
                    f"{location}: folder {check.patch_id} comes back after other folders' members: the stream reads "
                    "archives whose folders are contiguous, as tar writes them (tasks.download extracts others)"
                )
            streamed.add(check, base + row)
        streamed.stats.members += outcome.members
        streamed.stats.stray_files += outcome.stray_files
    if not any(ben.PATCH_NAME_RE.fullmatch(c.patch_id) for c in streamed.checks):
        raise DownloadError(f"{location}: the archive holds no BigEarthNet patch folders")
    return streamed, _Spool(tmp, per_shard, channels, adopt=files)


def _discard(tmp: Path, names: list[str]) -> None:
    for name in names:
        (tmp / name).unlink(missing_ok=True)


def _open_archive(location: str) -> IO[bytes]:
    """The compressed archive, seekable: a local file, or an object read with range requests."""
    if location.startswith("gs://"):
        from google.api_core.exceptions import NotFound

        bucket, name = split_gs_url(location)
        blob = gcs_client().bucket(bucket).blob(name)
        try:
            blob.reload()
        except NotFound as exc:
            raise DownloadError(f"{location}: no such object") from exc
        return blob.open("rb", chunk_size=_RANGE_REQUEST)
    return Path(location).open("rb")


# --- the spool: the shard files, filled in arrival order, then put in name order ----------------------------------


class _Spool:
    """Shard files of `per_shard` patches each (tasks.lib.tiles.create_shard), row r of the stream at file
    r // per_shard, row r % per_shard. Created as the stream needs them, sparse until written, and written and read
    with positioned I/O, not memory maps: mapped pages stay resident in whichever process touched them, so memory
    would grow with the archive."""

    def __init__(
        self, tiles: Path, per_shard: int, channels: int, *, pattern: str = SHARD_PATTERN, adopt: int = 0
    ) -> None:
        """Spool files named `pattern`.format(number) under `tiles`: new ones, or the first `adopt` already there
        (every row of them counted as spooled)."""
        self.tiles = tiles
        self.per_shard = per_shard
        self.channels = channels
        self.pattern = pattern
        self.files = adopt
        self.rows = adopt * per_shard
        (tiles / SHARD_DIR).mkdir(exist_ok=True)
        if not adopt:
            self._new_file()
        # The .npy header's length: the same in every spool file (same shape), known before any row is written.
        self.data_offset = _data_offset(tiles / pattern.format(0))

    def where(self) -> _Where:
        return _Where(str(self.tiles), self.per_shard, patch_bytes(self.channels), self.data_offset, self.pattern)

    def names(self) -> list[str]:
        return [self.pattern.format(k) for k in range(self.files)]

    def add(self) -> int:
        row = self.rows
        self.rows += 1
        if row // self.per_shard >= self.files:
            self._new_file()
        return row

    def _new_file(self) -> None:
        create_shard(self.tiles / self.pattern.format(self.files), self.per_shard, self.channels)
        self.files += 1

    def arrange(self, destination: np.ndarray) -> None:
        """Move the patch at row r to row destination[r], for every r (a permutation of the spooled rows), in place:
        each cycle of the permutation is followed with one patch in hand."""
        with _RowFiles(self.where()) as rows:
            placed = np.zeros(len(destination), dtype=bool)
            for start in range(len(destination)):
                if placed[start]:
                    continue
                if destination[start] == start:
                    placed[start] = True
                    continue
                i, carried = start, rows.read(start)
                while True:
                    j = int(destination[i])
                    placed[j] = True
                    if j == start:
                        rows.write(start, carried)
                        break
                    displaced = rows.read(j)
                    rows.write(j, carried)
                    carried, i = displaced, j

    def finish(self, patches: int) -> list[str]:
        """Keep the shards `patches` patches fill: the last one rewritten at its own size, the rest removed."""
        count = -(-patches // self.per_shard)
        last_rows = patches - (count - 1) * self.per_shard
        if last_rows < self.per_shard and not self._cut_in_place(count - 1, last_rows):
            last = self.tiles / shard_name(count - 1)
            rewritten = last.with_name(".last.npy")
            create_shard(rewritten, last_rows, self.channels)
            size = last_rows * patch_bytes(self.channels)
            with last.open("rb") as src, rewritten.open("r+b") as dst:
                src.seek(self.data_offset)
                dst.seek(_data_offset(rewritten))
                while size:
                    chunk = src.read(min(size, 1 << 24))
                    dst.write(chunk)
                    size -= len(chunk)
            rewritten.replace(last)
        for k in range(count, self.files):
            (self.tiles / shard_name(k)).unlink()
        return [shard_name(k) for k in range(count)]

    def _cut_in_place(self, number: int, rows: int) -> bool:
        """Shorten spool file `number` to `rows` rows without a copy, when the .npy header numpy writes for the new
        shape is as long as the old one (it is padded to a multiple of 64 bytes, so it nearly always is)."""
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header,
            {
                "descr": np.lib.format.dtype_to_descr(np.dtype(DTYPE)),
                "fortran_order": False,
                "shape": (rows, PATCH_PX, PATCH_PX, self.channels),
            },
        )
        if len(header.getvalue()) != self.data_offset:
            return False
        path = self.tiles / shard_name(number)
        with path.open("r+b") as f:
            f.write(header.getvalue())
            f.truncate(self.data_offset + rows * patch_bytes(self.channels))
        return True


@dataclass(frozen=True)
class _Where:
    """What a worker needs to address a spool row."""

    tiles: str
    per_shard: int
    row_bytes: int
    data_offset: int
    pattern: str

    def position(self, row: int) -> tuple[Path, int]:
        return (
            Path(self.tiles) / self.pattern.format(row // self.per_shard),
            self.data_offset + (row % self.per_shard) * self.row_bytes,
        )


class _RowFiles:
    """Rows of the spool read and written in place, through a bounded set of open files."""

    def __init__(self, where: _Where, open_files: int = 64) -> None:
        self._where = where
        self._open: dict[Path, int] = {}
        self._limit = open_files

    def __enter__(self) -> _RowFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()

    def _fd(self, path: Path) -> int:
        fd = self._open.pop(path, None)
        if fd is None:
            if len(self._open) >= self._limit:
                os.close(self._open.pop(next(iter(self._open))))
            fd = os.open(path, os.O_RDWR)
        self._open[path] = fd  # most recently used last
        return fd

    def read(self, row: int) -> bytes:
        path, offset = self._where.position(row)
        return os.pread(self._fd(path), self._where.row_bytes, offset)

    def write(self, row: int, data: bytes | memoryview) -> None:
        path, offset = self._where.position(row)
        if os.pwrite(self._fd(path), data, offset) != self._where.row_bytes:
            raise OSError(f"{path}: short write of spool row {row}")


def _data_offset(path: Path) -> int:
    with path.open("rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        read_header(f)
        return f.tell()


def _write_tiles(
    tmp: Path, spool: _Spool, streamed: _Streamed, report: dict[str, Any], run: _Runner, params: TileParams
) -> tuple[int, int]:
    """The tiles directory of the patches validation kept, as tasks.tile writes it."""
    skip = {q["patch_id"] for q in report["quarantined"]}
    kept = sorted(c.patch_id for c in streamed.checks if c.patch_id not in skip)
    if not kept:
        raise TilingError(f"{tmp}: every patch was quarantined: nothing to tile")
    destination = np.full(spool.rows, -1, dtype=np.int64)
    for position, patch_id in enumerate(kept):
        destination[streamed.rows[patch_id]] = position
    # The other rows (quarantined patches, rows a range left unfilled) go past the kept ones: those already there stay.
    dropped = np.flatnonzero(destination < 0)
    staying = dropped[dropped >= len(kept)]
    destination[staying] = staying
    free = np.ones(spool.rows, dtype=bool)
    free[: len(kept)] = False
    free[staying] = False
    destination[dropped[dropped < len(kept)]] = np.flatnonzero(free)
    spool.arrange(destination)
    shard_names = spool.finish(len(kept))

    clouds = ben.cloud_and_shadow_patches()
    groups = [kept[k * spool.per_shard : (k + 1) * spool.per_shard] for k in range(len(shard_names))]
    futures = [
        run(_shard_moments_of_file, str(tmp / name), [p in clouds for p in group])
        for name, group in zip(shard_names, groups, strict=True)
    ]
    moments = merge_moments((f.result() for f in futures), spool.channels)
    # tile's parts, one batch at a time here: only one batch's frame is ever held.
    fields = {c.patch_id: c.row for c in streamed.checks}
    (tmp / METADATA_FILE).mkdir()
    for number, start in enumerate(range(0, len(kept), params.metadata_batch)):
        batch = kept[start : start + params.metadata_batch]
        write_metadata_part(str(tmp / METADATA_FILE), number, _metadata_frame_of_rows,
                            [(p, fields[p]) for p in batch], metadata_known(batch))  # fmt: skip
    index = [(p, name, i) for name, group in zip(shard_names, groups, strict=True) for i, p in enumerate(group)]
    write_tables(tmp, index=index, moments=moments, shard_names=shard_names, skipped=skip, params=params)
    return len(kept), len(shard_names)


def _metadata_frame_of_rows(batch: list[tuple[str, dict[str, Any]]], known: dict[str, list[Any]]) -> Any:
    return metadata_frame([metadata_record_of_row(patch_id, row) for patch_id, row in batch], known)


def _shard_moments_of_file(path: str, cloud: list[bool]) -> dict[str, Any]:
    return shard_moments(np.load(path, mmap_mode="r"), cloud)


# --- where the work runs ------------------------------------------------------------------------------------------

_Runner = Callable[..., cf.Future]


@contextlib.contextmanager
def _runner(workers: int, address: str | None = None) -> Iterator[_Runner]:
    """Submit work to the Dask cluster at `address`, to `workers` processes, or run it here at once with one worker
    (tests, debugging)."""
    if address:
        from distributed import Client

        with Client(address) as client:
            yield client.submit
        return
    if workers == 1:

        def inline(fn: Callable[..., Any], *args: Any) -> cf.Future:
            future: cf.Future = cf.Future()
            future.set_result(fn(*args))
            return future

        yield inline
        return
    with cf.ProcessPoolExecutor(max_workers=workers) as pool:
        try:
            yield pool.submit
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


# --- files --------------------------------------------------------------------------------------------------------


def _local_archive(src: Source, out: Path, checksum: Checksum, params: DownloadParams) -> Path:
    """The file to stream: a local source where it is; a remote one fetched (and verified) into `out` first."""
    if src.kind == "file":
        if src.path is None or not src.path.is_file():
            raise DownloadError(f"{src.url}: no such file")
        return src.path
    archive = out / src.name
    if not archive.is_file():  # an earlier run's verified copy is verified again as it streams
        fetch(src, archive, checksum, params)
    return archive


def _remove_leftovers(out: Path) -> None:
    """Temporary directories of a run that was killed (atomic_dir removes them on any error it sees): the spool of
    a killed run can be as large as the tiles. One run per OUT at a time."""
    for name in (VALIDATED_DIR, TILES_DIR):
        for leftover in out.glob(f".{name}.*"):
            if leftover.is_dir() and leftover.suffix in (".tmp", ".failed", ".stale"):
                log.info("removing %s, left by an interrupted run", leftover)
                shutil.rmtree(leftover, ignore_errors=True)


def _read_report(validated: Path) -> dict[str, Any]:
    return json.loads((validated / REPORT_FILE).read_text())


# --- command line -------------------------------------------------------------------------------------------------


def main() -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="http(s)://, gs://, file:// URL or local path of the archive")
    p.add_argument("--out", type=Path, required=True, help="directory for validated/, tiles/ and the manifest")
    check = p.add_mutually_exclusive_group(required=True)
    check.add_argument("--sha256", metavar="HEX")
    check.add_argument("--md5", metavar="HEX")
    check.add_argument("--checksum-url", metavar="URL", help="a sha256sum/md5sum file or bare hex digest")
    p.add_argument("--bands", choices=sorted(CHANNELS), help="rgb or all (default: params tile.bands)")
    p.add_argument("--max-bad-fraction", type=float, help="fail above this quarantined share (default: params)")
    args = p.parse_args()
    cli.configure_logging(args.verbose)
    overrides = list(args.overrides)
    if args.bands:
        overrides.append(f"tile.bands={args.bands}")
    if args.max_bad_fraction is not None:
        overrides.append(f"validate.max_bad_fraction={args.max_bad_fraction}")
    download_params = load_section("download", DownloadParams, args.params, overrides)
    url, checksum = resolve_request(
        url=args.url,
        source=None,
        sha256=args.sha256,
        md5=args.md5,
        checksum_url=args.checksum_url,
        params=download_params,
    )
    result = ingest(
        url=url,
        checksum=checksum,
        out=args.out,
        params=load_section("ingest", IngestParams, args.params, overrides),
        validate_params=load_section("validate", ValidateParams, args.params, overrides),
        tile_params=load_section("tile", TileParams, args.params, overrides),
        download_params=download_params,
    )
    for item in result.report["quarantined"]:
        log.warning("quarantined %s: %s", item["patch_id"], "; ".join(item["reasons"]))
    if not result.success:
        raise ValidationFailedError(
            f"validation of {url} failed: {failure_summary(result.report)}; "
            f"see {result.validated / REPORT_FILE} and {result.validated / DATA_DOCS_INDEX}"
        )
    print(result.tiles)


if __name__ == "__main__":
    cli.run(main)
