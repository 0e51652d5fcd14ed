"""Turn validated BigEarthNet-S2 patches into training-ready band shards, a metadata table and band statistics.

The output directory's format (its files, the shard layout, the channel sets and their order) is defined in
tasks.lib.tiles. The metadata table is built from the JSON files in batches, each written by a worker as one part of
`metadata.parquet`. `tiles.json` holds nothing tied to where or when the step ran: that goes to the
`.<out>.state.json` file beside the output, used to skip unchanged re-runs. Quarantined patches (from the validation
report) are skipped and listed in `tiles.json`. Work runs on a Dask cluster: a LocalCluster, or the one at
DASK_SCHEDULER_ADDRESS.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field
from tqdm import tqdm

from tasks.lib import bigearthnet as ben
from tasks.lib import cli
from tasks.lib.bands import BandReader
from tasks.lib.config import StepParams, load_section
from tasks.lib.errors import TilingError
from tasks.lib.files import atomic_dir, folders_fingerprint, write_json
from tasks.lib.outputs import completed
from tasks.lib.tiles import (
    CHANNELS,
    CLASSES,
    DTYPE,
    INDEX_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    PATCH_PX,
    SHARD_DIR,
    STATS_FILE,
    create_shard,
    patch_bytes,
    shard_name,
)

log = logging.getLogger(__name__)


class TileParams(StepParams):
    bands: Literal["rgb", "all"]
    shard_patches: int = Field(ge=1)
    shard_max_mb: int = Field(ge=1)
    metadata_batch: int = Field(ge=1)
    workers: int = Field(ge=1)


@dataclass(frozen=True)
class TileResult:
    out: Path
    patches: int
    shards: int
    skipped: bool  # an identical earlier run's output was reused


# --- work done on the Dask workers --------------------------------------------------------------------------------


def _read_metadata_batch(folders: list[str], known: dict[str, list[Any]]) -> pd.DataFrame:
    """One partition of metadata.parquet: the JSON files of `folders`, plus columns the driver already knows
    (official list memberships, season, country) in the same order."""
    records = []
    for folder in folders:
        patch_id = Path(folder).name
        records.append(metadata_record(patch_id, (Path(folder) / ben.metadata_file(patch_id)).read_bytes()))
    return metadata_frame(records, known)


def metadata_record(patch_id: str, raw: bytes) -> dict[str, Any]:
    """The metadata.parquet fields of one patch from its `_labels_metadata.json` bytes (a validated file)."""
    data = json.loads(raw)
    coords = data["coordinates"]
    return {
        "patch_id": patch_id,
        "labels": list(data["labels"]),
        "acquisition_date": data["acquisition_date"],
        "tile_source": data["tile_source"],
        "ulx": float(coords["ulx"]),
        "uly": float(coords["uly"]),
        "lrx": float(coords["lrx"]),
        "lry": float(coords["lry"]),
    }


def metadata_record_of_row(patch_id: str, row: dict[str, Any]) -> dict[str, Any]:
    """What metadata_record gives for a patch whose checks passed, from the fields tasks.validate already parsed out
    of the same JSON (its check's `row`): the stream keeps one copy of them per patch, not two."""
    return {"patch_id": patch_id, **{key: row[key] for key in _JSON_COLUMNS if key != "patch_id"}}


def metadata_frame(records: list[dict[str, Any]], known: dict[str, list[Any]]) -> pd.DataFrame:
    """One partition of metadata.parquet from `metadata_record`s and the driver's columns (same order)."""
    frame = pd.DataFrame(records, columns=list(_JSON_COLUMNS))
    for column, values in known.items():
        frame[column] = pd.Series(values, dtype=_KNOWN_COLUMNS[column], index=frame.index)
    return frame


_JSON_COLUMNS = {
    "patch_id": "object",
    "labels": "object",
    "acquisition_date": "object",
    "tile_source": "object",
    "ulx": "float64",
    "uly": "float64",
    "lrx": "float64",
    "lry": "float64",
}
_KNOWN_COLUMNS = {"cloud": "bool", "snow": "bool", "season": "object", "country": "object"}


def _metadata_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("patch_id", pa.string()),
            ("labels", pa.list_(pa.string())),
            ("acquisition_date", pa.string()),
            ("tile_source", pa.string()),
            *((name, pa.float64()) for name in ("ulx", "uly", "lrx", "lry")),
            ("cloud", pa.bool_()),
            ("snow", pa.bool_()),
            ("season", pa.string()),
            ("country", pa.string()),
        ]
    )


def write_metadata_part(
    directory: str, number: int, read_batch: Callable[..., pd.DataFrame], batch: list[Any], known: dict[str, list[Any]]
) -> int:
    """Write part `number` of metadata.parquet into `directory`: `read_batch(batch, known)`, where `known` holds the
    batch's official-list and name-table columns (metadata_known). tile's workers and ingest's driver both write
    through here, so their files are the same bytes. Returns the rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = read_batch(batch, known)
    pq.write_table(
        pa.Table.from_pandas(frame, schema=_metadata_schema(), preserve_index=False),
        Path(directory) / f"part.{number}.parquet",
    )
    return len(frame)


def metadata_known(patch_ids: list[str]) -> dict[str, list[Any]]:
    """The metadata columns from the official lists and the name table, for a batch of patches (in their order)."""
    names = ben.name_table().reindex(patch_ids)
    return {
        "cloud": [p in ben.cloud_and_shadow_patches() for p in patch_ids],
        "snow": [p in ben.seasonal_snow_patches() for p in patch_ids],
        "season": names["season"].tolist(),
        "country": names["country"].tolist(),
    }


@functools.cache
def _band_reader() -> BandReader:
    return BandReader()  # one per worker process: it learns each band layout once


def _read_patch(folder: Path, channels: tuple[str, ...], out: np.ndarray) -> None:
    """Fill `out` (PATCH_PX, PATCH_PX, C) from the band files of `folder`."""
    fill_patch([(folder / ben.band_file(folder.name, band)).read_bytes() for band in channels], out)


def fill_patch(bands: Sequence[bytes], out: np.ndarray) -> None:
    """Fill `out` (PATCH_PX, PATCH_PX, C) from the bytes of C band files in channel order; coarser bands are repeated
    up to PATCH_PX (nearest neighbour keeps values exact)."""
    planes = np.empty((len(bands), PATCH_PX, PATCH_PX), dtype=DTYPE)
    for c, data in enumerate(bands):
        array = _band_reader().decode(data)
        size = array.shape[0]
        # A (size, f, size, f) view of the plane takes each value f×f times without a temporary.
        planes[c].reshape(size, PATCH_PX // size, size, PATCH_PX // size)[...] = array[:, None, :, None]
    # Filling contiguous planes and transposing once is twice as fast as writing strided channels one by one.
    out[...] = planes.transpose(1, 2, 0)


class _Moments:
    """Exact per-channel count, sum, sum of squares, min and max; merging two is exact too (Python integers)."""

    def __init__(self, channels: int) -> None:
        self.count = 0
        self.total = [0] * channels
        self.squares = [0] * channels
        self.low = [None] * channels
        self.high = [None] * channels

    @classmethod
    def of(cls, pixels: np.ndarray, rows: np.ndarray, block: int = 64) -> _Moments:
        """Moments of the patches `rows` of (n, H, W, C) uint16 pixels, from one histogram per channel
        (np.bincount), copying `block` patches at a time so that temporaries stay a few MB whatever the shard size."""
        channels = pixels.shape[-1]
        counts = np.zeros((channels, 65536), dtype=np.int64)
        for start in range(0, len(rows), block):
            chunk = pixels[rows[start : start + block]]
            for c in range(channels):
                counts[c] += np.bincount(chunk[..., c].ravel(), minlength=65536)
        moments = cls(channels)
        if not len(rows):
            return moments
        values = np.arange(65536, dtype=np.int64)
        for c in range(channels):
            present = np.flatnonzero(counts[c])
            moments.count = int(counts[c].sum())
            moments.total[c] = int(counts[c] @ values)
            # Fits int64 for any shard: at most 2**31 pixels × 65,535² per channel.
            moments.squares[c] = int(counts[c] @ (values * values))
            moments.low[c], moments.high[c] = int(present[0]), int(present[-1])
        return moments

    def merge(self, other: _Moments) -> _Moments:
        merged = _Moments(len(self.total))
        merged.count = self.count + other.count
        for c in range(len(self.total)):
            merged.total[c] = self.total[c] + other.total[c]
            merged.squares[c] = self.squares[c] + other.squares[c]
            lows = [v for v in (self.low[c], other.low[c]) if v is not None]
            highs = [v for v in (self.high[c], other.high[c]) if v is not None]
            merged.low[c] = min(lows) if lows else None
            merged.high[c] = max(highs) if highs else None
        return merged

    def describe(self, channels: tuple[str, ...]) -> dict[str, Any] | None:
        if not self.count:
            return None
        n = self.count
        return {
            band: {
                "count": n,
                "mean": self.total[c] / n,
                # Exact integer arithmetic up to the final division: no cancellation at any scale.
                "std": math.sqrt((self.squares[c] * n - self.total[c] ** 2) / n**2),
                "min": self.low[c],
                "max": self.high[c],
            }
            for c, band in enumerate(channels)
        }


def _write_shard(path: str, folders: list[str], cloud: list[bool], channels: tuple[str, ...]) -> dict[str, _Moments]:
    """Fill one shard file (inside the output's temporary directory) and return its per-class moments."""
    shard = create_shard(path, len(folders), len(channels))
    for i, folder in enumerate(folders):
        _read_patch(Path(folder), channels, out=shard[i])
    shard.flush()
    moments = shard_moments(shard, cloud)
    del shard
    return moments


def shard_moments(shard: np.ndarray, cloud: Sequence[bool]) -> dict[str, _Moments]:
    """Per-class moments (CLASSES) of a shard's patches, `cloud` saying which are in the official cloud list."""
    is_cloud = np.asarray(cloud, dtype=bool)
    return {name: _Moments.of(shard, np.flatnonzero(is_cloud == flag)) for name, flag in CLASSES.items()}


def merge_moments(parts: Iterable[dict[str, _Moments]], channels: int) -> dict[str, _Moments]:
    """Per-class moments merged over shards (exact: the order does not matter)."""
    moments = {name: _Moments(channels) for name in CLASSES}
    for part in parts:
        moments = {name: moments[name].merge(part[name]) for name in CLASSES}
    return moments


def patches_per_shard(params: TileParams, channels: int) -> int:
    """Patches in every shard but the last: `shard_patches`, fewer when `shard_max_mb` says so."""
    return max(1, min(params.shard_patches, params.shard_max_mb * 2**20 // patch_bytes(channels)))


# --- the driver ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _dask_client(workers: int) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    address = os.environ.get("DASK_SCHEDULER_ADDRESS")
    if address:
        log.info("using the Dask cluster at %s", address)
        with Client(address) as client:
            yield client
        return
    import dask

    with (
        dask.config.set({"distributed.worker.multiprocessing-method": _worker_start_method()}),
        LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        yield client


def _worker_start_method() -> str:
    """How the local cluster starts its worker processes.

    Dask's default, spawn, re-runs the parent's `__main__` in every worker. That is this module when the step runs as
    `python -m tasks.tile`, but a host's own script when the step runs inside one: an Airflow task's main script is
    `airflow`, which refuses to start in a worker (the task runner puts the metadata database off limits), so the
    cluster never came up under the scheduler. Then the workers are forked instead: they only decode TIFFs, and
    nothing they inherit from the host is used.
    """
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return "spawn" if spec is not None and spec.name.startswith("tasks.") else "fork"


def _quarantined(report: Path | None, patches: Path) -> set[str]:
    if report is None:
        return set()
    try:
        data = json.loads(report.read_text())
        ids = {item["patch_id"] for item in data["quarantined"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TilingError(f"{report}: not a readable validation report ({exc})") from exc
    root = data.get("input", {}).get("root")
    if root and Path(root).resolve() != patches.resolve():
        raise TilingError(f"{report}: the report is for {root}, not {patches}")
    if not data.get("success", True):
        raise TilingError(f"{report}: validation of this snapshot failed; fix or re-validate before tiling")
    return ids


def state_path(out: Path) -> Path:
    """Where a run records what it was built from (absolute paths, file times): beside the output, not in it,
    so that the output (which DVC versions by content) is identical wherever and whenever identical data is tiled."""
    return out.with_name(f".{out.name}.state.json")


def _stats(moments: dict[str, _Moments], channels: tuple[str, ...]) -> dict[str, Any]:
    overall = _Moments(len(channels))
    for m in moments.values():
        overall = overall.merge(m)
    return {
        "channels": list(channels),
        "all": overall.describe(channels),
        **{name: m.describe(channels) for name, m in moments.items()},
    }


def write_tables(
    out: Path,
    *,
    index: list[tuple[str, str, int]],
    moments: dict[str, _Moments],
    shard_names: list[str],
    skipped: set[str],
    params: TileParams,
) -> None:
    """index.parquet, stats.json and tiles.json (last) into `out`, once its shards and metadata are written.

    Args:
        index: (patch_id, shard, offset) of every tiled patch, in shard order.
        moments: per class (CLASSES), merged over every shard.
        skipped: the quarantined patches left out.
    """
    channels = CHANNELS[params.bands]
    pd.DataFrame(index, columns=["patch_id", "shard", "offset"]).to_parquet(out / INDEX_FILE, index=False)
    write_json(out / STATS_FILE, _stats(moments, channels))
    manifest = {
        "patches": len(index),
        "channels": list(channels),
        "channel_meaning": "red, green, blue" if params.bands == "rgb" else "Sentinel-2 bands in this order",
        "dtype": DTYPE,
        "shape_per_patch": [PATCH_PX, PATCH_PX, len(channels)],
        "shards": shard_names,
        "skipped_quarantined": sorted(skipped),
        "params": params.model_dump(),
    }
    write_json(out / MANIFEST_FILE, manifest)


def tile(*, patches: Path, out: Path, params: TileParams, report: Path | None = None) -> TileResult:
    """Tile every patch folder under `patches` not quarantined by `report` into `out` (replaced atomically).

    Raises:
        TilingError: no patch folders, an unreadable or failed validation report, or a report for another root.
    """
    skip = _quarantined(report, patches)
    folders = sorted(p for p in patches.iterdir() if p.is_dir() and p.name not in skip) if patches.is_dir() else []
    if not folders:
        raise TilingError(f"{patches}: no patch folders to tile")
    channels = CHANNELS[params.bands]
    fingerprint = folders_fingerprint(
        folders, params.model_dump_json().encode(), report.read_bytes() if report else b""
    )
    state = state_path(out)
    if completed(state, fingerprint, requires=[out / MANIFEST_FILE], at=("fingerprint",), what="tiles"):
        manifest = json.loads((out / MANIFEST_FILE).read_text())
        return TileResult(out, manifest["patches"], len(manifest["shards"]), skipped=True)
    state.unlink(missing_ok=True)

    per_shard = patches_per_shard(params, len(channels))
    log.info("tiling %d patches (%d quarantined skipped) from %s into %s: bands %s, %d patches per shard",
             len(folders), len(skip), patches, out, "/".join(channels), per_shard)  # fmt: skip

    from distributed import as_completed

    with _dask_client(params.workers) as client, atomic_dir(out) as tmp:
        # The metadata table and the shards are built at the same time: shards need only the cloud flag, which is
        # official list membership by name, not anything in the JSON files.
        # Workers write the partitions themselves: the driver never holds the whole table (590k rows at full scale).
        (tmp / METADATA_FILE).mkdir()
        batches = [folders[i : i + params.metadata_batch] for i in range(0, len(folders), params.metadata_batch)]
        metadata_futures = []
        for number, batch in enumerate(batches):
            known = metadata_known([f.name for f in batch])
            part = (str(tmp / METADATA_FILE), number, _read_metadata_batch, [str(f) for f in batch], known)
            metadata_futures.append(client.submit(write_metadata_part, *part, pure=False))
        clouds = ben.cloud_and_shadow_patches()
        (tmp / SHARD_DIR).mkdir()
        shard_names, sizes, index = [], {}, []
        for n, start in enumerate(range(0, len(folders), per_shard)):
            group = folders[start : start + per_shard]
            name = shard_name(n)
            shard_names.append(name)
            index += [(f.name, name, i) for i, f in enumerate(group)]
            future = client.submit(_write_shard, str(tmp / name), [str(f) for f in group],
                                   [f.name in clouds for f in group], channels, pure=False)  # fmt: skip
            sizes[future] = len(group)

        moments = {name: _Moments(len(channels)) for name in CLASSES}
        try:
            with tqdm(total=len(folders), unit="patch", desc="tile", disable=None) as bar:
                for future in as_completed(sizes):
                    for name, m in future.result().items():
                        moments[name] = moments[name].merge(m)
                    bar.update(sizes[future])
            client.gather(metadata_futures)
        except BaseException:
            client.cancel([*sizes, *metadata_futures])  # don't leave the cluster busy with a failed run
            raise

        write_tables(tmp, index=index, moments=moments, shard_names=shard_names, skipped=skip, params=params)
    write_json(
        state,
        {
            "fingerprint": fingerprint,
            "source": str(patches.resolve()),
            "validation_report": str(report.resolve()) if report else None,
        },
    )
    log.info("tiled %d patches into %d shards under %s", len(folders), len(shard_names), out)
    return TileResult(out, len(folders), len(shard_names), skipped=False)


def main() -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--patches", type=Path, required=True, help="dataset root: one folder per patch")
    p.add_argument("--out", type=Path, required=True, help="output directory for this snapshot's tiles")
    p.add_argument("--report", type=Path, help="validation report.json: its quarantined patches are skipped")
    p.add_argument("--bands", choices=sorted(CHANNELS), help="rgb or all (default: params tile.bands)")
    args = p.parse_args()
    cli.configure_logging(args.verbose)
    overrides = [*args.overrides, *([f"tile.bands={args.bands}"] if args.bands else [])]
    params = load_section("tile", TileParams, args.params, overrides)
    result = tile(patches=args.patches, out=args.out, params=params, report=args.report)
    print(result.out)


if __name__ == "__main__":
    cli.run(main)
