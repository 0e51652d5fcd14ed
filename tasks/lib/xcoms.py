"""What each DAG task hands the next one, declared once: the XCom shapes of tasks.lib.pipeline's functions.

They are TypedDicts, so at run time an XCom stays a plain JSON dict (what Airflow stores, what the Kubernetes pod's
sidecar reads from return.json, what the REST API shows), while the functions that build them and the DAG tasks that
read them are checked against one declaration. Paths travel as strings.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

# --- refresh: download → validate → tile → sample → version ---------------------------------------------------------


class Alert(TypedDict):
    """A message the DAG's SMTP notifier sends (its subject and body are read from the task's XCom)."""

    subject: str
    body: str


class Fetched(TypedDict):
    """download: the archive and the extracted patch folders."""

    url: str
    patches: str  # the dataset root: one folder per patch
    archive: str
    skipped: bool  # an earlier run had completed the same download


class Validated(TypedDict):
    """validate: the report (quarantine with reasons) and its Data Docs."""

    report: str
    data_docs: str
    checked: int
    valid: int
    quarantined: int
    skipped: bool


class Tiled(TypedDict):
    """tile: the tile directory (shards, index, metadata, stats)."""

    tiles: str
    patches: int
    shards: int
    skipped: bool


class Ingested(TypedDict):
    """ingest: the archive streamed into validated/ and tiles/ (validate's and tile's outputs, no extracted tree)."""

    url: str
    report: str
    data_docs: str
    checked: int
    valid: int
    quarantined: int
    tiles: str
    patches: int
    shards: int
    skipped: bool


class SampledSet(TypedDict):
    """One dataset drawn by sample (small or large)."""

    manifest: str
    patches: int
    natural_patches: int
    natural_prevalence: float
    skipped: bool


class Sampled(TypedDict):
    """sample: every dataset of the snapshot."""

    samples: str
    sets: dict[str, SampledSet]


class SnapshotRecord(TypedDict):
    """version: the snapshot's record (also `<data root>/snapshots/<snapshot>.json`), what training is pinned to."""

    snapshot: str
    as_of: str  # ISO 8601, UTC
    data_version: str
    remote: str
    tiles: str
    manifests: dict[str, str]  # dataset → manifest path
    version_record: str


# --- training: data → plan → train → evaluate → gate → summary ------------------------------------------------------


class TrainingData(TypedDict):
    """training_data: the pinned snapshot and the paths of its set."""

    snapshot: str
    data_version: str
    dataset: str
    manifest: str
    tiles: str
    trigger: NotRequired[str]  # why the run trains: new_data, drift, schedule or manual
    trigger_reasons: NotRequired[str]  # ... in words (drift: the monitoring's reasons)


class Searched(TypedDict):
    """tasks.search's result (its --xcom-out file): the parent MLflow run and the best trial."""

    run_id: str
    trials: int
    best_run_id: str | None
    best_params: dict[str, Any]  # learning_rate, optimizer; {} when no trial completed


class TrainingPlan(TypedDict):
    """plan_training: the trainer's request (tasks.lib.backends.TrainingRequest as JSON) and the pod's arguments;
    after a search (the training form's search mode), the search that chose the request's learning rate and
    optimizer."""

    request: dict[str, Any]
    kubernetes_arguments: list[str]
    search: NotRequired[Searched]


class Trained(TypedDict):
    """A training backend's result (the trainer's --xcom-out file), plus which backend ran it."""

    run_id: str
    model_version: str | None
    backend: NotRequired[str]


class Evaluated(TypedDict):
    """evaluate: the operating threshold and every metric (NaN as null)."""

    run_id: str
    threshold: float
    metrics: dict[str, float | None]


class GateDecision(TypedDict):
    """gate: the verdict in short (the whole one is the run's gate.json)."""

    decision: str  # promote, bootstrap, reject or forced
    promoted: bool
    reasons: list[str]
    challenger_version: str | None
    champion_version: str | None
    registry: dict[str, Any]
    alert: NotRequired[Alert]


class TrainingSummary(TypedDict):
    """summary: the training run in a few lines, and the values a person looks for."""

    text: str
    mlflow_run: str
    run_id: str
    model_version: str | None
    decision: str
    reasons: list[str]
    snapshot: str
    data_version: str


# --- screening: plan → screen (one per snapshot) → summary -------------------------------------------------------


class ScreeningPlan(TypedDict):
    """plan: the version every snapshot of this run is screened with (pinned, so a champion that moves mid-run does
    not split the run between two versions) and the snapshots to screen."""

    model: str  # models:/NAME/VERSION
    asked: str  # the URI the form or the default named, e.g. models:/cloudscreen-classifier@champion
    version: str
    threshold: float
    snapshots: list[str]
    why: str  # what chose the snapshots: the form, new data, a new champion, every snapshot


class Screened(TypedDict):
    """screen: one snapshot's screening (the whole of it is OUT/<version>/summary.json). A pod writes it with `out`
    in the object store; the DAG then fetches the screening into the data root and `out` names it there."""

    snapshot: str
    data_version: str
    version: str
    out: str
    patches: int
    clear: int
    cloud_fraction: float
    agreement_precision: float | None
    agreement_recall: float | None
    patches_per_second: float
    mlflow_run_id: str
    skipped: bool
    url: NotRequired[str]  # the kubernetes backend's copy in the object store (gs://…/<snapshot>/<version>)


class Monitored(TypedDict):
    """monitor: one snapshot against the champion's training data (the whole verdict is OUT/monitor.json)."""

    snapshot: str
    reference: str  # the reference snapshot, or the data version when no snapshot record has it
    decision: str  # ok, drift or decay
    reasons: list[str]
    out: str
    mlflow_run_id: str
    skipped: bool


class ScreeningSummary(TypedDict):
    """summary: the screening run in a few lines."""

    text: str
    version: str
    snapshots: list[str]
    decisions: dict[str, str]  # snapshot → monitoring decision
