"""The pipeline around the steps: snapshot keys, where each snapshot's files go, and one function per DAG task.

The Airflow DAGs (dags/) are wiring; what their tasks do is here, in plain Python that tests call without Airflow.
Every run works on one snapshot, its partition key (see `snapshot_key`): scheduled and backfill runs use their
logical date, manual and asset-triggered runs their run id. A step reads the previous step's output for that snapshot
and writes its own under `data_root`:

    raw/<snapshot>/  validated/<snapshot>/  tiles/<snapshot>/  samples/<snapshot>/<set>/  versions/<snapshot>/
    ingested/<snapshot>/{validated,tiles}/  the same, when the refresh streams the archive (pipeline.ingest: stream)
    snapshots/<snapshot>.json   the refresh's record: data version, manifests, tiles (what training is pinned to)
    screened/<snapshot>/<version>/  the snapshot screened by one model version (tasks.screen)
    monitored/<snapshot>/<version>/ the snapshot against that version's training data (tasks.monitor)
    checkpoints/<run>/          the trainer's resumable state for one training DAG run

so concurrent backfills never touch each other's files, and a re-run finds its completed steps and skips them (each
step's own idempotency). Each function returns a JSON-able dict, the task's XCom, shaped as tasks.lib.xcoms declares.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import Field

from tasks.lib import xcoms
from tasks.lib.config import StepParams, default_params, load_section
from tasks.lib.errors import ConfigError, PipelineError
from tasks.lib.files import jsonable, write_json

if TYPE_CHECKING:  # imported where used: a DAG file that parses this module needs neither
    from tasks.lib.backends import BackendsParams, TrainingRequest

log = logging.getLogger(__name__)

DATA_ROOT_ENV = "CLOUDSCREEN_DATA_ROOT"
# The Asset the refresh DAG updates and the training DAG is scheduled on: the versioned training data.
TRAINING_DATA_ASSET = {"name": "cloudscreen_training_data", "uri": "cloudscreen://training-data"}
# The Asset the gate (on a promotion) and a rollback update, and the screening DAG is scheduled on: the champion.
CHAMPION_ASSET = {"name": "cloudscreen_champion", "uri": "cloudscreen://champion"}
# The Asset the monitoring updates on a drift or decay verdict: a request to retrain (pipeline.retrain_on: drift).
DRIFT_ASSET = {"name": "cloudscreen_drift", "uri": "cloudscreen://drift"}
RETRAIN_ON = ("every_snapshot", "drift")
TAG_TRIGGER = "cloudscreen.trigger"  # on a training run: new_data, drift, schedule or manual
TAG_TRIGGER_REASONS = "cloudscreen.trigger.reasons"
TAG_SEARCH_RUN = "cloudscreen.search_run_id"  # on a training run: the search that chose its learning rate, optimizer
BACKENDS = ("local", "docker", "kubernetes")
INGEST_PATHS = ("extract", "stream")  # pipeline.ingest: the refresh DAG's two ways from archive to tiles
SNAPSHOTS_DIR = "snapshots"
_UNSAFE = re.compile(r"[^A-Za-z0-9._:+-]")  # what tasks.versioning accepts in a snapshot name

P = TypeVar("P", bound=StepParams)


class AlertParams(StepParams):
    to: list[str]
    smtp_conn_id: str
    from_email: str


class PipelineParams(StepParams):
    data_root: Path
    source: str
    checksum_url: str | None = None
    ingest: Literal[INGEST_PATHS]
    dataset: Literal["small", "large"]
    training_backend: Literal["local", "docker", "kubernetes"]
    start_date: dt.date
    refresh_schedule: str
    retrain_schedule: str
    max_active_runs: int = Field(ge=1)
    retries: int = Field(ge=0)
    retry_delay_seconds: float = Field(gt=0)
    retry_exponential_backoff: float = Field(ge=1)
    max_retry_delay_seconds: float = Field(gt=0)
    gpu_pool: str
    gpu_pool_slots: int = Field(ge=1)
    retrain_on: Literal["every_snapshot", "drift"]
    timeout_minutes: dict[Literal["io", "tile", "train", "evaluate"], float]
    mlflow_ui_url: str | None = None
    alerts: AlertParams


def snapshot_key(*, run_type: str, logical_date: dt.datetime | None, run_id: str) -> str:
    """The partition key of one DAG run.

    Scheduled and backfill runs use their logical date (YYYY-MM-DD; with the time when the schedule is finer than a
    day), so re-running an interval finds that interval's files. Manual and asset-triggered runs have no interval of
    their own (asset-triggered ones have no logical date at all): they use the run id, made safe as a directory name.
    """
    if run_type in ("scheduled", "backfill") and logical_date is not None:
        if (logical_date.hour, logical_date.minute, logical_date.second) == (0, 0, 0):
            return logical_date.strftime("%Y-%m-%d")
        return logical_date.strftime("%Y-%m-%dT%H-%M-%S")
    key = _UNSAFE.sub("-", run_id).lstrip("._:+-")
    if not key:
        raise PipelineError(f"run id {run_id!r} gives no usable snapshot name")
    return key


@dataclass(frozen=True)
class Run:
    """One pipeline run: its snapshot, the params file and this run's overrides (from the DAG's trigger form)."""

    snapshot: str
    params_path: Path = field(default_factory=default_params)
    overrides: tuple[str, ...] = ()
    data_root: Path = field(default=None)  # type: ignore[assignment]  # None: from params / $CLOUDSCREEN_DATA_ROOT

    def __post_init__(self) -> None:
        if self.data_root is None:
            object.__setattr__(self, "data_root", resolve_data_root(self.load("pipeline", PipelineParams), self))

    def load(self, section: str, model: type[P]) -> P:
        return load_section(section, model, self.params_path, self.overrides)

    def dir(self, stage: str) -> Path:
        return self.data_root / stage / self.snapshot

    @property
    def record_path(self) -> Path:
        return self.data_root / SNAPSHOTS_DIR / f"{self.snapshot}.json"


def run_for(
    *,
    run_type: str,
    logical_date: dt.datetime | None,
    run_id: str,
    overrides: Iterable[str] = (),
    snapshot: str | None = None,
) -> Run:
    """The Run of one DAG run (its type, logical date and id as Airflow gives them) with the form's overrides; a
    snapshot named in the form replaces the run's own key (re-processing a named snapshot, the demo's `demo`)."""
    if snapshot:
        if _UNSAFE.search(snapshot) or not snapshot[0].isalnum():
            raise PipelineError(
                f"snapshot {snapshot!r}: use letters, digits and . _ : + - (starting with one of the first two)"
            )
    else:
        snapshot = snapshot_key(run_type=run_type, logical_date=logical_date, run_id=run_id)
    return Run(snapshot=snapshot, overrides=tuple(overrides))


def task_defaults(params: PipelineParams, *, io: bool, timeout: str) -> dict[str, Any]:
    """Retry and timeout arguments of a task: I/O tasks retry with exponential backoff; compute retries once."""
    if not io:
        return {"retries": 1, "execution_timeout": dt.timedelta(minutes=params.timeout_minutes[timeout])}
    return {
        "retries": params.retries,
        "retry_delay": dt.timedelta(seconds=params.retry_delay_seconds),
        "retry_exponential_backoff": params.retry_exponential_backoff,
        "max_retry_delay": dt.timedelta(seconds=params.max_retry_delay_seconds),
        "execution_timeout": dt.timedelta(minutes=params.timeout_minutes[timeout]),
    }


def start_datetime(params: PipelineParams) -> dt.datetime:
    return dt.datetime.combine(params.start_date, dt.time(), tzinfo=dt.UTC)


def load_pipeline_params() -> PipelineParams:
    """The pipeline section, as the DAG files read it when they are parsed."""
    return load_section("pipeline", PipelineParams)


def resolve_data_root(params: PipelineParams, run: Run | None = None) -> Path:
    """$CLOUDSCREEN_DATA_ROOT, else pipeline.data_root; a relative path is relative to the params file's folder."""
    root = Path(os.environ.get(DATA_ROOT_ENV) or params.data_root)
    base = (run.params_path if run else default_params()).resolve().parent
    return root if root.is_absolute() else base / root


# --- refresh: download → validate → tile → sample → version -------------------------------------------------------


def _archive_request(run: Run, source: str | None, checksum_url: str | None) -> tuple[str, Any, Any]:
    """(URL, checksum, download params) of the snapshot's archive. `source` is a download.sources name or a URL;
    `{snapshot}` in a URL (or in the checksum URL) becomes the snapshot key, so each interval can fetch its own."""
    from tasks.download import DownloadParams, resolve_request

    pipeline = run.load("pipeline", PipelineParams)
    params = run.load("download", DownloadParams)
    source = (source or pipeline.source).replace("{snapshot}", run.snapshot)
    named = source in params.sources  # a named source brings its own checksum
    if not named:
        checksum_url = (checksum_url or pipeline.checksum_url or "").replace("{snapshot}", run.snapshot) or None
    url, checksum = resolve_request(
        url=None if named else source,
        source=source if named else None,
        checksum_url=None if named else checksum_url,
        params=params,
    )
    return url, checksum, params


def download_step(run: Run, *, source: str | None = None, checksum_url: str | None = None) -> xcoms.Fetched:
    """Download the snapshot's archive (see `_archive_request` for `source`) and extract it."""
    from tasks.download import download

    url, checksum, params = _archive_request(run, source, checksum_url)
    fetched = download(url=url, dest=run.dir("raw"), checksum=checksum, params=params)
    return xcoms.Fetched(url=url, patches=str(fetched.root), archive=str(fetched.archive), skipped=fetched.skipped)


def ingest_step(run: Run, *, source: str | None = None, checksum_url: str | None = None) -> xcoms.Ingested:
    """Stream the snapshot's archive once into validated/ and tiles/ (tasks.ingest): what download → validate → tile
    write, without extracting it; fail (naming the report) when more than the allowed share is quarantined."""
    from tasks.ingest import IngestParams, ingest
    from tasks.tile import TileParams
    from tasks.validate import DATA_DOCS_INDEX, REPORT_FILE, ValidateParams

    url, checksum, params = _archive_request(run, source, checksum_url)
    result = ingest(
        url=url,
        checksum=checksum,
        out=run.dir("ingested"),
        params=run.load("ingest", IngestParams),
        validate_params=run.load("validate", ValidateParams),
        tile_params=run.load("tile", TileParams),
        download_params=params,
    )
    if not result.success or result.tiles is None:
        raise PipelineError(_validation_failure(result.validated / REPORT_FILE, result.report))
    report = result.report
    return xcoms.Ingested(
        url=url,
        report=str(result.validated / REPORT_FILE),
        data_docs=str(result.validated / DATA_DOCS_INDEX),
        checked=report["checked"],
        valid=report["valid"],
        quarantined=len(report["quarantined"]),
        tiles=str(result.tiles),
        patches=result.patches,
        shards=result.shards,
        skipped=result.skipped,
    )


def _validation_failure(report_path: Path, report: dict[str, Any]) -> str:
    return (
        f"{report_path}: validation failed ({len(report['quarantined'])} of {report['checked']} patches "
        f"quarantined; suite {'passed' if report['suite_success'] else 'failed'}); see its Data Docs"
    )


def validate_step(run: Run, *, patches: str) -> xcoms.Validated:
    """Validate the downloaded patches; fail (naming the report) when more than the allowed share is quarantined."""
    from tasks.validate import DATA_DOCS_INDEX, ValidateParams, validate

    result = validate(patches=Path(patches), out=run.dir("validated"), params=run.load("validate", ValidateParams))
    report = result.report
    if not result.success:
        raise PipelineError(_validation_failure(result.report_path, report))
    return xcoms.Validated(
        report=str(result.report_path),
        data_docs=str(result.report_path.parent / DATA_DOCS_INDEX),
        checked=report["checked"],
        valid=report["valid"],
        quarantined=len(report["quarantined"]),
        skipped=result.skipped,
    )


def tile_step(run: Run, *, patches: str, report: str) -> xcoms.Tiled:
    """Tile the valid patches into band shards (quarantined ones left out, as the report says)."""
    from tasks.tile import TileParams, tile

    result = tile(patches=Path(patches), out=run.dir("tiles"), params=run.load("tile", TileParams), report=Path(report))
    return xcoms.Tiled(tiles=str(result.out), patches=result.patches, shards=result.shards, skipped=result.skipped)


def tiles_result(*, extracted: xcoms.Tiled | None, streamed: xcoms.Ingested | None) -> xcoms.Tiled:
    """The snapshot's tiles from whichever ingest path ran (the other was skipped)."""
    if extracted:
        return extracted
    if streamed:
        return xcoms.Tiled(
            tiles=streamed["tiles"], patches=streamed["patches"], shards=streamed["shards"], skipped=streamed["skipped"]
        )
    raise PipelineError("neither the tile task nor the ingest task left tiles: which ingest path ran?")


def sample_step(run: Run, *, tiles: str) -> xcoms.Sampled:
    """Draw every dataset (small, large) with its natural-prevalence set."""
    from tasks.sample import DATASETS, SampleParams, sample

    params = run.load("sample", SampleParams)
    sets = {}
    for name in DATASETS:
        result = sample(tiles=Path(tiles), out=run.dir("samples"), dataset=name, params=params)
        sets[name] = xcoms.SampledSet(
            manifest=str(result.manifest_path),
            patches=result.summary["patches"],
            natural_patches=result.summary["natural"]["patches"],
            natural_prevalence=result.summary["natural"]["prevalence"],
            skipped=result.skipped,
        )
    return xcoms.Sampled(samples=str(run.dir("samples")), sets=sets)


def version_step(run: Run, *, tiles: str, samples: xcoms.Sampled, as_of: dt.datetime) -> xcoms.SnapshotRecord:
    """Push the snapshot's tiles and samples to the DVC remote and write the snapshot record training is pinned to.

    `as_of` orders snapshots (the end of the run's data interval, or when a manual run ran): the latest is what a
    retrain with no snapshot named trains on, whatever order backfills finished in.
    """
    from tasks.versioning import VersioningParams, push

    pushed = push(
        snapshot=run.snapshot,
        tiles=Path(tiles),
        samples=Path(samples["samples"]),
        out=run.dir("versions"),
        params=run.load("versioning", VersioningParams),
    )
    record = xcoms.SnapshotRecord(
        snapshot=run.snapshot,
        as_of=as_of.astimezone(dt.UTC).isoformat(),
        data_version=pushed.data.version,
        remote=pushed.remote,
        tiles=tiles,
        manifests={name: s["manifest"] for name, s in samples["sets"].items()},
        version_record=str(pushed.record),
    )
    write_json(run.record_path, record)
    log.info("snapshot %s is data version %s (record %s)", run.snapshot, pushed.data.version, run.record_path)
    return record


# --- training: which data, train, evaluate, gate, summary -------------------------------------------------------


def snapshot_records(data_root: Path) -> list[xcoms.SnapshotRecord]:
    """Every refreshed snapshot's record, oldest first."""
    records = []
    for path in sorted((data_root / SNAPSHOTS_DIR).glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise PipelineError(f"{path}: unreadable snapshot record: {exc}") from exc
    return sorted(records, key=lambda r: (r["as_of"], r["snapshot"]))


def recorded_data(data_root: Path, snapshot: str, dataset: str = "small") -> tuple[Path, Path] | None:
    """(tiles, sample manifest) of a refreshed snapshot where its record says they are (tiles/<snapshot>/, or
    ingested/<snapshot>/tiles/ when the refresh streamed), or None when there is no such record or its files are not
    all there (for benchmarks and tools that read the demo's data)."""
    from tasks.lib.tiles import MANIFEST_FILE as TILES_MANIFEST

    record = next((r for r in snapshot_records(data_root) if r["snapshot"] == snapshot), None)
    if record is None or dataset not in record["manifests"]:
        return None
    tiles, manifest = Path(record["tiles"]), Path(record["manifests"][dataset])
    return (tiles, manifest) if (tiles / TILES_MANIFEST).is_file() and manifest.is_file() else None


def check_training_form(*, force_promote: bool, reason: str | None) -> None:
    """Refuse a forced promotion without a reason before anything trains, not after."""
    if force_promote and not (reason and reason.strip()):
        raise ConfigError("force_promote needs a reason: say why the gate's rules are overridden (it is recorded)")
    if reason and not force_promote:
        raise ConfigError("a reason is only for a forced promotion: tick force_promote, or leave the reason empty")


def event_extras(triggering: Mapping[Any, Iterable[Any]] | None) -> list[dict[str, Any]]:
    """The `extra` of every Asset event that triggered a DAG run (Airflow's `triggering_asset_events`: asset → its
    events), in one list: what the refresh, the gate and the monitoring put there."""
    return [dict(event.extra or {}) for events in (triggering or {}).values() for event in events]


def training_trigger(*, run_type: str, events: Iterable[Mapping[str, Any]] = ()) -> tuple[str, str]:
    """Why a training run trains, for its MLflow run: (kind, in words). A drift event carries the monitoring's
    decision and reasons; a refresh event its snapshot."""
    events = list(events)
    drifted = [e for e in events if e.get("decision") in ("drift", "decay")]
    if drifted:
        return "drift", "\n".join(
            f"snapshot {e.get('snapshot')}: {e['decision']}: " + "; ".join(e.get("reasons") or []) for e in drifted
        )
    if events:
        return "new_data", "new snapshot(s): " + ", ".join(sorted({str(e.get("snapshot")) for e in events}))
    if run_type == "scheduled":
        return "schedule", "the periodic retrain (pipeline.retrain_schedule)"
    return "manual", f"triggered by a person ({run_type} run)"


def record_trigger(run_id: str, data: xcoms.TrainingData, plan: xcoms.TrainingPlan | None = None) -> None:
    """Tag the training run with why it trained (TAG_TRIGGER, TAG_TRIGGER_REASONS), whichever backend trained it,
    and with the search that chose its learning rate and optimizer, when one did (TAG_SEARCH_RUN)."""
    import mlflow

    client = mlflow.MlflowClient()
    if "trigger" in data:
        client.set_tag(run_id, TAG_TRIGGER, data["trigger"])
        client.set_tag(run_id, TAG_TRIGGER_REASONS, data.get("trigger_reasons", "")[:5000])
    if plan and "search" in plan:
        client.set_tag(run_id, TAG_SEARCH_RUN, plan["search"]["run_id"])


def training_data(
    run: Run, *, snapshot: str | None = None, events: Iterable[Mapping[str, Any]] = (), dataset: str | None = None
) -> xcoms.TrainingData:
    """The snapshot a training run trains on, pinned to its data version.

    In order: the snapshot named in the trigger form; else the newest snapshot among the asset events that triggered
    the run (the refreshes that just finished); else the newest refreshed snapshot (a periodic retrain). When the
    snapshot's files are gone from the data root (another worker, a clean-up), its data version is restored from the
    DVC remote, so a run can always be reproduced from its record.
    """
    dataset = dataset or run.load("pipeline", PipelineParams).dataset
    records = {r["snapshot"]: r for r in snapshot_records(run.data_root)}
    if snapshot:
        if snapshot not in records:
            known = ", ".join(sorted(records)) or "none yet"
            raise PipelineError(
                f"snapshot {snapshot!r}: no record {run.data_root / SNAPSHOTS_DIR / (snapshot + '.json')} "
                f"(refreshed snapshots: {known})"
            )
        record = records[snapshot]
    else:
        triggered = sorted((e for e in events if e.get("snapshot") in records), key=lambda e: e.get("as_of", ""))
        if triggered:
            record = records[triggered[-1]["snapshot"]]
        elif records:
            record = max(records.values(), key=lambda r: (r["as_of"], r["snapshot"]))
        else:
            raise PipelineError(
                f"no refreshed snapshot under {run.data_root / SNAPSHOTS_DIR}: run the cloudscreen_refresh DAG first"
            )
    if dataset not in record["manifests"]:
        raise PipelineError(f"snapshot {record['snapshot']}: no {dataset!r} set (has {sorted(record['manifests'])})")
    manifest, tiles = Path(record["manifests"][dataset]), Path(record["tiles"])
    if not (manifest.is_file() and tiles.is_dir()):
        manifest, tiles = _restore(run, record, dataset)
    return xcoms.TrainingData(
        snapshot=record["snapshot"],
        data_version=record["data_version"],
        dataset=dataset,
        manifest=str(manifest),
        tiles=str(tiles),
    )


def _restore(run: Run, record: xcoms.SnapshotRecord, dataset: str) -> tuple[Path, Path]:
    from tasks.versioning import SAMPLES_DIR, TILES_DIR

    dest = _restored(run, record)
    return dest / SAMPLES_DIR / dataset / "manifest.parquet", dest / TILES_DIR


def _restored(run: Run, record: xcoms.SnapshotRecord) -> Path:
    """The snapshot's data version restored from the DVC remote (once) under <data root>/restored/<version>/."""
    from tasks.versioning import TILES_DIR, VersioningParams, restore

    dest = run.data_root / "restored" / record["data_version"]
    if not (dest / TILES_DIR).is_dir():
        log.info("snapshot %s's files are gone; restoring data version %s", record["snapshot"], record["data_version"])
        restore(version=record["data_version"], dest=dest, params=run.load("versioning", VersioningParams))
    return dest


def training_overrides(
    *,
    epochs: int | None = None,
    learning_rate: float | None = None,
    budget_minutes: float | None = None,
    budget_usd: float | None = None,
    extra: Iterable[str] = (),
) -> tuple[str, ...]:
    """The trigger form's training fields as `section.key=value` overrides (extra ones last, so they win)."""
    overrides = []
    if epochs is not None:
        overrides.append(f"train.epochs={int(epochs)}")
    if learning_rate is not None:
        overrides.append(f"train.learning_rate={float(learning_rate)!r}")
    if budget_minutes is not None:
        overrides.append(f"train.budget_minutes={float(budget_minutes)!r}")
    if budget_usd is not None:
        overrides.append(f"train.budget_usd={float(budget_usd)!r}")
    for item in extra:
        if "=" not in item or "." not in item.partition("=")[0]:
            raise ConfigError(f"override {item!r}: expected SECTION.KEY=VALUE")
        overrides.append(item)
    return tuple(overrides)


def plan_training(
    run: Run, *, data: xcoms.TrainingData, dag_id: str | None = None, dag_run_id: str | None = None
) -> xcoms.TrainingPlan:
    """What every backend trains: the pinned data, this run's overrides, the checkpoints (on the worker's disk for
    the local backend, in the object store for the image backends: `backends.checkpoints`/<dag_id>/<dag_run_id>), the
    lineage; and the trainer image's arguments for the Kubernetes backend (its operator takes them from this task's
    result)."""
    from tasks.lib.backends import BackendsParams, TrainingRequest

    backends = run.load("backends", BackendsParams)
    checkpoint_url = None
    if backends.checkpoints:
        parts = (backends.checkpoints.rstrip("/"), dag_id or "cloudscreen", dag_run_id or run.snapshot)
        checkpoint_url = "/".join(parts)
    request = TrainingRequest(
        snapshot=data["snapshot"],
        data_version=data["data_version"],
        dataset=data["dataset"],
        manifest=Path(data["manifest"]),
        tiles=Path(data["tiles"]),
        overrides=run.overrides,
        # One per training DAG run: a retried task resumes its epochs; another run trains afresh.
        checkpoint_dir=run.dir("checkpoints"),
        checkpoint_url=checkpoint_url,
        dag_id=dag_id,
        dag_run_id=dag_run_id,
    )
    return _plan(request, backends)


def _plan(
    request: TrainingRequest, backends: BackendsParams, search: xcoms.Searched | None = None
) -> xcoms.TrainingPlan:
    from tasks.lib.backends import POD_XCOM_FILE

    plan = xcoms.TrainingPlan(
        request=request.to_json(),
        kubernetes_arguments=request.remote_arguments(backends.kubernetes.data_dir, POD_XCOM_FILE),
    )
    if search is not None:
        plan["search"] = search
    return plan


def search_step(run: Run, *, plan: xcoms.TrainingPlan) -> xcoms.TrainingPlan:
    """The training form's search mode: tasks.search on the plan's data with this run's overrides (the `search`
    section: trials, space, epochs per trial), as a subprocess of the worker with its log streamed here; its trials
    are nested MLflow runs under one parent. The plan comes back with the best trial's learning rate and optimizer
    as its last overrides (so they win over the form's), for every backend: the full training that follows is
    registered and gated like any challenger.

    Raises:
        TrainingBackendError: the search failed (transient: a retry searches again).
        ConfigError: none of its trials completed (every learning rate of the space diverged): nothing to train with.
    """
    from dataclasses import replace

    from tasks.lib.backends import BackendsParams, TrainingRequest, run_search_local

    request = TrainingRequest.from_json(dict(plan["request"]))
    found = run_search_local(request, params_path=run.params_path)
    if not found.get("best_params"):
        raise ConfigError(
            f"search run {found['run_id']}: no trial completed (see its trials), so there is nothing to train; narrow "
            "the search section's learning-rate range"
        )
    best = tuple(f"train.{name}={value!r}" if isinstance(value, float) else f"train.{name}={value}"
                 for name, value in sorted(found["best_params"].items()))  # fmt: skip
    log.info("search run %s: training with %s", found["run_id"], ", ".join(best))
    request = replace(request, overrides=(*request.overrides, *best))
    return _plan(request, run.load("backends", BackendsParams), search=xcoms.Searched(**found))


def train_step(run: Run, *, plan: xcoms.TrainingPlan, backend: str) -> xcoms.Trained:
    """Run the trainer on the local or docker backend (kubernetes runs in its own operator); its result."""
    from tasks.lib.backends import BackendsParams, TrainingRequest, run_docker, run_local

    request = TrainingRequest.from_json(dict(plan["request"]))
    if backend == "local":
        return run_local(request, params_path=run.params_path)
    if backend == "docker":
        return run_docker(request, run.load("backends", BackendsParams).docker)
    raise ConfigError(f"training backend {backend!r}: this step runs local and docker (known: {', '.join(BACKENDS)})")


def evaluate_step(run: Run, *, run_id: str, data: xcoms.TrainingData) -> xcoms.Evaluated:
    """Evaluate the trained model on the snapshot's val, test and natural sets; everything is logged to its run."""
    from tasks.evaluate import EvaluateParams, evaluate
    from tasks.lib import tracking

    result = evaluate(
        model_uri=tracking.run_model_uri(run_id),
        manifest=Path(data["manifest"]),
        tiles=Path(data["tiles"]),
        params=run.load("evaluate", EvaluateParams),
        log_to_run=run_id,
    )
    return xcoms.Evaluated(run_id=run_id, threshold=result.threshold, metrics=jsonable(result.metrics))


def gate_step(run: Run, *, run_id: str, force: bool = False, reason: str | None = None) -> xcoms.GateDecision:
    """Promote the challenger or keep the champion; the verdict, reasons included, is the result."""
    from tasks.gate import gate
    from tasks.lib.gate_rules import GateParams
    from tasks.train import TrainParams

    verdict = gate(
        run_id=run_id,
        params=run.load("gate", GateParams),
        registered_model=run.load("train", TrainParams).registered_model,
        force=force,
        reason=reason or None,
    )
    decision = xcoms.GateDecision(
        decision=verdict.decision,
        promoted=verdict.promoted,
        reasons=list(verdict.reasons),
        challenger_version=verdict.challenger.get("version"),
        champion_version=(verdict.champion or {}).get("version"),
        registry=verdict.registry,
    )
    return {**decision, "alert": gate_alert(run, decision, run_id)}


def rollback_step(run: Run, *, reason: str, by: str | None = None) -> dict[str, Any]:
    """Undo the last promotion (tasks.gate's rollback): `champion` returns to the version it replaced."""
    from tasks.gate import rollback
    from tasks.train import TrainParams

    if not reason.strip():
        raise ConfigError("a rollback needs a reason: say why the champion goes back (it is recorded)")
    done = rollback(registered_model=run.load("train", TrainParams).registered_model, reason=reason, by=by).to_json()
    return {**done, "alert": rollback_alert(done)}


def run_link(tracking_uri: str, run_id: str, ui_url: str | None = None) -> str:
    """Where a person looks at the run: the MLflow UI page for HTTP servers, else how to open it."""
    import mlflow

    base = ui_url or (tracking_uri if tracking_uri.startswith(("http://", "https://")) else None)
    experiment = mlflow.get_run(run_id).info.experiment_id
    if base:
        return f"{base.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
    return f"run {run_id} in experiment {experiment} of {tracking_uri} (`mlflow ui --backend-store-uri {tracking_uri}`)"


def summarize(
    run: Run,
    *,
    data: xcoms.TrainingData,
    trained: xcoms.Trained,
    evaluation: xcoms.Evaluated,
    verdict: xcoms.GateDecision,
    backend: str,
) -> xcoms.TrainingSummary:
    """The training run in a few lines: data, MLflow run, the numbers the gate judged, the verdict and why."""
    import mlflow

    from tasks.lib import tracking

    pipeline = run.load("pipeline", PipelineParams)
    link = run_link(mlflow.get_tracking_uri(), trained["run_id"], pipeline.mlflow_ui_url)
    m = evaluation["metrics"]

    def fmt(name: str) -> str:
        value = m.get(name)
        return "n/a" if value is None else f"{value:.3f}"

    record = mlflow.MlflowClient().get_run(trained["run_id"]).data
    epochs = record.metrics.get("epochs_run")
    stopped_by = record.tags.get(tracking.TAG_STOPPED_BY)
    length = "" if epochs is None else f", {epochs:.0f} epochs" + (f" (stopped by {stopped_by})" if stopped_by else "")
    lines = [
        f"data      snapshot {data['snapshot']} ({data['dataset']} set), data version {data['data_version']}",
        f"trained   run {trained['run_id']} on the {backend} backend{length}; model version "
        f"{trained.get('model_version')}",
        f"mlflow    {link}",
        f"test      recall {fmt('test_op_recall')} at precision {fmt('test_op_precision')} "
        f"(threshold {evaluation['threshold']:.3f}), ROC-AUC {fmt('test_roc_auc')}; "
        f"natural set precision {fmt('natural_op_precision')}",
        f"gate      {verdict['decision']}" + (": " + " ".join(verdict["reasons"]) if verdict["reasons"] else ""),
    ]
    text = "\n".join(lines)
    log.info("training run summary:\n%s", text)
    return xcoms.TrainingSummary(
        text=text,
        mlflow_run=link,
        run_id=trained["run_id"],
        model_version=trained.get("model_version"),
        decision=verdict["decision"],
        reasons=verdict["reasons"],
        snapshot=data["snapshot"],
        data_version=data["data_version"],
    )


# --- screening: which version and snapshots, screen, summary -------------------------------------------------------

WHY_FORM, WHY_DATA, WHY_CHAMPION, WHY_ALL, WHY_NEWEST = "form", "new data", "new champion", "every snapshot", "newest"


def screening_plan(
    run: Run,
    *,
    model: str | None = None,
    snapshot: str | None = None,
    every_snapshot: bool = False,
    events: Iterable[Mapping[str, Any]] = (),
) -> xcoms.ScreeningPlan:
    """Pin the version to screen with and choose the snapshots.

    Snapshots, in order: the one named in the form; every refreshed snapshot (`every_snapshot`: a backfill; those
    already screened by the version are skipped by tasks.screen itself); the snapshots whose refresh triggered the
    run; else the newest (a new champion, or a manual run with an empty form).
    """
    from tasks.lib.scoring import DEFAULT_MODEL, resolve_version

    version = resolve_version(model or DEFAULT_MODEL)
    records = {r["snapshot"]: r for r in snapshot_records(run.data_root)}
    if not records:
        raise PipelineError(
            f"no refreshed snapshot under {run.data_root / SNAPSHOTS_DIR}: run cloudscreen_refresh first"
        )
    events = list(events)
    if snapshot:
        if snapshot not in records:
            raise PipelineError(f"snapshot {snapshot!r}: not refreshed (known: {', '.join(sorted(records))})")
        chosen, why = [snapshot], WHY_FORM
    elif every_snapshot:
        chosen, why = list(records), WHY_ALL
    elif triggered := sorted({e["snapshot"] for e in events if e.get("snapshot") in records}):
        chosen, why = triggered, WHY_DATA
    else:
        newest = max(records.values(), key=lambda r: (r["as_of"], r["snapshot"]))["snapshot"]
        chosen, why = [newest], WHY_CHAMPION if any("version" in e for e in events) else WHY_NEWEST
    log.info("screening %s with %s (%s)", ", ".join(chosen), version.uri, why)
    return xcoms.ScreeningPlan(
        model=version.uri,
        asked=version.asked,
        version=version.version,
        threshold=version.threshold,
        snapshots=chosen,
        why=why,
    )


def model_exists(model: str | None = None) -> bool:
    """Whether the URI (default: the champion) names a registered version at all: before the first promotion a new
    snapshot has nothing to be screened with, which is no failure."""
    from tasks.lib.errors import EvaluationError
    from tasks.lib.scoring import DEFAULT_MODEL
    from tasks.lib.tracking import resolve_model

    try:
        return bool(resolve_model(model or DEFAULT_MODEL).version)
    except EvaluationError:
        return False


def screen_step(run: Run, *, snapshot: str, model: str) -> xcoms.Screened:
    """Screen one refreshed snapshot with one pinned version into screened/<snapshot>/<version>/ (restoring the
    snapshot's tiles from the DVC remote when its files are gone)."""
    from tasks.lib import tracking
    from tasks.screen import ScreenParams, screen

    record = _snapshot_record(run, snapshot)
    result = screen(
        tiles=_snapshot_tiles(run, record),
        out=run.data_root / "screened" / snapshot,
        params=run.load("screen", ScreenParams),
        model=model,
        lineage=tracking.Lineage.from_environment(snapshot=snapshot, data_version=record["data_version"]),
    )
    return result.xcom(snapshot=snapshot, data_version=record["data_version"])


def _snapshot_record(run: Run, snapshot: str) -> xcoms.SnapshotRecord:
    records = {r["snapshot"]: r for r in snapshot_records(run.data_root)}
    if snapshot not in records:
        raise PipelineError(f"snapshot {snapshot!r}: no record under {run.data_root / SNAPSHOTS_DIR}")
    return records[snapshot]


def screening_pods(run: Run, *, plan: xcoms.ScreeningPlan) -> list[list[str]]:
    """The kubernetes backend's pod arguments, one list per snapshot of the plan: restore the snapshot's data version
    into the pod's emptyDir, screen it with the pinned version into `screen.store`/<snapshot>/, write the result for
    the operator's XCom sidecar (tasks.lib.backends.screening_arguments)."""
    from tasks.lib.backends import POD_XCOM_FILE, BackendsParams, ScreeningPlacement, screening_arguments

    store = run.load("screen", ScreeningPlacement).store
    if not store:
        raise ConfigError("screen.store is null: the kubernetes backend's pods keep their screenings there; set it to "
                          "gs://BUCKET/PREFIX")  # fmt: skip
    data_dir = run.load("backends", BackendsParams).kubernetes.data_dir
    pods = []
    for snapshot in plan["snapshots"]:
        record = _snapshot_record(run, snapshot)
        pods.append(
            screening_arguments(
                snapshot=snapshot,
                data_version=record["data_version"],
                model=plan["model"],
                out=f"{store.rstrip('/')}/{snapshot}",
                data_dir=data_dir,
                xcom_out=POD_XCOM_FILE,
            )
        )
    return pods


def pull_screening(run: Run, *, screened: xcoms.Screened) -> xcoms.Screened:
    """A pod's screening, kept in the object store (`out` is gs://…/<snapshot>/<version>), fetched into
    <data root>/screened/<snapshot>/<version>/ as a local screening would have written it (where the monitoring and
    later local runs look); nothing is fetched when that directory already holds the same screening. The result
    names the local directory as `out` and the bucket's as `url`."""
    from tasks.lib.outputs import completed
    from tasks.lib.remote_outputs import RemoteOutput
    from tasks.screen import OUTPUT_FILES, SUMMARY_FILE

    store = RemoteOutput(screened["out"])
    key = ((store.read_record(SUMMARY_FILE) or {}).get("input") or {}).get("fingerprint")
    if not key:
        raise PipelineError(f"{store.url}: no {SUMMARY_FILE} with a fingerprint: the pod's screening is not complete")
    target = run.data_root / "screened" / screened["snapshot"] / screened["version"]
    files = [target / name for name in OUTPUT_FILES]
    if not completed(target / SUMMARY_FILE, key, requires=files, what=f"{store.url} in the data root"):
        try:
            store.download(target, [*OUTPUT_FILES, SUMMARY_FILE])
        except FileNotFoundError as exc:
            raise PipelineError(f"{store.url}: the pod's screening is incomplete ({exc})") from exc
    return xcoms.Screened(**{**screened, "out": str(target), "url": store.url})


def screening_results(run: Run, *, results: Iterable[xcoms.Screened | None]) -> list[xcoms.Screened]:
    """The screenings of whichever backend ran (None for the one that was skipped), each in the data root: a pod's
    is fetched from the object store first (`pull_screening`)."""
    from tasks.lib.remote_outputs import is_remote

    return [pull_screening(run, screened=s) if is_remote(s["out"]) else s for s in results if s]


def monitor_step(run: Run, *, screened: xcoms.Screened, model: str) -> xcoms.Monitored:
    """Monitor one screened snapshot against the data the version was trained on: the refreshed snapshot with that
    data version when there is one (screened by the same version first, so both sides have every patch's score),
    else that data version restored from the DVC remote, scored on the sample."""
    from tasks.lib import tracking
    from tasks.lib.scoring import resolve_version
    from tasks.monitor import MonitorParams, monitor

    version = resolve_version(model)
    records = {r["snapshot"]: r for r in snapshot_records(run.data_root)}
    record = records[screened["snapshot"]]
    trained_on = [r for r in records.values() if r["data_version"] == version.data_version and version.data_version]
    reference_tiles = reference_scores = None
    reference = version.data_version or "(unknown)"
    if trained_on:
        reference_record = max(trained_on, key=lambda r: (r["as_of"], r["snapshot"]))
        reference = reference_record["snapshot"]
        reference_screened = screen_step(run, snapshot=reference, model=model)
        reference_tiles = _snapshot_tiles(run, reference_record)
        reference_scores = Path(reference_screened["out"]) / "scores.parquet"
    result = monitor(
        tiles=_snapshot_tiles(run, record),
        reference=reference_tiles,
        out=run.data_root / "monitored" / screened["snapshot"] / version.version,
        params=run.load("monitor", MonitorParams),
        model=model,
        scores=Path(screened["out"]) / "scores.parquet",
        reference_scores=reference_scores,
        lineage=tracking.Lineage.from_environment(snapshot=screened["snapshot"], data_version=record["data_version"]),
    )
    v = result.verdict
    return xcoms.Monitored(
        snapshot=screened["snapshot"],
        reference=reference,
        decision=v["decision"],
        reasons=v["reasons"],
        out=str(result.out),
        mlflow_run_id=v["mlflow_run_id"],
        skipped=result.skipped,
    )


def _snapshot_tiles(run: Run, record: xcoms.SnapshotRecord) -> Path:
    from tasks.versioning import TILES_DIR

    tiles = Path(record["tiles"])
    return tiles if tiles.is_dir() else _restored(run, record) / TILES_DIR


def retrain_request(monitored: Iterable[xcoms.Monitored]) -> dict[str, Any] | None:
    """The drift Asset's event extra when a snapshot drifted or decayed (the newest such one), else None."""
    moved = [m for m in monitored if m["decision"] in ("drift", "decay")]
    if not moved:
        return None
    worst = max(moved, key=lambda m: (m["decision"] == "decay", m["snapshot"]))
    return {"snapshot": worst["snapshot"], "decision": worst["decision"], "reasons": worst["reasons"][:10]}


def retrain_request_step(run: Run, *, monitored: list[xcoms.Monitored]) -> dict[str, Any] | None:
    """retrain_request with the alert that goes with it."""
    request = retrain_request(monitored)
    return None if request is None else {**request, "alert": drift_alert(run, request, monitored)}


def summarize_screening(
    run: Run, *, plan: xcoms.ScreeningPlan, screened: list[xcoms.Screened], monitored: list[xcoms.Monitored]
) -> xcoms.ScreeningSummary:
    """The screening run in a few lines: the version and threshold, then per snapshot the clear patches, the cloud
    fraction, agreement with the official cloud list, the monitoring's decision and the MLflow runs."""
    import mlflow

    ui = run.load("pipeline", PipelineParams).mlflow_ui_url
    decisions = {m["snapshot"]: m for m in monitored}

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = [
        f"model     {plan['model']} ({plan['asked']}), threshold {plan['threshold']:.4f}; snapshots: {plan['why']}"
    ]
    for s in sorted(screened, key=lambda s: s["snapshot"]):
        link = run_link(mlflow.get_tracking_uri(), s["mlflow_run_id"], ui)
        lines.append(
            f"{s['snapshot']}  {s['clear']} of {s['patches']} patches clear "
            f"(cloud fraction {s['cloud_fraction']:.3f}); "
            f"against the official cloud list precision {fmt(s['agreement_precision'])} recall "
            f"{fmt(s['agreement_recall'])}; {'already screened' if s['skipped'] else 'screened'}: {s['out']}; {link}"
        )
        if m := decisions.get(s["snapshot"]):
            lines.append(
                f"{'':10}monitoring against {m['reference']}: {m['decision']}"
                + "".join(f"\n{'':12}{reason}" for reason in m["reasons"][:5])
                + f"\n{'':10}{run_link(mlflow.get_tracking_uri(), m['mlflow_run_id'], ui)}"
            )
    text = "\n".join(lines)
    log.info("screening run summary:\n%s", text)
    return xcoms.ScreeningSummary(
        text=text,
        version=plan["version"],
        snapshots=[s["snapshot"] for s in screened],
        decisions={m["snapshot"]: m["decision"] for m in monitored},
    )


# --- alerts: what each message says (the DAGs send them through Airflow's SMTP notifier) --------------------------


def alert_recipients(params: PipelineParams) -> dict[str, Any] | None:
    """The SMTP notifier's addressing, or None when no one is to be told (`pipeline.alerts.to` empty)."""
    a = params.alerts
    return {"to": a.to, "from_email": a.from_email, "smtp_conn_id": a.smtp_conn_id} if a.to else None


def gate_alert(run: Run, verdict: xcoms.GateDecision, run_id: str) -> xcoms.Alert:
    """The message of a gate decision: the decision, the versions, the reasons, the challenger's MLflow run."""
    import mlflow

    link = run_link(mlflow.get_tracking_uri(), run_id, run.load("pipeline", PipelineParams).mlflow_ui_url)
    champion = verdict["registry"].get("champion") or "none"
    subject = f"cloudscreen gate: {verdict['decision']} (version {verdict['challenger_version']}, champion {champion})"
    lines = [
        f"The gate decided {verdict['decision']} for challenger version {verdict['challenger_version']}.",
        f"Champion now: version {champion}; before: {verdict['champion_version'] or 'none'}.",
        "",
        *verdict["reasons"],
        "",
        f"Challenger's run: {link}",
    ]
    return xcoms.Alert(subject=subject, body="\n".join(lines))


def drift_alert(run: Run, request: dict[str, Any], monitored: Iterable[xcoms.Monitored]) -> xcoms.Alert:
    """The message of a drift or decay verdict: which snapshot, why, and the monitoring runs."""
    import mlflow

    ui = run.load("pipeline", PipelineParams).mlflow_ui_url
    lines = [f"Monitoring found {request['decision']} in snapshot {request['snapshot']}:", *request["reasons"], ""]
    for m in monitored:
        if m["decision"] != "ok":
            link = run_link(mlflow.get_tracking_uri(), m["mlflow_run_id"], ui)
            lines.append(f"{m['snapshot']} against {m['reference']}: {m['decision']}; {link}")
    subject = f"cloudscreen monitoring: {request['decision']} in snapshot {request['snapshot']}"
    return xcoms.Alert(subject=subject, body="\n".join(lines))


def rollback_alert(done: dict[str, Any]) -> xcoms.Alert:
    subject = f"cloudscreen rollback: champion back to version {done['champion']} (was {done['rolled_back']})"
    body = (
        f"{done['by']} rolled {done['registered_model']} back from version {done['rolled_back']} to "
        f"{done['champion']}: {done['reason']}"
    )
    return xcoms.Alert(subject=subject, body=body)
