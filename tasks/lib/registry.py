"""The MLflow side of the gate: registry versions and aliases, the evaluation a run holds, the verdict recorded on
it, and the tags that chain each champion to the one it replaced (what a rollback walks)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.lib.errors import GateError
from tasks.lib.gate_rules import COST_METRIC, Verdict
from tasks.lib.metrics import OPERATING_THRESHOLD
from tasks.lib.tracking import (
    CHAMPION,
    EVALUATION_DIR,
    GATE_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    PREVIOUS_CHAMPION,
    TAG_GATE_DECISION,
    TAG_GATE_REASONS,
    TAG_OPERATING_THRESHOLD,
    TAG_PREFIX,
)

TAG_GATE_REPLACED = f"{TAG_PREFIX}gate.replaced"  # on a promoted version: the champion it replaced, "" for none
TAG_GATE_BY = f"{TAG_PREFIX}gate.by"  # on a force-promoted version: who
TAG_GATE_OVERRIDE = f"{TAG_PREFIX}gate.override_reason"  # ... and why
TAG_GATE_ROLLED_BACK = f"{TAG_PREFIX}gate.rolled_back"  # on a version rolled back from: by whom and why
_TAG_MAX_CHARS = 5000  # MLflow caps tag values (8,000 characters in 3.x); reasons beyond this are cut


def client() -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def mlflow_errors() -> type[Exception]:
    from mlflow.exceptions import MlflowException

    return MlflowException


def aliases(client: Any, name: str) -> dict[str, str]:
    try:
        return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}
    except mlflow_errors() as exc:
        raise GateError(f"registered model {name!r}: {exc.message}") from exc


def run_version(client: Any, name: str, run_id: str) -> str:
    """The version of `name` registered from the run (the newest, should there be several)."""
    try:
        client.get_run(run_id)
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except mlflow_errors() as exc:
        raise GateError(f"run {run_id!r}: {exc.message}") from exc
    if not versions:
        raise GateError(
            f"run {run_id!r} has no version of registered model {name!r}: the gate judges what tasks.train "
            "registered (train.registered_model)"
        )
    return str(max(int(v.version) for v in versions))


def download(client: Any, run_id: str, path: str, dst: Path) -> Path | None:
    try:
        return Path(client.download_artifacts(run_id, path, str(dst)))
    except (mlflow_errors(), OSError):
        return None


def recorded_evaluation(client: Any, run_id: str) -> tuple[dict[str, Any], pd.DataFrame]:
    """metrics.json (NaN restored) and the predictions tasks.evaluate logged to the run."""
    with tempfile.TemporaryDirectory(prefix="cloudscreen-gate-") as tmp:
        summary_path = download(client, run_id, f"{EVALUATION_DIR}/{METRICS_FILE}", Path(tmp))
        predictions_path = download(client, run_id, f"{EVALUATION_DIR}/{PREDICTIONS_FILE}", Path(tmp))
        if summary_path is None or predictions_path is None:
            missing = METRICS_FILE if summary_path is None else PREDICTIONS_FILE
            raise GateError(
                f"run {run_id} was never evaluated (no {EVALUATION_DIR}/{missing}): run `python -m tasks.evaluate "
                f"--run-id {run_id} --manifest M --tiles DIR` first"
            )
        summary = json.loads(summary_path.read_text())
        predictions = pd.read_parquet(predictions_path)
    for key in ("metrics", "data", "params"):
        if not isinstance(summary.get(key), dict):
            raise GateError(f"run {run_id}: {EVALUATION_DIR}/{METRICS_FILE} lacks {key!r}; evaluate the run again")
    summary["metrics"] = {k: float("nan") if v is None else float(v) for k, v in summary["metrics"].items()}
    if OPERATING_THRESHOLD not in summary["metrics"]:
        raise GateError(f"run {run_id}: {EVALUATION_DIR}/{METRICS_FILE} lacks {OPERATING_THRESHOLD}; evaluate it again")
    return summary, predictions


def run_cost(client: Any, run_id: str | None) -> dict[str, float]:
    if not run_id:
        return {}
    try:
        metrics = client.get_run(run_id).data.metrics
    except mlflow_errors():
        return {}
    return {COST_METRIC: float(metrics[COST_METRIC])} if COST_METRIC in metrics else {}


def record(client: Any, verdict: Verdict) -> None:
    """gate.json and the decision tags on the challenger's run."""
    from mlflow.entities import RunTag

    client.log_text(verdict.run_id, json.dumps(verdict.to_json(), indent=2) + "\n", GATE_FILE)
    tags = {TAG_GATE_DECISION: verdict.decision, TAG_GATE_REASONS: _tag_text(verdict.reasons)}
    client.log_batch(verdict.run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def _tag_text(reasons: tuple[str, ...]) -> str:
    text = "\n".join(reasons)
    return text if len(text) <= _TAG_MAX_CHARS else text[: _TAG_MAX_CHARS - 1] + "…"


def promote(client: Any, verdict: Verdict, version: str, replaced: str | None, threshold: float) -> None:
    """Tag the new champion with the decision, its predecessor and its operating threshold, then move the aliases
    (the `replaced` tags are the chain tasks.gate's rollback walks; the threshold is what screening and serving
    decide at)."""
    name = verdict.registered_model
    tags = {
        TAG_GATE_DECISION: verdict.decision,
        TAG_GATE_REASONS: _tag_text(verdict.reasons),
        TAG_GATE_REPLACED: replaced or "",
        TAG_OPERATING_THRESHOLD: repr(float(threshold)),
    }
    if verdict.forced:
        tags |= {TAG_GATE_BY: verdict.forced["by"], TAG_GATE_OVERRIDE: verdict.forced["reason"]}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if replaced:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, replaced)
    else:
        client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)  # a stale one would break the chain
    client.set_registered_model_alias(name, CHAMPION, version)
