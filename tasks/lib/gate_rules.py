"""The gate's rules, pure: its params, McNemar's paired test, each rule's check and message, the decision and its
reasons, and the verdict and rollback records. No MLflow here; tasks.gate feeds these from tasks.lib.registry."""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

import pandas as pd
from pydantic import Field, field_validator

from tasks.lib.config import StepParams
from tasks.lib.errors import GateError
from tasks.lib.files import jsonable
from tasks.lib.metrics import OPERATING_THRESHOLD, slice_metrics

PROMOTE = "promote"
REJECT = "reject"
BOOTSTRAP = "bootstrap"
FORCED = "forced"
PROMOTING = (PROMOTE, BOOTSTRAP, FORCED)  # decisions that move `champion`

COST_METRIC = "cost_usd"  # logged by tasks.train
EXACT_BELOW = 25  # discordant pairs below which McNemar's p-value is the exact binomial one
TEST_SET = "test"  # the set the paired test and the slice floors read

_METRIC_NAME = re.compile(
    r"^(val|test|natural)_((t50|op)_(accuracy|precision|recall|f1)|roc_auc|average_precision|log_loss)$"
)
_LOWER_IS_BETTER = ("log_loss",)
SLICE_METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "average_precision")
# The slice metrics that are a share of counted patches: (the patches counted, the ones that succeed), as
# tasks.lib.metrics' confusion cells. These can be judged against their floor with a binomial test.
_SLICE_COUNTS = {"recall": (("tp", "fn"), ("tp",)), "precision": (("tp", "fp"), ("tp",)),
                 "accuracy": (("tp", "fp", "tn", "fn"), ("tp", "tn"))}  # fmt: skip


class GateParams(StepParams):
    floors: dict[str, Annotated[float, Field(ge=0, le=1)]]
    non_regression: dict[str, Annotated[float, Field(ge=0)]]
    slice_floors: dict[str, Annotated[float, Field(ge=0, le=1)]]
    min_slice_patches: int = Field(ge=1)
    slice_test: Literal["binomial", "point"] = "binomial"
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
    """McNemar's two-sided test from the two discordant counts: b patches only the challenger gets right, c only
    the champion. The p-value is the exact binomial one (b ~ Binomial(b + c, 1/2)) below EXACT_BELOW discordant
    patches and the continuity-corrected chi-squared one, (|b - c| - 1)² / (b + c) on 1 degree of freedom, from there.

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


def candidate(
    version: str, run_id: str | None, metrics: dict[str, float], predictions: pd.DataFrame, columns: tuple[str, ...]
) -> Candidate:
    """A model as the gate sees it: `metrics` (with its run's cost, when it has one), and the slices of its test
    predictions at its own operating threshold."""
    return Candidate(version, run_id, metrics, slice_table(predictions, metrics[OPERATING_THRESHOLD], columns))


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


def slice_floor_p_value(count: int, successes: int, bound: float) -> float:
    """The one-sided exact binomial p-value of `successes` of `count` under a true rate of `bound`: how likely a
    slice whose metric really is at its floor shows this few successes (small: the slice is below its floor)."""
    from scipy import stats

    return float(stats.binom.cdf(successes, count, bound))


def _slice_checks(challenger: Candidate, champion: Candidate | None, rules: GateParams) -> list[Check]:
    if not rules.slice_floors:
        return []
    slices = challenger.slices
    large = slices[slices["patches"] >= rules.min_slice_patches]
    theirs_by_slice = {}
    if champion is not None:
        theirs_by_slice = {(r["column"], r["value"]): r for r in champion.slices.to_dict("records")}
    checks, noisy = [], []
    for row in large.to_dict("records"):
        theirs = theirs_by_slice.get((row["column"], row["value"]))
        for name, bound in rules.slice_floors.items():
            value = float(row[name])
            if math.isnan(value) or value >= bound:
                continue
            where = f"slice {row['column']}={row['value']} ({int(row['patches'])} test patches)"
            if rules.slice_test == "binomial" and name in _SLICE_COUNTS:
                counted, succeeded = (sum(int(row[cell]) for cell in cells) for cells in _SLICE_COUNTS[name])
                p = slice_floor_p_value(counted, succeeded, bound)
                if p >= rules.alpha:  # as many misses as a slice truly at its floor shows often: noise, not a fault
                    noisy.append(
                        f"{where}: {name} {value:.4f} ({succeeded} of {counted}) is under the slice floor {bound:.4f} "
                        f"but not significantly (one-sided binomial p = {p:.3f} >= {rules.alpha:g})"
                    )
                    continue
                evidence = f"{succeeded} of {counted}, one-sided binomial p = {p:.2g} < {rules.alpha:g}; "
            else:
                evidence = ""
            champion_part = "no champion" if champion is None else f"champion {_show(theirs and float(theirs[name]))}"
            message = (
                f"{where}: {name} at the operating threshold {value:.4f} is below the slice floor {bound:.4f} "
                f"({evidence}{champion_part})."
            )
            checks.append(Check("slice_floor", f"{TEST_SET}_op_{name}[{row['column']}={row['value']}]", False, message))
    if not checks:
        floors = ", ".join(f"{name} >= {bound:.4f}" for name, bound in rules.slice_floors.items())
        if large.empty:
            message = f"no test slice has {rules.min_slice_patches} patches or more: the slice floors ({floors}) apply"
            message += " to none."
        elif noisy:
            message = f"no test slice of {rules.min_slice_patches} patches or more is significantly below {floors}: "
            message += "; ".join(noisy) + "."
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
