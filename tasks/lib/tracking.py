"""MLflow names shared by train, evaluate and gate: artifact paths, registry aliases, lineage tag keys, model URIs.

The contract every logged classifier keeps (the CNN, its transfer variants and the SGD baseline alike): the run's
`model` artifact is an MLflow pyfunc model whose `predict` takes raw uint16 patches of shape (n, 120, 120, 3) in
R, G, B order (B04, B03, B02, as tiles.json records) and returns a float array of shape (n,) holding the probability
of `cloud`. Normalisation is packaged inside the model, so callers never normalise.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import astuple, dataclass
from pathlib import Path

from tasks.lib.errors import CloudscreenError, EvaluationError

MODEL_ARTIFACT = "model"  # the pyfunc model that takes raw uint16 patches
KERAS_ARTIFACT = "keras_model"  # the same network in the Keras flavor, for Keras users
EVALUATION_DIR = "evaluation"  # artifacts written by tasks.evaluate
METRICS_FILE = "metrics.json"  # in EVALUATION_DIR: every number of the evaluation; what the gate reads
PREDICTIONS_FILE = "predictions.parquet"  # in EVALUATION_DIR: one score per patch; what the gate's paired test reads
GATE_FILE = "gate.json"  # the verdict tasks.gate writes to the challenger's run

CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous-champion"

TAG_PREFIX = "cloudscreen."
TAG_GIT_COMMIT = "cloudscreen.git_commit"
TAG_DATA_VERSION = "cloudscreen.data_version"
TAG_SNAPSHOT = "cloudscreen.snapshot"
TAG_DAG_ID = "cloudscreen.dag_id"
TAG_DAG_RUN_ID = "cloudscreen.dag_run_id"
TAG_IMAGE = "cloudscreen.image"
LINEAGE_TAGS = (TAG_GIT_COMMIT, TAG_DATA_VERSION, TAG_SNAPSHOT, TAG_DAG_ID, TAG_DAG_RUN_ID, TAG_IMAGE)
TAG_STOPPED_BY = "cloudscreen.stopped_by"  # on a training run: budget, early_stopping or epochs
TAG_KIND = "cloudscreen.kind"  # "train", "baseline", "search", "trial" or "evaluation"
KIND_EVALUATION = "evaluation"  # tasks.evaluate's run of its own: a model evaluated on other data
TAG_GATE_DECISION = "cloudscreen.gate.decision"
TAG_GATE_REASONS = "cloudscreen.gate.reasons"
# On a registered version: the threshold the version decides at (score >= it is cloud), set by the gate when it
# promotes, so the threshold travels with the version wherever it screens or serves.
TAG_OPERATING_THRESHOLD = "cloudscreen.operating_threshold"

# MLflow's own tags. The UI opens an experiment in its GenAI view (traces) unless the experiment says it holds model
# training; the note is the description the UI shows (of an experiment, of a run).
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
TAG_NOTE = "mlflow.note.content"
TAG_DATA_CONTEXT = "mlflow.data.context"  # of a run's dataset input: "training", "evaluation"
EXPERIMENT_DESCRIPTION = (
    "cloudscreen: the cloud / no_cloud classifier of Sentinel-2 patches. Training runs (tag cloudscreen.kind: train, "
    "baseline, search and its trials) each log a model, evaluated by tasks.evaluate on the data it was trained on; "
    "an evaluation of a model on other data is a run of its own (cloudscreen.kind = evaluation) linked to the model. "
    "The registry alias `champion` names the model in service (tasks.gate)."
)


def run_model_uri(run_id: str) -> str:
    """The URI of a run's pyfunc classifier: `models:/<model id>` of the logged model named `model`.

    MLflow 3 keeps logged models beside the run, not among its artifacts: a `runs:/ID/model` URI is first looked up
    as a run artifact, which through a proxying tracking server means several retried 404s (minutes). The logged
    model's own URI goes straight to it. Falls back to `runs:/` for runs logged before MLflow 3.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise CloudscreenError(f"run {run_id}: {exc.message}") from exc
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_ARTIFACT}'",
    )
    if found:
        return f"models:/{found[0].model_id}"
    return f"runs:/{run_id}/{MODEL_ARTIFACT}"


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))?/?$")
_RUNS_URI = re.compile(r"^runs:/(?P<run_id>[^/]+)/")


def model_run_id(model_uri: str) -> str:
    """The MLflow run a model belongs to: the run of `runs:/ID/...`, the source run of a registered version
    (`models:/name@alias`, `models:/name/version`) or of a logged model (`models:/m-...`).

    Raises:
        EvaluationError: the URI has another form, or names a model or version the registry does not hold.
    """
    return resolve_model(model_uri).run_id


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from: its training run and, in MLflow 3, its logged model; the registered version when the
    URI names one."""

    uri: str
    run_id: str  # the run that logged (trained) the model
    experiment_id: str  # that run's experiment
    model_id: str | None  # the LoggedModel (models:/m-...); None for a model logged before MLflow 3
    registered_name: str = ""
    version: str = ""


def resolve_model(model_uri: str) -> ModelRef:
    """The training run, logged model and registered version behind `runs:/ID/PATH`, `models:/NAME@ALIAS`,
    `models:/NAME/VERSION` or `models:/m-...` (a logged model).

    Raises:
        EvaluationError: the URI has another form, or names a run, model or version the store does not hold.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    name = version = ""
    model_id: str | None = None
    try:
        if match := _RUNS_URI.match(model_uri):
            run_id = match["run_id"]
            path = model_uri[match.end() :].strip("/")
            run = client.get_run(run_id)
            found = client.search_logged_models(
                experiment_ids=[run.info.experiment_id],
                filter_string=f"source_run_id = '{run_id}' AND name = '{path}'",
            )
            model_id = found[0].model_id if found else None
            return ModelRef(model_uri, run_id, run.info.experiment_id, model_id)
        match = _MODELS_URI.match(model_uri)
        if not match:
            raise EvaluationError(
                f"model {model_uri!r}: expected runs:/ID/PATH, models:/NAME@ALIAS or models:/NAME/VERSION"
            )
        if match["alias"] or match["version"]:
            name = match["name"]
            found_version = (
                client.get_model_version_by_alias(name, match["alias"])
                if match["alias"]
                else client.get_model_version(name, match["version"])
            )
            run_id, version = found_version.run_id, str(found_version.version)
            # A version registered from `models:/m-...` names its logged model in its source (model_id can be unset).
            source = _MODELS_URI.match(found_version.source or "")
            model_id = getattr(found_version, "model_id", None) or (
                source["name"] if source and source["name"].startswith("m-") else None
            )
        else:
            logged = client.get_logged_model(match["name"])
            run_id, model_id = logged.source_run_id, logged.model_id
        if not run_id:
            raise EvaluationError(f"model {model_uri!r}: has no source run")
        experiment = client.get_run(run_id).info.experiment_id
    except MlflowException as exc:
        raise EvaluationError(f"model {model_uri!r}: {exc.message}") from exc
    return ModelRef(model_uri, run_id, experiment, model_id, name, version)


def training_digests(run_id: str) -> set[str]:
    """Digests of the datasets run `run_id` logged as its training input (empty when it logged none)."""
    from mlflow.tracking import MlflowClient

    inputs = MlflowClient().get_run(run_id).inputs
    return {
        entry.dataset.digest
        for entry in (inputs.dataset_inputs if inputs else [])
        if any(tag.key == TAG_DATA_CONTEXT and tag.value == "training" for tag in entry.tags)
    }


@dataclass(frozen=True)
class Lineage:
    """The keys that find one pipeline run from every tool (DESIGN.md, "The lineage key"); empty when unknown."""

    git_commit: str = ""
    data_version: str = ""
    snapshot: str = ""
    dag_id: str = ""
    dag_run_id: str = ""
    image: str = ""

    @classmethod
    def from_environment(cls, *, snapshot: str | None = None, data_version: str | None = None) -> Lineage:
        """Lineage from arguments, else CLOUDSCREEN_* variables (set by the DAG, the pod spec or the image),
        else Airflow's task-context variables, else the git checkout the code runs from."""
        env = os.environ

        def first(*names: str) -> str:
            return next((env[n] for n in names if env.get(n)), "")

        return cls(
            git_commit=first("CLOUDSCREEN_GIT_COMMIT") or _git_commit(),
            data_version=data_version or first("CLOUDSCREEN_DATA_VERSION"),
            snapshot=snapshot or first("CLOUDSCREEN_SNAPSHOT"),
            dag_id=first("CLOUDSCREEN_DAG_ID", "AIRFLOW_CTX_DAG_ID"),
            dag_run_id=first("CLOUDSCREEN_DAG_RUN_ID", "AIRFLOW_CTX_DAG_RUN_ID"),
            image=first("CLOUDSCREEN_IMAGE"),
        )

    def tags(self) -> dict[str, str]:
        return dict(zip(LINEAGE_TAGS, astuple(self), strict=True))


def _git_commit() -> str:
    """HEAD of the checkout this code runs from, with `-dirty` when tracked files changed; "" outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=root, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return head.stdout.strip() + ("-dirty" if dirty.returncode == 1 else "")


def experiment_id(name: str) -> str:
    """The id of experiment `name` (MLFLOW_EXPERIMENT_NAME wins when set), created when missing; either way it is
    tagged as model development with a description (EXPERIMENT_DESCRIPTION), so the MLflow UI opens it on its runs.

    Runs are started with this id explicitly: `mlflow.set_experiment` would also set MLFLOW_EXPERIMENT_ID in the
    environment, which every later run and subprocess then follows, whatever tracking store it talks to.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or name
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, tags=_experiment_tags({}))
        except MlflowException:  # created meanwhile by a concurrent run
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    for key, value in _experiment_tags(found.tags).items():
        client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def experiment_ui_url(base: str, experiment: str) -> str:
    """The MLflow UI's page of an experiment, opened on its training runs.

    MLflow 3.17's UI picks its GenAI or model-training view with a switch of its own, remembered in the browser and
    GenAI by default; the experiment's kind tag no longer decides. `workflowType=machine_learning` selects the
    model-training view, which opens an experiment on its runs table.
    """
    return f"{base.rstrip('/')}/#/experiments/{experiment}?workflowType=machine_learning"


def _experiment_tags(present: dict[str, str]) -> dict[str, str]:
    """The experiment tags still to set: the kind when it is not model development, the description when there is
    none (one written by hand in the UI stays)."""
    tags = {}
    if present.get(TAG_EXPERIMENT_KIND) != EXPERIMENT_KIND:
        tags[TAG_EXPERIMENT_KIND] = EXPERIMENT_KIND
    if not present.get(TAG_NOTE):
        tags[TAG_NOTE] = EXPERIMENT_DESCRIPTION
    return tags
