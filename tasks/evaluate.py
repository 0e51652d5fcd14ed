"""Evaluate a logged cloud classifier on a sample set and log metrics, slices, predictions and plots to MLflow.

Data: the sample step's `manifest.parquet` (its val and test splits) and the `natural.parquet` beside it (the
natural-prevalence evaluation set); pixels come from the tile step's shards. The model is any MLflow pyfunc that keeps
the contract in tasks.lib.tracking (raw uint16 patches in, cloud probabilities out).

The operating threshold is chosen on val (see tasks.lib.thresholds) and then only reported on test and natural, so
the test numbers are an honest estimate. A patch is called cloud when its score is >= the threshold. With
`threshold_confidence` set, the threshold is the highest one at which val shows, with that confidence, that the
recall on new patches reaches the target (a lower confidence bound, not the recall val happened to give).

Metric names (built once, by tasks.lib.metrics.metric_name), with SET one of val, test, natural:
- `SET_AT_METRIC` for metrics of a decision threshold, AT being `t50` (threshold 0.5) or `op` (the operating
  threshold) and METRIC one of accuracy, precision, recall, f1, tn, fp, fn, tp: e.g. `test_op_recall`,
  `natural_t50_precision`;
- `SET_METRIC` for threshold-free ones: roc_auc, average_precision, log_loss (binary cross-entropy) and the counts
  patches, positives: e.g. `test_roc_auc`;
- `operating_threshold` and `target_recall`.
A metric that is undefined on the data (precision with nothing flagged, ROC-AUC with one class) is NaN.

Artifacts under `evaluation/` (tasks.lib.tracking.EVALUATION_DIR): metrics.json (every number, the threshold, params,
data paths, digests and counts), predictions.parquet (patch_id, set, label, score and the slice columns; what the gate's
paired test reads), slices.parquet (per-slice metrics at the operating threshold), and the plots
precision_recall_vs_threshold.png, precision_recall_curve.png, confusion_matrix.png, worst_errors.png. Tags
`cloudscreen.evaluate.*` record the model URI, manifest, natural set, tiles and the manifests' digests.

Where it is logged: a model's own evaluation, on the data it was trained on, goes to its training run (the training
DAG's evaluate step). An evaluation on other data is a run of its own, `cloudscreen.kind` = `evaluation`, in the
model's experiment: the training run's record is never written over. Both link the metrics to the MLflow 3 logged
model and the manifest as a dataset, so the model's page lists every evaluation of it by data; the evaluation run also
takes the model as its input and names it in tags `cloudscreen.evaluate.model_id`, `.training_run_id`,
`.registered_model` and `.model_version`.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from tasks.lib import cli, plots
from tasks.lib.config import StepParams, load_section
from tasks.lib.errors import EvaluationError
from tasks.lib.files import file_digest, jsonable, write_json
from tasks.lib.metrics import (
    AT_DEFAULT,
    AT_OPERATING,
    DEFAULT_THRESHOLD,
    OPERATING_THRESHOLD,
    SETS,
    TARGET_RECALL,
    as_scores,
    binary_metrics,
    set_metrics,
    slice_metrics,
)
from tasks.lib.thresholds import RECALL_TOLERANCE, operating_threshold, recall_confidence
from tasks.lib.tiles import INDEX_FILE, load_patches
from tasks.lib.tracking import (
    EVALUATION_DIR,
    KIND_EVALUATION,
    METRICS_FILE,
    PREDICTIONS_FILE,
    TAG_DATA_CONTEXT,
    TAG_KIND,
    TAG_NOTE,
    TAG_PREFIX,
    Lineage,
    ModelRef,
    resolve_model,
    run_model_uri,
    training_digests,
)
from tasks.sample import NATURAL_FILE

log = logging.getLogger(__name__)

SLICES_FILE = "slices.parquet"
THRESHOLD_PLOT = "precision_recall_vs_threshold.png"
PR_CURVE_PLOT = "precision_recall_curve.png"
CONFUSION_PLOT = "confusion_matrix.png"
WORST_ERRORS_PLOT = "worst_errors.png"
ARTIFACTS = (
    METRICS_FILE,
    PREDICTIONS_FILE,
    SLICES_FILE,
    THRESHOLD_PLOT,
    PR_CURVE_PLOT,
    CONFUSION_PLOT,
    WORST_ERRORS_PLOT,
)

TAG_MODEL_URI = f"{TAG_PREFIX}evaluate.model_uri"
TAG_MANIFEST = f"{TAG_PREFIX}evaluate.manifest"
TAG_NATURAL = f"{TAG_PREFIX}evaluate.natural"
TAG_TILES = f"{TAG_PREFIX}evaluate.tiles"
TAG_MANIFEST_SHA256 = f"{TAG_PREFIX}evaluate.manifest_sha256"
TAG_NATURAL_SHA256 = f"{TAG_PREFIX}evaluate.natural_sha256"
# On an evaluation run of its own: the model it evaluated.
TAG_MODEL_ID = f"{TAG_PREFIX}evaluate.model_id"
TAG_TRAINING_RUN = f"{TAG_PREFIX}evaluate.training_run_id"
TAG_REGISTERED_MODEL = f"{TAG_PREFIX}evaluate.registered_model"
TAG_MODEL_VERSION = f"{TAG_PREFIX}evaluate.model_version"
DATA_CONTEXT = "evaluation"  # the dataset input's context on the run that logs the evaluation

_MANIFEST_COLUMNS = ("patch_id", "label", "split")


class EvaluateParams(StepParams):
    target_recall: float = Field(gt=0, le=1)
    # None: the threshold whose val recall reaches the target (evaluations recorded before this setting existed).
    threshold_confidence: float | None = Field(default=None, gt=0, lt=1)
    batch_size: int = Field(ge=1)
    slice_columns: tuple[str, ...]
    worst_examples: int = Field(ge=1)
    stretch_percentiles: tuple[float, float]

    @field_validator("stretch_percentiles")
    @classmethod
    def _ordered_percentiles(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 <= low < high <= 100:
            raise ValueError(f"expected 0 <= low < high <= 100, got {list(value)}")
        return value


@dataclass(frozen=True)
class Evaluation:
    model_uri: str
    run_id: str | None  # the run the results were logged to; None when nothing was logged
    kind: str | None  # where: "training" (the model's own run), "evaluation" (a run of its own) or None
    threshold: float  # the operating threshold, chosen on val
    target_recall: float
    metrics: dict[str, float]  # flat names, see the module docstring
    predictions: pd.DataFrame = field(repr=False)  # patch_id, set, label, score, slice columns
    slices: pd.DataFrame = field(repr=False)  # set, column, value, counts and metrics at the operating threshold
    summary: dict[str, Any] = field(repr=False)  # the content of metrics.json


# --- scores and metrics -------------------------------------------------------------------------------------------


def predict(model: Any, frame: pd.DataFrame, tiles: Path, batch: int) -> np.ndarray:
    """Cloud probabilities for the patches of `frame` (its patch_id column), `batch` patches per model call so that
    memory stays bounded whatever the size of the set.

    Raises:
        EvaluationError: the model's output breaks the contract (see `as_scores`).
    """
    ids = frame["patch_id"].astype(str).tolist()
    scores = np.empty(len(ids), dtype=np.float64)
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        scores[start : start + len(chunk)] = as_scores(model.predict(load_patches(tiles, chunk)), len(chunk))
        log.debug("predicted %d of %d patches", start + len(chunk), len(ids))
    return scores


def assess(
    predictions: pd.DataFrame,
    target_recall: float,
    slice_columns: tuple[str, ...] | list[str],
    confidence: float | None = None,
) -> tuple[float, dict[str, float], pd.DataFrame]:
    """Everything `evaluate` derives from the scores: the operating threshold (chosen on val), the flat metrics of
    every set and the slices of test and natural at that threshold.

    Args:
        predictions: predictions.parquet's columns: set (val, test, natural), label, score and the slice columns.
        confidence: of the recall on new patches reaching the target at the threshold (`operating_threshold`).

    Returns:
        (operating threshold, metrics by flat name, slices: set, column, value, counts and metrics).

    Raises:
        ValueError: val holds no cloud patch.
    """
    val = predictions[predictions["set"] == "val"]
    labels, scores = val["label"].to_numpy(), val["score"].to_numpy()
    threshold = operating_threshold(labels, scores, target_recall, confidence)
    if confidence is not None:
        flagged = int(((scores >= threshold) & (labels == 1)).sum())
        reached = float(recall_confidence(flagged, int(labels.sum()), target_recall))
        if reached < confidence - RECALL_TOLERANCE:
            log.warning(
                "val's %d cloud patches cannot show recall %g with confidence %g: the lowest cloud score gives %.3f",
                int(labels.sum()),
                target_recall,
                confidence,
                reached,
            )
    if (val["score"] >= threshold).all():
        log.warning(
            "the operating threshold %g flags every val patch as cloud: the only way this model reaches recall %g",
            threshold,
            target_recall,
        )
    metrics: dict[str, float] = {OPERATING_THRESHOLD: threshold, TARGET_RECALL: target_recall}
    slices = []
    for name in SETS:
        part = predictions[predictions["set"] == name]
        labels, scores = part["label"].to_numpy(), part["score"].to_numpy()
        metrics |= set_metrics(name, labels, scores, {AT_DEFAULT: DEFAULT_THRESHOLD, AT_OPERATING: threshold})
        if name != "val":
            slices.append(slice_metrics(part, threshold, slice_columns).assign(set=name))
    frame = pd.concat(slices, ignore_index=True)
    return threshold, metrics, frame[["set", *(c for c in frame.columns if c != "set")]]


# --- inputs -------------------------------------------------------------------------------------------------------


def _read_set(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise EvaluationError(f"{path}: not found (expected the sample step's output)")
    names = pq.read_schema(path).names
    missing = [c for c in columns if c not in names]
    if missing:
        raise EvaluationError(f"{path}: lacks column(s) {', '.join(missing)}")
    frame = pd.read_parquet(path, columns=list(columns))
    labels = frame["label"]
    if labels.isna().any() or not labels.isin([0, 1]).all():
        raise EvaluationError(f"{path}: column label holds values other than 0 and 1")
    return frame.astype({"patch_id": "str", "label": "int8", "split": "str"})


def _load_sets(manifest: Path, tiles: Path, columns: tuple[str, ...]) -> dict[str, pd.DataFrame]:
    """val, test and natural frames (patch_id, label, split and the slice columns), checked."""
    wanted = tuple(dict.fromkeys((*_MANIFEST_COLUMNS, *columns)))
    frame = _read_set(manifest, wanted)
    natural = _read_set(manifest.parent / NATURAL_FILE, wanted)
    sets = {"val": frame[frame["split"] == "val"], "test": frame[frame["split"] == "test"], "natural": natural}
    for name, where in (("val", manifest), ("test", manifest), ("natural", manifest.parent / NATURAL_FILE)):
        if sets[name].empty:
            what = "is empty" if name == "natural" else f"has no {name} split"
            raise EvaluationError(f"{where}: {what}; cannot evaluate")
    val_classes = set(sets["val"]["label"].unique())
    if val_classes != {0, 1}:
        only = "cloud" if val_classes == {1} else "no_cloud"
        raise EvaluationError(f"{manifest}: the val split holds only {only} patches; the threshold needs both classes")
    for name in ("test", "natural"):
        if sets[name]["label"].nunique() < 2:
            log.warning("the %s set holds one class only: ROC-AUC, average precision and some rates are NaN", name)
    index = tiles / INDEX_FILE
    if not index.is_file():
        raise EvaluationError(f"{index}: not found (expected the tile step's output)")
    known = set(pd.read_parquet(index, columns=["patch_id"])["patch_id"].astype(str))
    for name, part in sets.items():
        absent = part.loc[~part["patch_id"].isin(known), "patch_id"]
        if len(absent):
            raise EvaluationError(
                f"{index}: {len(absent)} patches of the {name} set are not tiled, e.g. {absent.iloc[0]}"
            )
    return {name: part.reset_index(drop=True) for name, part in sets.items()}


def _load_model(model_uri: str) -> Any:
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as exc:
        raise EvaluationError(f"model {model_uri!r}: cannot be loaded: {exc}") from exc


def _check_run(run_id: str) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient().get_run(run_id)
    except MlflowException as exc:
        raise EvaluationError(f"run {run_id!r}: {exc.message}") from exc


# --- outputs ------------------------------------------------------------------------------------------------------


def _write_artifacts(
    out: Path,
    predictions: pd.DataFrame,
    slices: pd.DataFrame,
    summary: dict[str, Any],
    tiles: Path,
    params: EvaluateParams,
) -> None:
    threshold = summary["threshold"]["operating"]

    def arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
        part = predictions[predictions["set"] == name]
        return part["label"].to_numpy(), part["score"].to_numpy()

    write_json(out / METRICS_FILE, jsonable(summary))
    predictions.to_parquet(out / PREDICTIONS_FILE, index=False)
    slices.to_parquet(out / SLICES_FILE, index=False)
    plots.save(
        plots.threshold_figure({"test": arrays("test"), "val": arrays("val")}, threshold, params.target_recall),
        out / THRESHOLD_PLOT,
    )
    plots.save(
        plots.pr_curve_figure({"test": arrays("test"), "natural": arrays("natural")}, threshold), out / PR_CURVE_PLOT
    )
    matrices = {name: binary_metrics(*arrays(name), threshold) for name in ("test", "natural")}
    plots.save(plots.confusion_figure(matrices, threshold), out / CONFUSION_PLOT)
    # Test and natural together: natural adds the real-world no-cloud look-alikes; the cloud patches are shared.
    reported = predictions[predictions["set"].isin(["test", "natural"])]
    false_pos, false_neg = plots.worst_errors(reported, threshold, params.worst_examples)
    ids = [*false_pos["patch_id"], *false_neg["patch_id"]]
    images = plots.render_rgb(load_patches(tiles, ids), params.stretch_percentiles) if ids else np.empty((0, 1, 1, 3))
    rows = {
        "false positives": (images[: len(false_pos)], false_pos["patch_id"].tolist(), false_pos["score"].to_numpy()),
        "false negatives": (images[len(false_pos) :], false_neg["patch_id"].tolist(), false_neg["score"].to_numpy()),
    }
    plots.save(plots.worst_errors_figure(rows, params.worst_examples), out / WORST_ERRORS_PLOT)


def _dataset(manifest: Path, lineage: Lineage) -> Any:
    """The whole manifest as an MLflow dataset, named and digested as tasks.train logs its training input (the digest
    is of the content), so a model's own evaluation data is recognised wherever the file lives."""
    import mlflow.data

    from tasks.lib.training_runs import dataset_name

    frame = pd.read_parquet(manifest)
    return mlflow.data.from_pandas(
        frame, source=str(manifest.resolve()), name=dataset_name(manifest, lineage), targets="label"
    )


def _check_own_data(run_id: str, dataset: Any, manifest: Path) -> None:
    trained = training_digests(run_id)
    if trained and dataset.digest not in trained:
        raise EvaluationError(
            f"run {run_id} was trained on other data than {manifest} (dataset digest {dataset.digest}, trained on "
            f"{', '.join(sorted(trained))}): an evaluation on other data is not logged over the training run's record; "
            "log it as an evaluation run of its own (log_evaluation, what the CLI does)"
        )


def _log_to_run(
    run_id: str,
    directory: Path,
    metrics: dict[str, float],
    tags: dict[str, str],
    model_id: str | None,
    dataset: Any,
) -> None:
    """Add metrics, tags and the evaluation/ artifacts to an existing run (active or finished) without reopening it
    (no active-run state is touched). The metrics are linked to the logged model and the dataset: the run's own input
    of the same content when it has one (its training data), else `dataset`, logged as an `evaluation` input."""
    import mlflow
    from mlflow.entities import DatasetInput, InputTag, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    client.log_artifacts(run_id, str(directory), artifact_path=EVALUATION_DIR)
    inputs = client.get_run(run_id).inputs
    present = [i.dataset for i in (inputs.dataset_inputs if inputs else []) if i.dataset.digest == dataset.digest]
    if present:
        linked = present[0]
    else:
        client.log_inputs(
            run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), [InputTag(TAG_DATA_CONTEXT, DATA_CONTEXT)])]
        )
        linked = dataset
    stamp = int(time.time() * 1000)
    numbers = {key: float(value) for key, value in metrics.items()}
    mlflow.log_metrics(numbers, run_id=run_id, timestamp=stamp, model_id=model_id, dataset=linked, synchronous=True)
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])


def _evaluation_run(model: ModelRef, dataset: Any, manifest: Path, lineage: Lineage) -> str:
    """A new run of kind `evaluation` in the model's experiment, tagged with the model it evaluates; its id."""
    from mlflow.tracking import MlflowClient

    label = f"{model.registered_name} v{model.version}" if model.version else (model.model_id or model.uri)
    tags = {
        **{key: value for key, value in lineage.tags().items() if value},
        TAG_KIND: KIND_EVALUATION,
        TAG_TRAINING_RUN: model.run_id,
        TAG_MODEL_ID: model.model_id or "",
        TAG_REGISTERED_MODEL: model.registered_name,
        TAG_MODEL_VERSION: model.version,
        TAG_NOTE: (
            f"Evaluation of {model.uri} ({label}, trained in run {model.run_id}) on {manifest}. The training run keeps "
            "its own evaluation."
        ),
    }
    run = MlflowClient().create_run(model.experiment_id, tags=tags, run_name=f"evaluate {label} on {dataset.name}")
    return run.info.run_id


def evaluate(
    *,
    model_uri: str,
    manifest: Path,
    tiles: Path,
    params: EvaluateParams,
    log_to_run: str | None,
    log_evaluation: bool = False,
) -> Evaluation:
    """Evaluate a classifier on a sample set's val and test splits and its natural set; optionally log the results.

    Args:
        model_uri: a pyfunc model keeping the tasks.lib.tracking contract (runs:/…, models:/name@alias, …).
        manifest: a sample manifest; its val split picks the threshold, test and the `natural.parquet` beside it
            are reported.
        tiles: the tile step's output holding those patches.
        params: the `evaluate` section.
        log_to_run: the model's training run, to add its own evaluation to (metrics, tags and `evaluation/`
            artifacts; the training DAG's evaluate step). Refused when the run records the data it was trained on and
            `manifest` is other data. None logs nothing, unless `log_evaluation` (the gate re-evaluates models so).
        log_evaluation: log the evaluation wherever it belongs (instead of `log_to_run`): to the model's training run
            when `manifest` is the data the run records as its training input, else to a new run of kind
            `evaluation` linked to the model. The training run's record is then never written over.

    Raises:
        EvaluationError: a missing file or column, no val or test split, one class only in val, patches missing from
            the tiles, an unknown run or model, data that is not the run's own for `log_to_run`, both ways of
            logging asked for, or model output that breaks the contract.
    """
    if log_to_run is not None and log_evaluation:
        raise EvaluationError(
            f"log_to_run={log_to_run!r} and log_evaluation: ask for one (log_evaluation finds the run by itself)"
        )
    natural = manifest.parent / NATURAL_FILE
    sets = _load_sets(manifest, tiles, params.slice_columns)
    # Everything about where to log is settled before the slow part.
    model: ModelRef | None = None
    dataset = lineage = None
    kind = None
    if log_to_run is not None:
        _check_run(log_to_run)
    if log_to_run is not None or log_evaluation:
        lineage = Lineage.from_environment()
        dataset = _dataset(manifest, lineage)
        model = resolve_model(model_uri)
        if log_to_run is not None:
            _check_own_data(log_to_run, dataset, manifest)
            kind = "training"
        else:
            kind = "training" if dataset.digest in training_digests(model.run_id) else KIND_EVALUATION
    log.info(
        "evaluating %s on %s (val %d, test %d, natural %d patches) with tiles %s, target recall %g, batch %d",
        model_uri,
        manifest,
        *(len(sets[name]) for name in SETS),
        tiles,
        params.target_recall,
        params.batch_size,
    )
    loaded = _load_model(model_uri)
    frame = pd.concat([part.assign(set=name) for name, part in sets.items()], ignore_index=True)
    unique = frame.drop_duplicates("patch_id")  # natural's cloud patches are the test split's: predict them once
    try:
        scores = predict(loaded, unique, tiles, params.batch_size)
    except EvaluationError as exc:
        raise EvaluationError(f"model {model_uri!r}: {exc}") from exc
    frame["score"] = frame["patch_id"].map(pd.Series(scores, index=unique["patch_id"].to_numpy()))
    predictions = frame[["patch_id", "set", "label", "score", *dict.fromkeys(params.slice_columns)]]

    threshold, metrics, slice_frame = assess(
        predictions, params.target_recall, params.slice_columns, params.threshold_confidence
    )

    run_id = None
    if model is not None and dataset is not None and lineage is not None:
        if kind == KIND_EVALUATION:
            run_id = _evaluation_run(model, dataset, manifest, lineage)
        else:
            run_id = log_to_run or model.run_id
    summary = {
        "model_uri": model_uri,
        "run_id": run_id,
        "logged_to": kind,
        "threshold": {
            "operating": threshold,
            "default": DEFAULT_THRESHOLD,
            "target_recall": params.target_recall,
            "confidence": params.threshold_confidence,
            "chosen_on": "val",
            "rule": "score >= threshold is cloud; operating = highest threshold with val recall >= target_recall"
            + (
                ""
                if params.threshold_confidence is None
                else " and P(recall on new patches >= target_recall) >= confidence (order statistics of val's cloud "
                "scores)"
            ),
        },
        "metrics": metrics,
        "data": {
            "manifest": str(manifest.resolve()),
            "natural": str(natural.resolve()),
            "tiles": str(tiles.resolve()),
            "manifest_sha256": file_digest(manifest, "sha256"),
            "natural_sha256": file_digest(natural, "sha256"),
            "counts": {name: {"patches": len(part), "cloud": int(part["label"].sum())} for name, part in sets.items()},
        },
        "params": params.model_dump(mode="json"),
        "artifacts": list(ARTIFACTS),
    }
    if run_id is not None and model is not None:
        from mlflow.tracking import MlflowClient

        tags = {
            TAG_MODEL_URI: model_uri,
            TAG_MANIFEST: summary["data"]["manifest"],
            TAG_NATURAL: summary["data"]["natural"],
            TAG_TILES: summary["data"]["tiles"],
            TAG_MANIFEST_SHA256: summary["data"]["manifest_sha256"],
            TAG_NATURAL_SHA256: summary["data"]["natural_sha256"],
        }
        try:
            with tempfile.TemporaryDirectory(prefix="cloudscreen-evaluate-") as tmp:
                _write_artifacts(Path(tmp), predictions, slice_frame, summary, tiles, params)
                _log_to_run(run_id, Path(tmp), metrics, tags, model.model_id, dataset)
        except BaseException:
            if kind == KIND_EVALUATION:
                MlflowClient().set_terminated(run_id, "FAILED")
            raise
        if kind == KIND_EVALUATION:
            MlflowClient().set_terminated(run_id, "FINISHED")
    log.info(
        "%s: operating threshold %.4f (val recall %.4f); test recall %.4f precision %.4f ROC-AUC %.4f; natural "
        "recall %.4f precision %.4f%s",
        model_uri,
        threshold,
        metrics["val_op_recall"],
        metrics["test_op_recall"],
        metrics["test_op_precision"],
        metrics["test_roc_auc"],
        metrics["natural_op_recall"],
        metrics["natural_op_precision"],
        f"; logged to the {kind} run {run_id}" if run_id else "",
    )
    return Evaluation(
        model_uri=model_uri,
        run_id=run_id,
        kind=kind,
        threshold=threshold,
        target_recall=params.target_recall,
        metrics=metrics,
        predictions=predictions.reset_index(drop=True),
        slices=slice_frame,
        summary=summary,
    )


SUMMARY_METRICS = (
    OPERATING_THRESHOLD,
    "val_op_recall",
    "test_op_recall",
    "test_op_precision",
    "test_roc_auc",
    "natural_op_recall",
    "natural_op_precision",
)


def main() -> None:
    p = cli.parser(__doc__.splitlines()[0])
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--run-id", help="evaluate this run's model (runs:/ID/model)")
    model.add_argument("--model", help="evaluate models:/NAME@ALIAS or models:/NAME/VERSION")
    model.add_argument(
        "--run-file", type=Path, help="evaluate the run named in this JSON (what tasks.train --xcom-out writes)"
    )
    p.add_argument("--manifest", type=Path, required=True, help="a sample manifest.parquet (natural.parquet beside)")
    p.add_argument("--tiles", type=Path, required=True, help="the tile step's output holding the patches")
    p.add_argument("--out", type=Path, help="also write the summary printed on stdout here (DVC metrics)")
    p.epilog = (
        "Logged to the model's training run when --manifest is the data it was trained on (its own evaluation), "
        "else to a new run of kind `evaluation` linked to the model; the training run's record is never written over."
    )
    args = p.parse_args()
    cli.configure_logging(args.verbose)
    params = load_section("evaluate", EvaluateParams, args.params, args.overrides)
    run_id = _run_from_file(args.run_file) if args.run_file else args.run_id
    model_uri = run_model_uri(run_id) if run_id else args.model
    result = evaluate(
        model_uri=model_uri,
        manifest=args.manifest,
        tiles=args.tiles,
        params=params,
        log_to_run=None,
        log_evaluation=True,
    )
    summary = {"model_uri": result.model_uri, "run_id": result.run_id, "logged_to": result.kind}
    summary |= {"target_recall": result.target_recall} | {name: result.metrics[name] for name in SUMMARY_METRICS}
    if args.out:
        write_json(args.out, jsonable(summary))
    print(json.dumps(jsonable(summary), indent=2))


def _run_from_file(path: Path) -> str:
    try:
        run_id = json.loads(path.read_text()).get("run_id")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise EvaluationError(f"{path}: not a training result (JSON with a run_id): {exc}") from exc
    if not run_id:
        raise EvaluationError(f"{path}: no run_id in this training result")
    return str(run_id)


if __name__ == "__main__":
    cli.run(main)
