"""Screen a whole snapshot with a registered model: every patch scored, the cloud-free ones listed.

`python -m tasks.screen --tiles DIR --out DIR [--model URI]` scores every patch of the tile step's output (not only a
sample set) with the version `--model` names (default `models:/cloudscreen-classifier@champion`), deciding at the
operating threshold the registry records for that version (tasks.lib.scoring; a version without one is refused). It
writes `OUT/<version>/`:
- `scores.parquet`: patch_id, cloud_probability, is_cloud, season, country; the file's metadata (key `cloudscreen`)
  names the model, its version and threshold, the snapshot and its data version;
- `clear.parquet`: the ids of the patches screened cloud-free, the list datasets are built from;
- `agreement.parquet`: precision, recall and counts of the screen against BigEarthNet's official cloud-and-shadow
  list (the `cloud` column of metadata.parquet, which labels every patch), overall and per slice (`screen`
  section's slice_columns): how well the screen works on data it never trained on;
- `summary.json` (last): counts, the predicted cloud fraction overall and per slice, the agreement overall, the model
  and data versions, throughput, the MLflow run and the input fingerprint.

Output is per (snapshot, version): the same version again finds its summary and does nothing; another version writes
its own directory beside the others, never over them. The directory appears whole or not at all. Each screening is
an MLflow run in the `screen` section's experiment (params, metrics, lineage tags, summary.json).

Memory stays flat in the number of patches: shards are memory-mapped and scored a batch at a time. With
DASK_SCHEDULER_ADDRESS set, shards are scored on that cluster's workers, each loading the model once; otherwise on
this machine.

In a GPU pod (the screening DAG's kubernetes backend; tasks.lib.backends), the same command runs with
`--restore-data DIR --data-version V` (the snapshot's data version restored from the DVC remote into DIR/data;
`--tiles` is then relative to it), `--out gs://BUCKET/PREFIX` (the screening is written to a temporary directory,
then uploaded to `gs://BUCKET/PREFIX/<version>/`, summary.json last; a summary already there with the same
fingerprint means nothing to do) and `--xcom-out FILE` (the result, tasks.lib.xcoms.Screened, as JSON).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ConfigDict, Field
from tqdm import tqdm

from tasks.lib import cli, tracking, xcoms
from tasks.lib.backends import ScreeningPlacement
from tasks.lib.config import load_section
from tasks.lib.errors import InputError, ScreeningError
from tasks.lib.files import atomic_dir, jsonable, path_digest, write_json
from tasks.lib.metrics import binary_metrics, slice_metrics
from tasks.lib.outputs import completed, fingerprint
from tasks.lib.remote_outputs import RemoteOutput, is_remote
from tasks.lib.scoring import DEFAULT_MODEL, ModelVersion, Scorer, load_scorer, resolve_version
from tasks.lib.tiles import INDEX_FILE, MANIFEST_FILE, METADATA_FILE, RGB_CHANNELS, PatchReader
from tasks.lib.tiles import channels as held_channels

log = logging.getLogger(__name__)

SCORES_FILE = "scores.parquet"
CLEAR_FILE = "clear.parquet"
AGREEMENT_FILE = "agreement.parquet"
SUMMARY_FILE = "summary.json"
OUTPUT_FILES = (SCORES_FILE, CLEAR_FILE, AGREEMENT_FILE)  # summary.json, written last, names them complete
PARQUET_METADATA_KEY = b"cloudscreen"
KIND_SCREENING = "screening"  # the cloudscreen.kind tag of a screening run
AGREEMENT_METRICS = ("patches", "positives", "precision", "recall", "f1", "accuracy", "tp", "fp", "fn", "tn")


class ScreenParams(ScreeningPlacement):
    """The `screen` section: what the screening computes, and (ScreeningPlacement) where the DAG runs it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    batch_size: int = Field(gt=0)
    slice_columns: list[str]
    experiment: str = Field(min_length=1)

    def computed(self) -> dict[str, Any]:
        """The params the screening depends on: what the fingerprint, summary.json and the MLflow run record. Where it
        ran is left out, so the same screening is found whichever backend wrote it."""
        return self.model_dump(mode="json", exclude=_WHERE)

    def computed_json(self) -> str:
        """`computed()` as the fingerprint hashes it (pydantic's compact JSON, as before `backend` and `store`)."""
        return self.model_dump_json(exclude=_WHERE)


_WHERE = set(ScreeningPlacement.model_fields)


@dataclass(frozen=True)
class ScreenResult:
    out: Path | str  # OUT/<version>: a directory, or gs://…/<version> in the object store
    summary: dict[str, Any]
    skipped: bool  # an earlier screening of these tiles by this version was reused

    def xcom(self, *, snapshot: str, data_version: str) -> xcoms.Screened:
        """What the DAG's screen task returns (and a pod writes with --xcom-out)."""
        s = self.summary
        return xcoms.Screened(
            snapshot=snapshot,
            data_version=data_version,
            version=s["model"]["version"],
            out=str(self.out),
            patches=s["patches"],
            clear=s["clear"],
            cloud_fraction=s["cloud_fraction"],
            agreement_precision=jsonable(s["agreement"]["precision"]),
            agreement_recall=jsonable(s["agreement"]["recall"]),
            patches_per_second=s["patches_per_second"],
            mlflow_run_id=s["mlflow_run_id"],
            skipped=self.skipped,
        )


# --- reading the snapshot -----------------------------------------------------------------------------------------


def _patch_table(tiles: Path, slice_columns: list[str]) -> pd.DataFrame:
    """index.parquet joined with the metadata screening reports: one row per patch, in shard and offset order."""
    try:
        index = pd.read_parquet(tiles / INDEX_FILE, columns=["patch_id", "shard", "offset"])
        metadata = pd.read_parquet(tiles / METADATA_FILE)
    except (OSError, ValueError) as exc:
        raise ScreeningError(f"{tiles}: not a readable tiles directory ({exc})") from exc
    wanted = ["patch_id", "cloud", *slice_columns]
    missing = [c for c in wanted if c not in metadata.columns]
    if missing:
        raise ScreeningError(f"{tiles / METADATA_FILE}: lacks the column(s) {', '.join(missing)}")
    table = index.merge(metadata[wanted], on="patch_id", how="left", validate="one_to_one", indicator=True)
    orphans = table.loc[table.pop("_merge") != "both", "patch_id"]
    if len(orphans):
        raise ScreeningError(
            f"{tiles / METADATA_FILE}: no row for {len(orphans)} indexed patch(es), e.g. {orphans.iloc[0]}"
        )
    return table.sort_values(["shard", "offset"], kind="stable").reset_index(drop=True)


def _rgb_positions(tiles: Path) -> list[int] | None:
    """Where R, G, B sit among the shards' channels; None when the shards hold exactly R, G, B."""
    try:
        channels = held_channels(tiles)
    except InputError as exc:
        raise ScreeningError(str(exc)) from exc
    if channels == list(RGB_CHANNELS):
        return None
    missing = [band for band in RGB_CHANNELS if band not in channels]
    if missing:
        raise ScreeningError(f"{tiles / MANIFEST_FILE}: the shards lack the classifier's band(s) {', '.join(missing)}")
    return [channels.index(band) for band in RGB_CHANNELS]


def _batches(
    tiles: Path, table: pd.DataFrame, batch_size: int, rgb: list[int] | None
) -> Iterator[tuple[slice, np.ndarray]]:
    """(rows, patches) a batch at a time, never crossing a shard; only one batch is held in memory.

    Each shard gets a reader of its own, dropped when its batches are done: a memory map kept open keeps every page
    read through it in the process's resident memory, which would grow with the snapshot.
    """
    shards = table["shard"].to_numpy(dtype=object)
    offsets = table["offset"].to_numpy(dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]]) if len(table) else np.array([], dtype=np.int64)
    ends = np.r_[starts[1:], len(table)]
    for start, end in zip(starts, ends, strict=True):
        reader = PatchReader(tiles)
        for lo in range(int(start), int(end), batch_size):
            rows = slice(lo, min(lo + batch_size, int(end)))
            try:
                patches = reader.gather(shards[rows], offsets[rows])
            except InputError as exc:
                raise ScreeningError(str(exc)) from exc
            yield rows, (patches if rgb is None else np.ascontiguousarray(patches[..., rgb]))


# --- scoring: here or on a Dask cluster ---------------------------------------------------------------------------


def _score_here(
    tiles: Path, table: pd.DataFrame, version: ModelVersion, params: ScreenParams, rgb: list[int] | None
) -> np.ndarray:
    scorer = load_scorer(version, params.device)
    scores = np.empty(len(table), dtype=np.float32)
    with tqdm(total=len(table), unit="patch", desc=f"screen v{version.version}", disable=None) as bar:
        for rows, patches in _batches(tiles, table, params.batch_size, rgb):
            scores[rows] = _checked(scorer(patches), len(patches), version)
            bar.update(len(patches))
    return scores


_WORKER_SCORERS: dict[str, Scorer] = {}  # per Dask worker process: each version's model, loaded once


def _score_shard(
    tiles: str, part: pd.DataFrame, version: ModelVersion, params: ScreenParams, rgb: list[int] | None
) -> Any:
    """On a Dask worker: the scores of one shard's rows."""
    scorer = _WORKER_SCORERS.get(version.uri)
    if scorer is None:
        scorer = _WORKER_SCORERS[version.uri] = load_scorer(version, params.device)
    out = np.empty(len(part), dtype=np.float32)
    for rows, patches in _batches(Path(tiles), part.reset_index(drop=True), params.batch_size, rgb):
        out[rows] = _checked(scorer(patches), len(patches), version)
    return out


def _score_on_cluster(
    address: str, tiles: Path, table: pd.DataFrame, version: ModelVersion, params: ScreenParams, rgb: list[int] | None
) -> np.ndarray:
    from distributed import Client, as_completed

    log.info("scoring on the Dask cluster at %s", address)
    scores = np.empty(len(table), dtype=np.float32)
    groups = table.groupby("shard", sort=False).indices  # shard → row positions (the table is in shard order)
    with Client(address) as client:
        futures = {
            client.submit(_score_shard, str(tiles), table.iloc[rows], version, params, rgb, pure=False): rows
            for rows in groups.values()
        }
        with tqdm(total=len(table), unit="patch", desc=f"screen v{version.version}", disable=None) as bar:
            for future in as_completed(futures):
                rows = futures[future]
                scores[rows] = future.result()
                bar.update(len(rows))
    return scores


def _checked(scores: np.ndarray, n: int, version: ModelVersion) -> np.ndarray:
    if scores.shape != (n,) or not np.all((scores >= 0) & (scores <= 1)):
        raise ScreeningError(
            f"{version.uri} returned {scores.shape} scores for {n} patches, or scores outside [0, 1]: it breaks the "
            "model contract (one probability per patch)"
        )
    return scores


# --- the outputs ----------------------------------------------------------------------------------------------------


def _fractions(frame: pd.DataFrame, columns: list[str]) -> dict[str, dict[str, float]]:
    return {
        column: {str(k): float(v) for k, v in frame.groupby(frame[column].astype(str))["is_cloud"].mean().items()}
        for column in columns
    }


def _agreement(frame: pd.DataFrame, threshold: float, columns: list[str]) -> tuple[dict[str, float], pd.DataFrame]:
    labelled = frame.assign(label=frame["cloud"].astype(int), score=frame["cloud_probability"])
    overall = binary_metrics(labelled["label"].to_numpy(), labelled["score"].to_numpy(), threshold)
    table = slice_metrics(labelled, threshold, columns)
    everything = pd.DataFrame([{"column": "all", "value": "all", **overall}])
    return {k: float(overall[k]) for k in AGREEMENT_METRICS}, pd.concat([everything, table], ignore_index=True)


def _write_scores(path: Path, frame: pd.DataFrame, about: dict[str, Any]) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    metadata = {**(table.schema.metadata or {}), PARQUET_METADATA_KEY: json.dumps(about).encode()}
    pq.write_table(table.replace_schema_metadata(metadata), path)


def read_scores_metadata(path: Path) -> dict[str, Any]:
    """What scores.parquet says about its model and data (the `cloudscreen` key of the file's metadata)."""
    return json.loads(pq.read_schema(path).metadata[PARQUET_METADATA_KEY])


def screen(
    *,
    tiles: Path,
    out: Path | str,
    params: ScreenParams,
    model: str = DEFAULT_MODEL,
    lineage: tracking.Lineage | None = None,
) -> ScreenResult:
    """Score every patch of `tiles` with the version `model` names and write OUT/<version>/ (see the module docstring).

    Args:
        out: the snapshot's screening directory, or a `gs://BUCKET/PREFIX` URL: the screening is then written to a
            temporary directory and uploaded to PREFIX/<version>/, summary.json last.

    Raises:
        ModelVersionError: the model names no registered version with an operating threshold, or cannot be loaded.
        ScreeningError: the tiles are missing or unreadable, the model breaks its contract, or OUT/<version> holds
            another model's screening.
    """
    lineage = lineage or tracking.Lineage.from_environment()
    version = resolve_version(model)
    try:
        inputs = [path_digest(tiles / name, "sha256") for name in (INDEX_FILE, METADATA_FILE, MANIFEST_FILE)]
    except OSError as exc:
        raise ScreeningError(f"{tiles}: not a tiles directory ({exc})") from exc
    key = fingerprint(*inputs, version.name, version.version, repr(version.threshold), params.computed_json())
    what = f"screening by {version.uri}"

    if is_remote(out):
        store = RemoteOutput(f"{str(out).rstrip('/')}/{version.version}")
        if done := store.completed(SUMMARY_FILE, key, requires=OUTPUT_FILES, what=what):
            return ScreenResult(store.url, done, skipped=True)
        _check_same_model(store.read_record(SUMMARY_FILE), version, store.url)
        with tempfile.TemporaryDirectory(prefix="cloudscreen-screen-") as scratch:
            summary = _screen(tiles, Path(scratch) / version.version, params, version, lineage, key, publish=store)
        return ScreenResult(store.url, summary, skipped=False)

    target = Path(out) / version.version
    if done := completed(target / SUMMARY_FILE, key, requires=[target / name for name in OUTPUT_FILES], what=what):
        return ScreenResult(target, done, skipped=True)
    _check_same_model(_read_summary(target / SUMMARY_FILE), version, str(target))
    return ScreenResult(target, _screen(tiles, target, params, version, lineage, key), skipped=False)


def _read_summary(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _check_same_model(earlier: dict[str, Any] | None, version: ModelVersion, where: str) -> None:
    """A directory holds one registered model's screenings: refuse to replace another model's."""
    name = (earlier or {}).get("model", {}).get("name")
    if name not in (None, version.name):
        raise ScreeningError(
            f"{where} holds a screening by model {name!r}, not {version.name!r}: screen into another --out"
        )


def _screen(
    tiles: Path,
    target: Path,
    params: ScreenParams,
    version: ModelVersion,
    lineage: tracking.Lineage,
    key: str,
    publish: RemoteOutput | None = None,
) -> dict[str, Any]:
    """Score, write `target` whole, log the MLflow run, and upload `target` to `publish` within that run (a failed
    upload fails the run); the summary."""
    import mlflow

    table = _patch_table(tiles, params.slice_columns)
    rgb = _rgb_positions(tiles)
    log.info("screening %d patches of %s with %s (threshold %.4f)", len(table), tiles, version.uri, version.threshold)
    about = {"model": version.to_json(), "snapshot": lineage.snapshot, "data_version": lineage.data_version}
    computed = params.computed()
    with mlflow.start_run(
        experiment_id=tracking.experiment_id(params.experiment),
        run_name=f"screen {lineage.snapshot or tiles.name} v{version.version}",
        tags={**lineage.tags(), tracking.TAG_KIND: KIND_SCREENING},
    ) as run:
        mlflow.log_params(
            {
                "model_name": version.name,
                "model_version": version.version,
                "model_uri": version.asked,
                "operating_threshold": version.threshold,
                "tiles": str(tiles),
                **computed,
            }
        )
        started = time.perf_counter()
        address = os.environ.get("DASK_SCHEDULER_ADDRESS")
        scores = (
            _score_on_cluster(address, tiles, table, version, params, rgb)
            if address
            else _score_here(tiles, table, version, params, rgb)
        )
        seconds = time.perf_counter() - started
        frame = table[["patch_id", *params.slice_columns, "cloud"]].assign(
            cloud_probability=scores, is_cloud=scores >= version.threshold
        )
        agreement, agreement_table = _agreement(frame, version.threshold, params.slice_columns)
        summary = {
            "patches": len(frame),
            "cloud": int(frame["is_cloud"].sum()),
            "clear": int((~frame["is_cloud"]).sum()),
            "cloud_fraction": float(frame["is_cloud"].mean()) if len(frame) else 0.0,
            "cloud_fraction_by": _fractions(frame, params.slice_columns),
            "agreement": agreement,
            "patches_per_second": len(frame) / seconds if seconds > 0 else 0.0,
            "seconds": seconds,
            "workers": "dask" if address else "local",
            **about,
            "tiles": str(tiles),
            "mlflow_run_id": run.info.run_id,
            "params": computed,
            "input": {"fingerprint": key},
        }
        with atomic_dir(target) as tmp:
            _write_scores(
                tmp / SCORES_FILE,
                frame[["patch_id", "cloud_probability", "is_cloud", *params.slice_columns]],
                {**about, "threshold": version.threshold},
            )
            frame.loc[~frame["is_cloud"], ["patch_id"]].to_parquet(tmp / CLEAR_FILE, index=False)
            agreement_table.to_parquet(tmp / AGREEMENT_FILE, index=False)
            write_json(tmp / SUMMARY_FILE, jsonable(summary))
        mlflow.log_metrics(
            {
                "patches": summary["patches"],
                "cloud_fraction": summary["cloud_fraction"],
                "patches_per_second": summary["patches_per_second"],
                **{f"agreement_{k}": v for k, v in agreement.items() if np.isfinite(v)},
            }
        )
        mlflow.log_artifact(str(target / SUMMARY_FILE))
        mlflow.log_artifact(str(target / AGREEMENT_FILE))
        if publish is not None:
            publish.upload(target, record=SUMMARY_FILE)
    log.info(
        "screened %d patches: %d clear, cloud fraction %.3f; against the official cloud list precision %.3f recall "
        "%.3f; %.1f patches/s; %s",
        summary["patches"],
        summary["clear"],
        summary["cloud_fraction"],
        agreement["precision"],
        agreement["recall"],
        summary["patches_per_second"],
        publish.url if publish is not None else target,
    )
    return summary


def _location(value: str) -> Path | str:
    """--out: a local directory, or a gs:// URL kept as given (a Path would fold its //)."""
    return value if is_remote(value) else Path(value)


def main() -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--tiles",
        type=Path,
        required=True,
        help="the tile step's output directory of one snapshot (with --restore-data: relative to DIR/data)",
    )
    p.add_argument(
        "--out",
        type=_location,
        required=True,
        help="the snapshot's screening directory, or gs://BUCKET/PREFIX (written locally, then uploaded, summary.json "
        "last); writes OUT/<version>/",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a registered version (default: {DEFAULT_MODEL})")
    p.add_argument("--snapshot", help="lineage: the snapshot screened (default: $CLOUDSCREEN_SNAPSHOT)")
    p.add_argument("--data-version", help="lineage: its DVC data version (default: $CLOUDSCREEN_DATA_VERSION)")
    p.add_argument(
        "--restore-data",
        type=Path,
        metavar="DIR",
        help="first restore --data-version from the DVC remote into DIR/data; --tiles is then relative to it (how a "
        "pod, away from the pipeline's files, gets the snapshot)",
    )
    p.add_argument(
        "--xcom-out",
        type=Path,
        metavar="FILE",
        help="write the result (snapshot, version, out, counts, MLflow run) as JSON here (KPO: /airflow/xcom/"
        "return.json)",
    )
    args = p.parse_args()
    cli.configure_logging(args.verbose)
    params = load_section("screen", ScreenParams, args.params, args.overrides)
    lineage = tracking.Lineage.from_environment(snapshot=args.snapshot, data_version=args.data_version)
    tiles = args.tiles
    if args.restore_data:
        from tasks.versioning import VersioningParams, restore_into

        versioning = load_section("versioning", VersioningParams, args.params, args.overrides)
        tiles = restore_into(args.restore_data, version=args.data_version, params=versioning) / tiles
    with cli.stdout_to_stderr():
        result = screen(tiles=tiles, out=args.out, params=params, model=args.model, lineage=lineage)
    if args.xcom_out:
        write_json(args.xcom_out, result.xcom(snapshot=lineage.snapshot, data_version=lineage.data_version))
    print(json.dumps(jsonable(result.summary), indent=2))


if __name__ == "__main__":
    cli.run(main)
