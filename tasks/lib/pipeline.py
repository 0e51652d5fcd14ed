"""The pipeline around the steps: snapshot keys, where each snapshot's files go, and one function per DAG task.

The Airflow DAGs (dags/) are wiring; what their tasks do is here, in plain Python that tests call without Airflow.
Every run works on one snapshot, its partition key (see `snapshot_key`): scheduled and backfill runs use their
logical date, manual and asset-triggered runs their run id. A step reads the previous step's output for that snapshot
and writes its own under `data_root`:

    raw/<snapshot>/  validated/<snapshot>/  tiles/<snapshot>/  samples/<snapshot>/<set>/  versions/<snapshot>/
    snapshots/<snapshot>.json   the refresh's record: data version, manifests, tiles (what training is pinned to)
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
from typing import Any, Literal, TypeVar

from pydantic import Field

from tasks.lib import xcoms
from tasks.lib.config import StepParams, default_params, load_section
from tasks.lib.errors import ConfigError, PipelineError
from tasks.lib.files import jsonable, write_json

log = logging.getLogger(__name__)

DATA_ROOT_ENV = "CLOUDSCREEN_DATA_ROOT"
# The Asset the refresh DAG updates and the training DAG is scheduled on: the versioned training data.
TRAINING_DATA_ASSET = {"name": "cloudscreen_training_data", "uri": "cloudscreen://training-data"}
BACKENDS = ("local", "docker", "kubernetes")
SNAPSHOTS_DIR = "snapshots"
_UNSAFE = re.compile(r"[^A-Za-z0-9._:+-]")  # what tasks.versioning accepts in a snapshot name

P = TypeVar("P", bound=StepParams)


class PipelineParams(StepParams):
    data_root: Path
    source: str
    checksum_url: str | None = None
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
    timeout_minutes: dict[Literal["io", "tile", "train", "evaluate"], float]
    mlflow_ui_url: str | None = None


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


def download_step(run: Run, *, source: str | None = None, checksum_url: str | None = None) -> xcoms.Fetched:
    """Download the snapshot's archive. `source` is a download.sources name or a URL; `{snapshot}` in a URL (or in
    the checksum URL) becomes the snapshot key, so each interval can fetch its own archive."""
    from tasks.download import DownloadParams, download, resolve_request

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
    fetched = download(url=url, dest=run.dir("raw"), checksum=checksum, params=params)
    return xcoms.Fetched(url=url, patches=str(fetched.root), archive=str(fetched.archive), skipped=fetched.skipped)


def validate_step(run: Run, *, patches: str) -> xcoms.Validated:
    """Validate the downloaded patches; fail (naming the report) when more than the allowed share is quarantined."""
    from tasks.validate import DATA_DOCS_INDEX, ValidateParams, validate

    result = validate(patches=Path(patches), out=run.dir("validated"), params=run.load("validate", ValidateParams))
    report = result.report
    if not result.success:
        raise PipelineError(
            f"{result.report_path}: validation failed ({len(report['quarantined'])} of {report['checked']} patches "
            f"quarantined; suite {'passed' if report['suite_success'] else 'failed'}); see its Data Docs"
        )
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


def check_training_form(*, force_promote: bool, reason: str | None) -> None:
    """Refuse a forced promotion without a reason before anything trains, not after."""
    if force_promote and not (reason and reason.strip()):
        raise ConfigError("force_promote needs a reason: say why the gate's rules are overridden (it is recorded)")
    if reason and not force_promote:
        raise ConfigError("a reason is only for a forced promotion: tick force_promote, or leave the reason empty")


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
    from tasks.versioning import SAMPLES_DIR, TILES_DIR, VersioningParams, restore

    dest = run.data_root / "restored" / record["data_version"]
    if not (dest / TILES_DIR).is_dir():
        log.info("snapshot %s's files are gone; restoring data version %s", record["snapshot"], record["data_version"])
        restore(version=record["data_version"], dest=dest, params=run.load("versioning", VersioningParams))
    return dest / SAMPLES_DIR / dataset / "manifest.parquet", dest / TILES_DIR


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
    from tasks.lib.backends import POD_XCOM_FILE, BackendsParams, TrainingRequest

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
    return xcoms.TrainingPlan(
        request=request.to_json(),
        kubernetes_arguments=request.remote_arguments(backends.kubernetes.data_dir, POD_XCOM_FILE),
    )


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
    return xcoms.GateDecision(
        decision=verdict.decision,
        promoted=verdict.promoted,
        reasons=list(verdict.reasons),
        challenger_version=verdict.challenger.get("version"),
        champion_version=(verdict.champion or {}).get("version"),
        registry=verdict.registry,
    )


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

    pipeline = run.load("pipeline", PipelineParams)
    link = run_link(mlflow.get_tracking_uri(), trained["run_id"], pipeline.mlflow_ui_url)
    m = evaluation["metrics"]

    def fmt(name: str) -> str:
        value = m.get(name)
        return "n/a" if value is None else f"{value:.3f}"

    lines = [
        f"data      snapshot {data['snapshot']} ({data['dataset']} set), data version {data['data_version']}",
        f"trained   run {trained['run_id']} on the {backend} backend; model version {trained.get('model_version')}",
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
