"""Decide whether a challenger replaces the champion in the model registry, say why, and roll a promotion back.

`python -m tasks.gate --run-id ID` judges the model version registered from run ID (the challenger) against the
version under the registry alias `champion`, and writes the verdict, `gate.json`, to the challenger's run (artifact,
plus the tags `cloudscreen.gate.decision` and `cloudscreen.gate.reasons`) and to stdout. Every decision exits 0;
only an error (unknown run, a run never evaluated, unreadable data) exits non-zero (2).

Decisions:
- `promote`: a champion exists and every rule passes; the challenger becomes the champion.
- `bootstrap`: there is no champion yet and the absolute rules (floors, slice floors, cost ceiling) pass; the
  challenger becomes the first champion. Relative rules (non-regression, the paired test) need a champion.
- `reject`: some rule failed, or no rule is configured: a gate without quality rules never promotes, and a first
  model is not promoted without an absolute rule. The registry is not touched at all (no alias, no tag).
- `forced`: `--force --reason TEXT` promotes whatever the rules say; the verdict names who (--by, else the Airflow
  task context, else $USER) and why, and lists the rule failures the override overrode.

Fair comparison: the challenger's numbers come from its run (what tasks.evaluate logged); the champion is
re-evaluated now, with the challenger's evaluation settings, on the data the challenger was evaluated on (or on
--manifest/--tiles), so a data refresh never compares two models on different patches. When that data is not the
data the challenger's logged evaluation saw (another manifest, or the file changed since), the challenger is
re-evaluated too. Neither re-evaluation is logged anywhere but in gate.json.

Rules (the `gate` section of params.yaml; metric names are tasks.evaluate's, e.g. `test_op_recall`):
- floors: the challenger's metric must be at least the bound;
- non_regression: the challenger may trail the champion by at most the tolerance (log_loss: exceed it by at most);
- slice_floors: on every test slice (tasks.evaluate's slice columns, e.g. country=Finland) with at least
  `min_slice_patches` patches, each named metric at the operating threshold must be at least the bound; a metric
  undefined on a slice (recall of a slice without cloud) is not checked;
- paired_test: McNemar's test on the test patches, each model classifying at its own operating threshold. With b the
  patches only the challenger gets right and c those only the champion gets right, the two-sided p-value is the
  exact binomial one (b ~ Binomial(b + c, 1/2)) below EXACT_BELOW discordant patches and the continuity-corrected
  chi-squared one, (|b - c| - 1)² / (b + c) on 1 degree of freedom, from there. A model is significantly better when
  p < alpha and b > c, significantly worse when p < alpha and c > b. `better` (the default, for unattended scheduled
  retraining) promotes only a significantly better challenger: a retrain that merely ties within noise keeps the
  champion, so a schedule cannot drift the registry by luck. `not_worse` promotes any challenger that is not
  significantly worse (for when a newer model is preferred when equal, e.g. trained on fresher data). `off` skips it;
- max_cost_usd: the challenger run's `cost_usd` metric (logged by tasks.train) may not exceed it; a run without
  `cost_usd` fails the rule with a reason saying so.
Each failing rule adds a reason naming the metric, the challenger's value, the bound and the champion's value.

Registry: a promotion of version V over champion C tags V with the decision, its reasons, who and why when forced,
and the tag `cloudscreen.gate.replaced` = C ("" when V is the first champion); then it points `previous-champion` at
C (removes it when there is no C) and `champion` at V. A rejection leaves its verdict on the run only.

Rollback: the `replaced` tags chain each champion to the one before it. `python -m tasks.gate rollback` points
`champion` back at C (V's `replaced`) and `previous-champion` at C's own `replaced` (removes it when C has none), and
tags V `cloudscreen.gate.rolled_back` with who and why. Each rollback therefore undoes one more promotion, walking the
chain back; rolling back the first champion is an error. A version made champion outside the gate (no `replaced`
tag) rolls back to whatever `previous-champion` names. Running the gate again on a run whose version is already
champion returns the verdict recorded on the run and changes nothing (an Airflow retry after a promotion).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import pandas as pd
from pydantic import Field, ValidationError, field_validator

from tasks.evaluate import (
    METRICS_FILE,
    OPERATING_THRESHOLD,
    PREDICTIONS_FILE,
    SUMMARY_METRICS,
    EvaluateParams,
    evaluate,
    slice_metrics,
)
from tasks.lib import cli
from tasks.lib.config import StepParams, load_section
from tasks.lib.errors import EvaluationError, GateError
from tasks.lib.files import file_digest, jsonable
from tasks.lib.tracking import (
    CHAMPION,
    EVALUATION_DIR,
    GATE_FILE,
    PREVIOUS_CHAMPION,
    TAG_GATE_DECISION,
    TAG_GATE_REASONS,
    TAG_PREFIX,
)
from tasks.sample import NATURAL_FILE

log = logging.getLogger(__name__)

PROMOTE = "promote"
REJECT = "reject"
BOOTSTRAP = "bootstrap"
FORCED = "forced"
PROMOTING = (PROMOTE, BOOTSTRAP, FORCED)  # decisions that move `champion`

TAG_GATE_REPLACED = f"{TAG_PREFIX}gate.replaced"  # on a promoted version: the champion it replaced, "" for none
TAG_GATE_BY = f"{TAG_PREFIX}gate.by"  # on a force-promoted version: who
TAG_GATE_OVERRIDE = f"{TAG_PREFIX}gate.override_reason"  # ... and why
TAG_GATE_ROLLED_BACK = f"{TAG_PREFIX}gate.rolled_back"  # on a version rolled back from: by whom and why

COST_METRIC = "cost_usd"  # logged by tasks.train
EXACT_BELOW = 25  # discordant pairs below which McNemar's p-value is the exact binomial one
TEST_SET = "test"  # the set the paired test and the slice floors read
_TAG_MAX_CHARS = 5000  # MLflow caps tag values (8,000 characters in 3.x); reasons beyond this are cut

_METRIC_NAME = re.compile(
    r"^(val|test|natural)_((t50|op)_(accuracy|precision|recall|f1)|roc_auc|average_precision|log_loss)$"
)
_LOWER_IS_BETTER = ("log_loss",)
SLICE_METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "average_precision")


class GateParams(StepParams):
    floors: dict[str, Annotated[float, Field(ge=0, le=1)]]
    non_regression: dict[str, Annotated[float, Field(ge=0)]]
    slice_floors: dict[str, Annotated[float, Field(ge=0, le=1)]]
    min_slice_patches: int = Field(ge=1)
    paired_test: Literal["better", "not_worse", "off"]
    alpha: float = Field(gt=0, lt=1)
    max_cost_usd: Annotated[float, Field(gt=0)] | None

    @field_validator("floors", "non_regression")
    @classmethod
    def _known_metrics(cls, value: dict[str, float], info: Any) -> dict[str, float]:
        for name in value:
            if not _METRIC_NAME.match(name):
                raise ValueError(
                    f"{name!r} is not a tasks.evaluate metric (SET_AT_METRIC or SET_METRIC, e.g. test_op_recall)"
                )
            if info.field_name == "floors" and name.endswith(_LOWER_IS_BETTER):
                raise ValueError(f"{name!r} is lower-is-better: bound it through non_regression, not a floor")
        return value

    @field_validator("slice_floors")
    @classmethod
    def _known_slice_metrics(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = [name for name in value if name not in SLICE_METRICS]
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: slice floors take {', '.join(SLICE_METRICS)}")
        return value

    @property
    def quality_rules(self) -> bool:
        """Whether any rule about the model's quality is configured (the cost ceiling is not one)."""
        return bool(self.floors or self.non_regression or self.slice_floors or self.paired_test != "off")


# --- pure decision logic ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One model as the gate sees it, on the gate's data."""

    version: str
    run_id: str | None
    metrics: dict[str, float]  # tasks.evaluate's flat names, plus cost_usd when its run recorded one
    slices: pd.DataFrame = field(repr=False)  # slice_metrics of the test set at the model's operating threshold


@dataclass(frozen=True)
class McNemar:
    challenger_only: int  # b: patches only the challenger classifies right
    champion_only: int  # c: patches only the champion classifies right
    statistic: float  # exact: min(b, c); chi2: (|b - c| - 1)² / (b + c)
    p_value: float  # two-sided
    method: Literal["exact", "chi2"]

    def better(self, alpha: float) -> bool:
        return self.p_value < alpha and self.challenger_only > self.champion_only

    def worse(self, alpha: float) -> bool:
        return self.p_value < alpha and self.champion_only > self.challenger_only


@dataclass(frozen=True)
class Paired:
    """McNemar's test of two models on the same test patches."""

    patches: int
    test: McNemar


@dataclass(frozen=True)
class Check:
    """One rule applied: `message` is the human-readable sentence the verdict's reasons are made of."""

    rule: Literal["rules", "floor", "non_regression", "slice_floor", "paired_test", "cost"]
    metric: str
    passed: bool
    message: str


def mcnemar(challenger_only: int, champion_only: int) -> McNemar:
    """McNemar's two-sided test from the two discordant counts (see the module docstring for the method choice).

    No discordant pair at all gives p = 1: nothing tells the models apart.
    """
    from scipy import stats

    b, c = int(challenger_only), int(champion_only)
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got {b} and {c}")
    n = b + c
    if n == 0:
        return McNemar(b, c, 0.0, 1.0, "exact")
    if n < EXACT_BELOW:
        p = stats.binomtest(b, n, 0.5, alternative="two-sided").pvalue
        return McNemar(b, c, float(min(b, c)), float(min(p, 1.0)), "exact")
    statistic = (abs(b - c) - 1) ** 2 / n
    return McNemar(b, c, float(statistic), float(stats.chi2.sf(statistic, 1)), "chi2")


def pair(
    challenger: pd.DataFrame, champion: pd.DataFrame, challenger_threshold: float, champion_threshold: float
) -> Paired:
    """McNemar's test on the test patches of two prediction frames (tasks.evaluate's predictions: patch_id, set,
    label, score), each model deciding at its own threshold (score >= threshold is cloud).

    Raises:
        GateError: the two frames do not hold the same test patches with the same labels.
    """

    def test_rows(frame: pd.DataFrame) -> pd.DataFrame:
        rows = frame.loc[frame["set"] == TEST_SET, ["patch_id", "label", "score"]]
        return rows.drop_duplicates("patch_id").set_index("patch_id").sort_index()

    a, b = test_rows(challenger), test_rows(champion)
    if not a.index.equals(b.index):
        missing = a.index.symmetric_difference(b.index)
        raise GateError(
            f"the two evaluations cover different test patches ({len(missing)} differ, e.g. {missing[0]}): "
            "they cannot be paired"
        )
    if not a["label"].astype(int).equals(b["label"].astype(int)):
        raise GateError("the two evaluations label the same test patches differently: they cannot be paired")
    label = a["label"].astype(int)
    right_a = (a["score"] >= challenger_threshold).astype(int) == label
    right_b = (b["score"] >= champion_threshold).astype(int) == label
    return Paired(len(a), mcnemar(int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())))


def slice_table(predictions: pd.DataFrame, threshold: float, columns: tuple[str, ...] | list[str]) -> pd.DataFrame:
    """Slice metrics of the test set at `threshold` by each of `columns` (tasks.evaluate's slice_columns)."""
    return slice_metrics(predictions[predictions["set"] == TEST_SET], threshold, columns)


def _value(metrics: dict[str, float], name: str) -> float | None:
    value = metrics.get(name)
    return None if value is None else float(value)


def _show(value: float | None, money: bool = False) -> str:
    if value is None:
        return "not recorded"
    if math.isnan(value):
        return "undefined"
    return f"${value:.2f}" if money else f"{value:.4f}"


def _champion_says(champion: Candidate | None, name: str, money: bool = False) -> str:
    if champion is None:
        return "no champion"
    return f"champion {_show(_value(champion.metrics, name), money)}"


def _floor_checks(challenger: Candidate, champion: Candidate | None, rules: GateParams) -> list[Check]:
    checks = []
    for name, bound in rules.floors.items():
        value = _value(challenger.metrics, name)
        theirs = _champion_says(champion, name)
        if value is None or math.isnan(value):
            message = f"{name} is {_show(value)} for the challenger, so the floor {bound:.4f} is not met ({theirs})."
            checks.append(Check("floor", name, False, message))
        elif value < bound:
            checks.append(Check("floor", name, False, f"{name} {value:.4f} is below the floor {bound:.4f} ({theirs})."))
        else:
            checks.append(Check("floor", name, True, f"{name} {value:.4f} meets the floor {bound:.4f} ({theirs})."))
    return checks


def _non_regression_checks(challenger: Candidate, champion: Candidate, rules: GateParams) -> list[Check]:
    checks = []
    for name, tolerance in rules.non_regression.items():
        value, base = _value(challenger.metrics, name), _value(champion.metrics, name)
        if base is None or math.isnan(base):
            message = f"{name} of the champion is {_show(base)}: the challenger's {_show(value)} is not compared."
            checks.append(Check("non_regression", name, True, message))
            continue
        lower_better = name.endswith(_LOWER_IS_BETTER)
        bound = base + tolerance if lower_better else base - tolerance
        if value is None or math.isnan(value):
            message = (
                f"{name} is {_show(value)} for the challenger, so it cannot be shown within {tolerance:.4f} of the "
                f"champion's {base:.4f} (bound {bound:.4f})."
            )
            checks.append(Check("non_regression", name, False, message))
        elif (value > bound) if lower_better else (value < bound):
            message = (
                f"{name} {value:.4f} regressed beyond the tolerance {tolerance:.4f} from the champion's {base:.4f} "
                f"(bound {bound:.4f})."
            )
            checks.append(Check("non_regression", name, False, message))
        else:
            message = f"{name} {value:.4f} is within {tolerance:.4f} of the champion's {base:.4f} or better."
            checks.append(Check("non_regression", name, True, message))
    return checks


def _slice_checks(challenger: Candidate, champion: Candidate | None, rules: GateParams) -> list[Check]:
    if not rules.slice_floors:
        return []
    slices = challenger.slices
    large = slices[slices["patches"] >= rules.min_slice_patches]
    theirs_by_slice = {}
    if champion is not None:
        theirs_by_slice = {(r["column"], r["value"]): r for r in champion.slices.to_dict("records")}
    checks = []
    for row in large.to_dict("records"):
        theirs = theirs_by_slice.get((row["column"], row["value"]))
        for name, bound in rules.slice_floors.items():
            value = float(row[name])
            if math.isnan(value) or value >= bound:
                continue
            champion_part = "no champion" if champion is None else f"champion {_show(theirs and float(theirs[name]))}"
            message = (
                f"slice {row['column']}={row['value']} ({int(row['patches'])} test patches): {name} at the operating "
                f"threshold {value:.4f} is below the slice floor {bound:.4f} ({champion_part})."
            )
            checks.append(Check("slice_floor", f"{TEST_SET}_op_{name}[{row['column']}={row['value']}]", False, message))
    if not checks:
        floors = ", ".join(f"{name} >= {bound:.4f}" for name, bound in rules.slice_floors.items())
        if large.empty:
            message = f"no test slice has {rules.min_slice_patches} patches or more: the slice floors ({floors}) apply"
            message += " to none."
        else:
            message = f"all {len(large)} test slices of {rules.min_slice_patches} patches or more meet {floors}."
        checks.append(Check("slice_floor", "slices", True, message))
    return checks


def _paired_check(paired: Paired, rules: GateParams) -> Check:
    t = paired.test
    detail = (
        f"McNemar's test on {paired.patches} paired test patches: the challenger alone is right on "
        f"{t.challenger_only}, the champion alone on {t.champion_only}; {t.method} p = {t.p_value:.4g}"
    )
    if t.worse(rules.alpha):
        message = f"The challenger is significantly worse than the champion ({detail} < alpha {rules.alpha:g})."
        return Check("paired_test", "mcnemar_p", False, message)
    if rules.paired_test == "better":
        if t.better(rules.alpha):
            return Check("paired_test", "mcnemar_p", True, f"The challenger is significantly better ({detail}).")
        message = (
            f"The challenger is not significantly better than the champion ({detail}; promotion needs p < "
            f"{rules.alpha:g} with the challenger alone right more often): a difference within noise does not replace "
            "a champion."
        )
        return Check("paired_test", "mcnemar_p", False, message)
    return Check("paired_test", "mcnemar_p", True, f"The challenger is not significantly worse ({detail}).")


def _cost_check(challenger: Candidate, champion: Candidate | None, ceiling: float) -> Check:
    value = _value(challenger.metrics, COST_METRIC)
    theirs = _champion_says(champion, COST_METRIC, money=True)
    if value is None or math.isnan(value):
        message = (
            f"{COST_METRIC} is not recorded on the challenger's run, so the cost ceiling ${ceiling:.2f} cannot be "
            f"checked ({theirs})."
        )
        return Check("cost", COST_METRIC, False, message)
    if value > ceiling:
        message = f"{COST_METRIC} ${value:.2f} exceeds the ceiling ${ceiling:.2f} ({theirs})."
        return Check("cost", COST_METRIC, False, message)
    return Check(
        "cost", COST_METRIC, True, f"{COST_METRIC} ${value:.2f} is within the ceiling ${ceiling:.2f} ({theirs})."
    )


def decide(
    challenger: Candidate, champion: Candidate | None, paired: Paired | None, rules: GateParams
) -> tuple[str, tuple[Check, ...]]:
    """Apply the rules: `promote` or `bootstrap` (no champion) when every check passes, else `reject`.

    Args:
        challenger, champion: the two models on the same data; champion None when there is none yet.
        paired: McNemar's test of the two on the test patches; needed when there is a champion and the paired test
            is on.
    """
    if champion is not None and paired is None and rules.paired_test != "off":
        raise ValueError("a paired test is configured and there is a champion, but no paired result was given")
    checks: list[Check] = []
    if not rules.quality_rules:
        checks.append(
            Check(
                "rules",
                "",
                False,
                "No quality rule is configured (gate.floors, gate.non_regression and gate.slice_floors are empty and "
                "gate.paired_test is off): a gate without rules never promotes.",
            )
        )
    elif champion is None and not (rules.floors or rules.slice_floors):
        checks.append(
            Check(
                "rules",
                "",
                False,
                "There is no champion to compare with and no absolute rule (gate.floors, gate.slice_floors) is "
                "configured: a first model is not promoted unjudged.",
            )
        )
    checks += _floor_checks(challenger, champion, rules)
    if champion is not None:
        checks += _non_regression_checks(challenger, champion, rules)
    checks += _slice_checks(challenger, champion, rules)
    if champion is not None and paired is not None and rules.paired_test != "off":
        checks.append(_paired_check(paired, rules))
    if rules.max_cost_usd is not None:
        checks.append(_cost_check(challenger, champion, rules.max_cost_usd))
    if any(not c.passed for c in checks):
        return REJECT, tuple(checks)
    return (PROMOTE if champion is not None else BOOTSTRAP), tuple(checks)


def reasons_for(checks: tuple[Check, ...], forced: dict[str, str] | None = None) -> tuple[str, ...]:
    """The verdict's sentences: the failed checks when any failed, else every check (why it passed); a forced
    promotion (`forced`: by, reason) leads with the override and lists the failures it overrode."""
    failed = [c.message for c in checks if not c.passed]
    if forced is not None:
        head = f"Promotion forced by {forced['by']}: {forced['reason']}"
        if not failed:
            return (head, "No rule failed: the rules alone would have promoted this challenger.")
        return (head, *(f"Overridden: {message}" for message in failed))
    return tuple(failed) if failed else tuple(c.message for c in checks)


# --- results ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What the gate decided and why; `to_json()` is gate.json."""

    decision: str
    reasons: tuple[str, ...]
    registered_model: str
    run_id: str
    challenger: dict[str, Any]  # version, run_id and metrics
    champion: dict[str, Any] | None  # the same for the champion, re-evaluated; None when there was none
    rules: dict[str, Any]  # the gate section applied
    checks: tuple[dict[str, Any], ...]  # every rule applied: rule, metric, passed, message
    paired: dict[str, Any] | None  # McNemar's test, when a champion was compared
    data: dict[str, Any]  # manifest, tiles and whether the challenger was re-evaluated on them
    forced: dict[str, str] | None  # by, reason
    registry: dict[str, Any]  # aliases after the gate, and whether it changed them

    @property
    def promoted(self) -> bool:
        return self.decision in PROMOTING

    def to_json(self) -> dict[str, Any]:
        return jsonable(asdict(self))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Verdict:
        values = {name: data.get(name) for name in cls.__dataclass_fields__}
        values["reasons"] = tuple(values["reasons"] or ())
        values["checks"] = tuple(values["checks"] or ())
        return cls(**values)


@dataclass(frozen=True)
class Rollback:
    """A rollback: `rolled_back` was the champion, `champion` is again."""

    registered_model: str
    rolled_back: str
    champion: str
    previous_champion: str | None
    by: str
    reason: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def who(by: str | None = None) -> str:
    """Who acts: `by` when given, else the Airflow task running this (its context variables), else $USER."""
    if by:
        return by
    env = os.environ
    if env.get("AIRFLOW_CTX_DAG_ID"):
        name = f"airflow:{env['AIRFLOW_CTX_DAG_ID']}/{env.get('AIRFLOW_CTX_DAG_RUN_ID', '?')}"
        if env.get("AIRFLOW_CTX_TASK_ID"):
            name += f"/{env['AIRFLOW_CTX_TASK_ID']}"
        return f"{name} (owner {env['AIRFLOW_CTX_DAG_OWNER']})" if env.get("AIRFLOW_CTX_DAG_OWNER") else name
    return env.get("USER") or env.get("LOGNAME") or "unknown"


# --- MLflow I/O ---------------------------------------------------------------------------------------------------


def _client() -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def _mlflow_errors() -> type[Exception]:
    from mlflow.exceptions import MlflowException

    return MlflowException


def _aliases(client: Any, name: str) -> dict[str, str]:
    try:
        return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}
    except _mlflow_errors() as exc:
        raise GateError(f"registered model {name!r}: {exc.message}") from exc


def _run_version(client: Any, name: str, run_id: str) -> str:
    """The version of `name` registered from the run (the newest, should there be several)."""
    try:
        client.get_run(run_id)
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except _mlflow_errors() as exc:
        raise GateError(f"run {run_id!r}: {exc.message}") from exc
    if not versions:
        raise GateError(
            f"run {run_id!r} has no version of registered model {name!r}: the gate judges what tasks.train "
            "registered (train.registered_model)"
        )
    return str(max(int(v.version) for v in versions))


def _download(client: Any, run_id: str, path: str, dst: Path) -> Path | None:
    try:
        return Path(client.download_artifacts(run_id, path, str(dst)))
    except (_mlflow_errors(), OSError):
        return None


def _recorded_evaluation(client: Any, run_id: str) -> tuple[dict[str, Any], pd.DataFrame]:
    """metrics.json (NaN restored) and the predictions tasks.evaluate logged to the run."""
    with tempfile.TemporaryDirectory(prefix="cloudscreen-gate-") as tmp:
        summary_path = _download(client, run_id, f"{EVALUATION_DIR}/{METRICS_FILE}", Path(tmp))
        predictions_path = _download(client, run_id, f"{EVALUATION_DIR}/{PREDICTIONS_FILE}", Path(tmp))
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


def _run_cost(client: Any, run_id: str | None) -> dict[str, float]:
    if not run_id:
        return {}
    try:
        metrics = client.get_run(run_id).data.metrics
    except _mlflow_errors():
        return {}
    return {COST_METRIC: float(metrics[COST_METRIC])} if COST_METRIC in metrics else {}


def _candidate(
    version: str, run_id: str | None, metrics: dict[str, float], predictions: pd.DataFrame, columns: tuple[str, ...]
) -> Candidate:
    return Candidate(version, run_id, metrics, slice_table(predictions, metrics[OPERATING_THRESHOLD], columns))


def _evaluate(
    model_uri: str, what: str, manifest: Path, tiles: Path, params: EvaluateParams
) -> tuple[dict[str, float], pd.DataFrame]:
    try:
        result = evaluate(model_uri=model_uri, manifest=manifest, tiles=tiles, params=params, log_to_run=None)
    except EvaluationError as exc:
        raise GateError(f"re-evaluating the {what} ({model_uri}) on {manifest}: {exc}") from exc
    return result.metrics, result.predictions


def _same_data(summary: dict[str, Any], manifest: Path) -> bool:
    """Whether `manifest` (and the natural set beside it) are byte for byte what the recorded evaluation read."""
    natural = manifest.parent / NATURAL_FILE
    recorded = summary["data"]
    return (
        natural.is_file()
        and file_digest(manifest, "sha256") == recorded.get("manifest_sha256")
        and file_digest(natural, "sha256") == recorded.get("natural_sha256")
    )


def _report(candidate: Candidate, rules: GateParams) -> dict[str, Any]:
    names = dict.fromkeys([*SUMMARY_METRICS, *rules.floors, *rules.non_regression, COST_METRIC])
    metrics = {name: candidate.metrics[name] for name in names if name in candidate.metrics}
    return {"version": candidate.version, "run_id": candidate.run_id, **metrics}


def _record(client: Any, verdict: Verdict) -> None:
    """gate.json and the decision tags on the challenger's run."""
    from mlflow.entities import RunTag

    client.log_text(verdict.run_id, json.dumps(verdict.to_json(), indent=2) + "\n", GATE_FILE)
    tags = {TAG_GATE_DECISION: verdict.decision, TAG_GATE_REASONS: _tag_text(verdict.reasons)}
    client.log_batch(verdict.run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def _tag_text(reasons: tuple[str, ...]) -> str:
    text = "\n".join(reasons)
    return text if len(text) <= _TAG_MAX_CHARS else text[: _TAG_MAX_CHARS - 1] + "…"


def _promote(client: Any, verdict: Verdict, version: str, replaced: str | None) -> None:
    """Tag the new champion with the decision and its predecessor, then move the aliases (see the module
    docstring: the `replaced` tags are the chain rollback walks)."""
    name = verdict.registered_model
    tags = {
        TAG_GATE_DECISION: verdict.decision,
        TAG_GATE_REASONS: _tag_text(verdict.reasons),
        TAG_GATE_REPLACED: replaced or "",
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


def _already_champion(client: Any, name: str, run_id: str, version: str) -> Verdict:
    with tempfile.TemporaryDirectory(prefix="cloudscreen-gate-") as tmp:
        recorded = _download(client, run_id, GATE_FILE, Path(tmp))
        data = json.loads(recorded.read_text()) if recorded else None
    if data and data.get("decision") in PROMOTING:
        log.info(
            "version %s of %s is already the champion: returning the verdict recorded on run %s", version, name, run_id
        )
        return Verdict.from_json(data)
    raise GateError(
        f"version {version} of {name!r} (run {run_id}) is already the champion and the run records no promoting "
        "verdict: there is nothing to decide"
    )


def gate(
    *,
    run_id: str,
    params: GateParams,
    registered_model: str,
    manifest: Path | None = None,
    tiles: Path | None = None,
    force: bool = False,
    reason: str | None = None,
    by: str | None = None,
) -> Verdict:
    """Judge the version of `registered_model` registered from `run_id` against the champion, record the verdict on
    the run and, when it promotes, move the registry aliases.

    Args:
        run_id: the training run; its model must have been evaluated by tasks.evaluate.
        params: the `gate` section.
        registered_model: the registry name (train.registered_model).
        manifest, tiles: the data to compare on (both or neither); default: what the challenger was evaluated on.
        force: promote whatever the rules say; needs `reason`.
        reason: why a promotion is forced (recorded).
        by: who forces it (default: see `who`).

    Returns:
        The verdict; every decision, `reject` included, is a result.

    Raises:
        GateError: --force without a reason, --reason without --force, half of --manifest/--tiles, an unknown run
            or model, a run never evaluated, data that is gone, or a champion that cannot be evaluated.
    """
    if force and not (reason and reason.strip()):
        raise GateError("--force needs --reason: a forced promotion is an audited override")
    if reason and not force:
        raise GateError("--reason is recorded only with --force")
    if (manifest is None) != (tiles is None):
        raise GateError("--manifest and --tiles go together: give both or neither")
    client = _client()
    version = _run_version(client, registered_model, run_id)
    aliases = _aliases(client, registered_model)
    champion_version = aliases.get(CHAMPION)
    log.info(
        "gate: run %s, %s version %s against champion %s; paired test %s, %d floors, %d non-regression, %d slice "
        "floors, cost ceiling %s%s",
        run_id,
        registered_model,
        version,
        champion_version or "(none)",
        params.paired_test,
        len(params.floors),
        len(params.non_regression),
        len(params.slice_floors),
        params.max_cost_usd,
        "; forced" if force else "",
    )
    if champion_version == version:
        return _already_champion(client, registered_model, run_id, version)

    summary, predictions = _recorded_evaluation(client, run_id)
    try:
        # Re-evaluations use the challenger's own evaluation settings: the same target recall and slices.
        eval_params = EvaluateParams.model_validate(summary["params"])
    except ValidationError as exc:
        raise GateError(f"run {run_id}: the evaluation settings it recorded are no longer valid: {exc}") from exc
    columns = eval_params.slice_columns
    metrics = summary["metrics"]
    data_manifest = manifest or Path(summary["data"].get("manifest", ""))
    data_tiles = tiles or Path(summary["data"].get("tiles", ""))
    reevaluated = False
    champion = paired = None
    if champion_version is not None or manifest is not None:
        if not data_manifest.is_file():
            raise GateError(
                f"{data_manifest}: the manifest to compare on is not here (the challenger was evaluated on it); pass "
                "--manifest and --tiles"
            )
        if not _same_data(summary, data_manifest):
            log.warning(
                "%s is not the data run %s was evaluated on: re-evaluating the challenger", data_manifest, run_id
            )
            uri = f"models:/{registered_model}/{version}"
            metrics, predictions = _evaluate(uri, "challenger", data_manifest, data_tiles, eval_params)
            reevaluated = True
        if champion_version is not None:
            uri = f"models:/{registered_model}/{champion_version}"
            theirs, their_predictions = _evaluate(uri, "champion", data_manifest, data_tiles, eval_params)
            champion_run = client.get_model_version(registered_model, champion_version).run_id
            champion = _candidate(
                champion_version, champion_run, theirs | _run_cost(client, champion_run), their_predictions, columns
            )
            paired = pair(predictions, their_predictions, metrics[OPERATING_THRESHOLD], theirs[OPERATING_THRESHOLD])
    challenger = _candidate(version, run_id, metrics | _run_cost(client, run_id), predictions, columns)

    digest = file_digest(data_manifest, "sha256") if reevaluated else summary["data"].get("manifest_sha256")

    decision, checks = decide(challenger, champion, paired, params)
    forced = None
    if force:
        decision, forced = FORCED, {"by": who(by), "reason": (reason or "").strip()}
    promoted = decision in PROMOTING
    verdict = Verdict(
        decision=decision,
        reasons=reasons_for(checks, forced),
        registered_model=registered_model,
        run_id=run_id,
        challenger=_report(challenger, params),
        champion=_report(champion, params) if champion else None,
        rules=params.model_dump(mode="json"),
        checks=tuple(asdict(c) for c in checks),
        paired=(
            {"patches": paired.patches, **asdict(paired.test), "mode": params.paired_test, "alpha": params.alpha}
            if paired
            else None
        ),
        data={
            "manifest": str(data_manifest),
            "tiles": str(data_tiles),
            "manifest_sha256": digest,
            "challenger_reevaluated": reevaluated,
        },
        forced=forced,
        registry={
            "champion": version if promoted else champion_version,
            "previous_champion": champion_version if promoted else aliases.get(PREVIOUS_CHAMPION),
            "changed": promoted,
        },
    )
    # The verdict first, the aliases last: a crash in between leaves a verdict whose promotion a retry completes.
    _record(client, verdict)
    if promoted:
        _promote(client, verdict, version, champion_version)
    log.info(
        "gate: %s for %s version %s (champion now %s): %s",
        decision,
        registered_model,
        version,
        verdict.registry["champion"] or "(none)",
        " ".join(verdict.reasons),
    )
    return verdict


def rollback(*, registered_model: str, reason: str | None = None, by: str | None = None) -> Rollback:
    """Undo the last promotion: `champion` returns to the version the current champion replaced, and
    `previous-champion` to the one that version replaced (see the module docstring).

    Raises:
        GateError: no champion, or nothing to return to (the champion was the first), or that version is gone.
    """
    client = _client()
    aliases = _aliases(client, registered_model)
    current = aliases.get(CHAMPION)
    if current is None:
        raise GateError(f"registered model {registered_model!r} has no champion: there is nothing to roll back")
    tags = client.get_model_version(registered_model, current).tags
    # The chain tag is the record; the alias is its mirror, and the fallback for a champion set outside the gate.
    target = (tags[TAG_GATE_REPLACED] or None) if TAG_GATE_REPLACED in tags else aliases.get(PREVIOUS_CHAMPION)
    if target is None:
        raise GateError(
            f"version {current} of {registered_model!r} was the first champion: there is no previous champion to "
            "return to"
        )
    if aliases.get(PREVIOUS_CHAMPION) not in (None, target):
        log.warning(
            "previous-champion names version %s but version %s replaced version %s: following the chain",
            aliases[PREVIOUS_CHAMPION],
            current,
            target,
        )
    try:
        target_tags = client.get_model_version(registered_model, target).tags
    except _mlflow_errors() as exc:
        raise GateError(f"version {target} of {registered_model!r}, the previous champion: {exc.message}") from exc
    before = target_tags.get(TAG_GATE_REPLACED) or None
    actor = who(by)
    log.info("rollback of %s: champion %s -> %s (previous-champion %s)", registered_model, current, target, before)
    client.set_model_version_tag(
        registered_model, current, TAG_GATE_ROLLED_BACK, f"by {actor}" + (f": {reason}" if reason else "")
    )
    client.set_registered_model_alias(registered_model, CHAMPION, target)
    if before:
        client.set_registered_model_alias(registered_model, PREVIOUS_CHAMPION, before)
    else:
        client.delete_registered_model_alias(registered_model, PREVIOUS_CHAMPION)
    return Rollback(registered_model, current, target, before, actor, reason)


def main() -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument(
        "action",
        nargs="?",
        choices=("decide", "rollback"),
        default="decide",
        help="decide (default): judge --run-id's model; rollback: undo the last promotion",
    )
    p.add_argument("--run-id", help="decide: the training run whose registered model is the challenger")
    p.add_argument("--manifest", type=Path, help="compare on this sample manifest (default: the challenger's data)")
    p.add_argument("--tiles", type=Path, help="the tile step's output holding the manifest's patches")
    p.add_argument("--force", action="store_true", help="promote whatever the rules say (needs --reason)")
    p.add_argument("--reason", help="why a promotion is forced, or why a rollback is done; recorded in the registry")
    p.add_argument("--by", help="who forces or rolls back (default: the Airflow task, else $USER)")
    args = p.parse_args()
    if args.action == "decide" and not args.run_id:
        p.error("--run-id is required (or use: rollback)")
    if args.action == "rollback" and (args.run_id or args.manifest or args.tiles or args.force):
        p.error("rollback takes no --run-id, --manifest, --tiles or --force")
    cli.configure_logging(args.verbose)
    from tasks.train import TrainParams  # the registered model's name is the trainer's

    name = load_section("train", TrainParams, args.params, args.overrides).registered_model
    if args.action == "rollback":
        result = rollback(registered_model=name, reason=args.reason, by=args.by).to_json()
    else:
        result = gate(
            run_id=args.run_id,
            params=load_section("gate", GateParams, args.params, args.overrides),
            registered_model=name,
            manifest=args.manifest,
            tiles=args.tiles,
            force=args.force,
            reason=args.reason,
            by=args.by,
        ).to_json()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    cli.run(main)
