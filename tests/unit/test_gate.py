"""tasks.gate's pure parts: McNemar's test against known values, pairing, every rule of `decide` and its reasons,
forced reasons, the params model, who acts, and input errors caught before MLflow is reached."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from tasks.gate import gate
from tasks.lib.config import load_section
from tasks.lib.errors import ConfigError, GateError
from tasks.lib.gate_rules import (
    BOOTSTRAP,
    EXACT_BELOW,
    PROMOTE,
    REJECT,
    Candidate,
    GateParams,
    McNemar,
    Paired,
    Verdict,
    decide,
    mcnemar,
    pair,
    reasons_for,
    slice_floor_p_value,
    slice_table,
    who,
)
from tasks.lib.metrics import slice_metrics

NO_SLICES = slice_metrics(pd.DataFrame({"label": [], "score": [], "country": []}), 0.5, ["country"])

RULES = {
    "floors": {"test_op_recall": 0.92, "test_op_precision": 0.85, "test_roc_auc": 0.95},
    "non_regression": {"test_op_precision": 0.02, "test_roc_auc": 0.01},
    "slice_floors": {"recall": 0.85},
    "min_slice_patches": 50,
    "paired_test": "better",
    "alpha": 0.05,
    "max_cost_usd": 10.0,
}
GOOD = {"test_op_recall": 0.97, "test_op_precision": 0.93, "test_roc_auc": 0.99, "cost_usd": 1.5}
CHAMPION = {"test_op_recall": 0.96, "test_op_precision": 0.91, "test_roc_auc": 0.98, "cost_usd": 2.0}
BETTER = Paired(240, McNemar(20, 4, 0, 0.001, "chi2"))  # significantly better
TIED = Paired(240, McNemar(6, 5, 5, 1.0, "exact"))
WORSE = Paired(240, McNemar(2, 20, 0, 0.0001, "chi2"))


def rules(**changes) -> GateParams:
    return GateParams.model_validate(RULES | changes)


def candidate(metrics: dict[str, float], version: str = "2", slices: pd.DataFrame = NO_SLICES) -> Candidate:
    return Candidate(version=version, run_id=f"run{version}", metrics=metrics, slices=slices)


def slices_frame(rows: list[tuple[str, int, float]], positives: int | None = None) -> pd.DataFrame:
    """(country, patches, recall) rows shaped like tasks.lib.metrics.slice_metrics: half the patches cloud (or
    `positives`), no false positive."""
    records = []
    for country, n, recall in rows:
        clouds = n // 2 if positives is None else positives
        tp = 0 if np.isnan(recall) else round(recall * clouds)
        records.append(
            {"column": "country", "value": country, "patches": n, "positives": clouds, "recall": recall,
             "tp": tp, "fn": clouds - tp, "fp": 0, "tn": n - clouds}
        )  # fmt: skip
    return pd.DataFrame(records).assign(precision=1.0, accuracy=1.0, f1=1.0, roc_auc=1.0, average_precision=1.0)


def failures(checks) -> list[str]:
    return [c.message for c in checks if not c.passed]


# --- McNemar ------------------------------------------------------------------------------------------------------


def test_mcnemar_exact_p_values_computed_by_hand():
    # Two-sided exact: 2 × P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2).
    t = mcnemar(10, 2)
    assert t.method == "exact" and t.statistic == 2
    assert t.p_value == pytest.approx(2 * (1 + 12 + 66) / 2**12)
    assert mcnemar(1, 5).p_value == pytest.approx(2 * (1 + 6) / 2**6)
    assert mcnemar(5, 5).p_value == 1.0  # capped: the doubled tail exceeds 1
    assert mcnemar(0, 0) == McNemar(0, 0, 0.0, 1.0, "exact")
    assert mcnemar(0, 6).p_value == pytest.approx(2 / 2**6)


def test_mcnemar_chi_squared_with_continuity_correction_from_the_exact_limit_on():
    t = mcnemar(30, 10)
    assert t.method == "chi2"
    assert t.statistic == pytest.approx((20 - 1) ** 2 / 40)
    # chi-squared with 1 degree of freedom: P(X > x) = erfc(sqrt(x / 2)).
    assert t.p_value == pytest.approx(math.erfc(math.sqrt(t.statistic / 2)))
    assert t.p_value == pytest.approx(0.002663, abs=1e-6)
    # The textbook table (Wikipedia's McNemar example): b = 121, c = 59.
    assert mcnemar(121, 59).statistic == pytest.approx(61**2 / 180)
    assert mcnemar(EXACT_BELOW - 1, 0).method == "exact"
    assert mcnemar(EXACT_BELOW, 0).method == "chi2"


def test_mcnemar_is_symmetric_and_directional():
    assert mcnemar(12, 3).p_value == mcnemar(3, 12).p_value
    assert mcnemar(12, 1).better(0.05) and not mcnemar(12, 1).worse(0.05)
    assert mcnemar(1, 12).worse(0.05) and not mcnemar(1, 12).better(0.05)
    assert not mcnemar(6, 4).better(0.05) and not mcnemar(6, 4).worse(0.05)
    with pytest.raises(ValueError, match="non-negative"):
        mcnemar(-1, 3)


def test_pair_counts_discordant_test_patches_at_each_models_own_threshold():
    ids = [f"p{i}" for i in range(6)]
    labels = [1, 1, 1, 0, 0, 0]
    base = pd.DataFrame({"patch_id": ids, "set": "test", "label": labels})
    challenger = base.assign(score=[0.9, 0.8, 0.7, 0.1, 0.2, 0.6])  # at 0.5: wrong on p5 only
    champion = base.assign(score=[0.9, 0.3, 0.2, 0.1, 0.2, 0.3])  # at 0.25: wrong on p2 (0.2 < 0.25) and p5
    val = pd.DataFrame({"patch_id": ["v0"], "set": ["val"], "label": [1], "score": [0.0]})  # not paired
    result = pair(pd.concat([challenger, val]), champion.iloc[::-1], 0.5, 0.25)
    assert result.patches == 6
    assert (result.test.challenger_only, result.test.champion_only) == (1, 0)


def test_pair_refuses_evaluations_of_different_patches():
    a = pd.DataFrame({"patch_id": ["a", "b"], "set": "test", "label": [1, 0], "score": [0.9, 0.1]})
    with pytest.raises(GateError, match="different test patches"):
        pair(a, a.assign(patch_id=["a", "c"]), 0.5, 0.5)
    with pytest.raises(GateError, match="label the same test patches differently"):
        pair(a, a.assign(label=[0, 1]), 0.5, 0.5)


def test_slice_table_reads_the_test_set_by_each_slice_column():
    predictions = pd.DataFrame(
        {
            "patch_id": ["a", "b", "c", "d"],
            "set": ["test", "test", "test", "val"],
            "label": [1, 0, 1, 1],
            "score": [0.9, 0.2, 0.3, 0.9],
            "season": ["Winter", "Winter", "Summer", "Summer"],
            "country": ["Finland", "Finland", "Ireland", "Ireland"],
        }
    )
    frame = slice_table(predictions, 0.5, ["season", "country"])
    assert set(frame["column"]) == {"season", "country"}
    ireland = frame[(frame["column"] == "country") & (frame["value"] == "Ireland")].iloc[0]
    assert ireland["patches"] == 1 and ireland["recall"] == 0.0  # the val patch is not counted


# --- decide -------------------------------------------------------------------------------------------------------


def test_a_better_challenger_is_promoted_and_every_passed_rule_is_a_reason():
    decision, checks = decide(candidate(GOOD), candidate(CHAMPION, "1"), BETTER, rules())
    assert decision == PROMOTE
    assert all(c.passed for c in checks)
    assert {c.rule for c in checks} == {"floor", "non_regression", "slice_floor", "paired_test", "cost"}
    reasons = reasons_for(checks)
    assert "test_op_recall 0.9700 meets the floor 0.9200 (champion 0.9600)." in reasons
    assert any("significantly better" in r for r in reasons)


def test_a_clearly_worse_challenger_is_rejected_naming_metric_value_bound_and_champion():
    worse = {"test_op_recall": 0.80, "test_op_precision": 0.70, "test_roc_auc": 0.90, "cost_usd": 12.0}
    decision, checks = decide(candidate(worse), candidate(CHAMPION, "1"), WORSE, rules())
    assert decision == REJECT
    reasons = reasons_for(checks)
    assert reasons == tuple(failures(checks))
    assert "test_op_recall 0.8000 is below the floor 0.9200 (champion 0.9600)." in reasons
    assert (
        "test_op_precision 0.7000 regressed beyond the tolerance 0.0200 from the champion's 0.9100 (bound 0.8900)."
        in reasons
    )
    assert "cost_usd $12.00 exceeds the ceiling $10.00 (champion $2.00)." in reasons
    assert any("significantly worse" in r and "champion alone on 20" in r for r in reasons)
    assert {c.metric for c in checks if not c.passed} == {
        "test_op_recall",
        "test_op_precision",
        "test_roc_auc",
        "cost_usd",
        "mcnemar_p",
    }


def test_noise_does_not_replace_a_champion_unless_configured_otherwise():
    decision, checks = decide(candidate(GOOD), candidate(CHAMPION, "1"), TIED, rules())
    assert decision == REJECT
    (reason,) = failures(checks)
    assert "not significantly better" in reason and "exact p = 1" in reason
    assert decide(candidate(GOOD), candidate(CHAMPION, "1"), TIED, rules(paired_test="not_worse"))[0] == PROMOTE
    decision, checks = decide(candidate(GOOD), candidate(CHAMPION, "1"), WORSE, rules(paired_test="not_worse"))
    assert decision == REJECT and "significantly worse" in failures(checks)[0]
    assert decide(candidate(GOOD), candidate(CHAMPION, "1"), None, rules(paired_test="off"))[0] == PROMOTE


def test_a_configured_paired_test_needs_its_result():
    with pytest.raises(ValueError, match="no paired result"):
        decide(candidate(GOOD), candidate(CHAMPION, "1"), None, rules())


def test_with_no_rules_configured_the_gate_does_not_promote():
    empty = rules(floors={}, non_regression={}, slice_floors={}, paired_test="off", max_cost_usd=None)
    for champion, paired in ((candidate(CHAMPION, "1"), None), (None, None)):
        decision, checks = decide(candidate(GOOD), champion, paired, empty)
        assert decision == REJECT
        assert failures(checks) == [c.message for c in checks] and "without rules never promotes" in checks[0].message
    # A cost ceiling says nothing about quality: alone, it promotes nothing either.
    decision, checks = decide(candidate(GOOD), None, None, empty.model_copy(update={"max_cost_usd": 10.0}))
    assert decision == REJECT and "No quality rule" in failures(checks)[0]


def test_a_first_model_bootstraps_when_the_absolute_rules_pass():
    decision, checks = decide(candidate(GOOD), None, None, rules())
    assert decision == BOOTSTRAP
    assert {c.rule for c in checks} == {"floor", "slice_floor", "cost"}  # nothing to compare with
    assert "test_roc_auc 0.9900 meets the floor 0.9500 (no champion)." in reasons_for(checks)


def test_a_first_model_below_a_floor_is_rejected():
    decision, checks = decide(candidate(GOOD | {"test_roc_auc": 0.9}), None, None, rules())
    assert decision == REJECT
    assert failures(checks) == ["test_roc_auc 0.9000 is below the floor 0.9500 (no champion)."]


def test_a_first_model_is_not_promoted_by_relative_rules_alone():
    relative = rules(floors={}, slice_floors={}, max_cost_usd=None)
    decision, checks = decide(candidate(GOOD), None, None, relative)
    assert decision == REJECT and "not promoted unjudged" in failures(checks)[0]


def test_a_model_that_wins_overall_but_fails_a_large_slice_is_rejected():
    mine = slices_frame([("Finland", 80, 0.60), ("Ireland", 60, 0.95), ("Kosovo", 10, 0.0)])
    theirs = slices_frame([("Finland", 80, 0.93), ("Ireland", 60, 0.90), ("Kosovo", 10, 1.0)])
    decision, checks = decide(candidate(GOOD, slices=mine), candidate(CHAMPION, "1", slices=theirs), BETTER, rules())
    assert decision == REJECT
    assert failures(checks) == [
        "slice country=Finland (80 test patches): recall at the operating threshold 0.6000 is below the slice floor "
        "0.8500 (24 of 40, one-sided binomial p = 0.00011 < 0.05; champion 0.9300)."
    ]  # Kosovo fails too, but 10 patches are below min_slice_patches
    assert [c.metric for c in checks if not c.passed] == ["test_op_recall[country=Finland]"]


def test_a_slice_under_its_floor_by_a_patch_or_two_of_few_clouds_is_noise_not_a_failure():
    # The embedded default's Spring test slice: 51 patches, 12 of them cloud. A model whose recall there is truly
    # 0.92 shows 10 of 12 or fewer one time in four, so the point rule would reject good models on one patch.
    spring = slices_frame([("Spring", 51, 10 / 12)], positives=12)
    decision, checks = decide(candidate(GOOD, slices=spring), None, None, rules())
    assert decision == BOOTSTRAP
    (said,) = [c.message for c in checks if c.rule == "slice_floor"]
    assert said == (
        "no test slice of 50 patches or more is significantly below recall >= 0.8500: slice country=Spring (51 test "
        "patches): recall 0.8333 (10 of 12) is under the slice floor 0.8500 but not significantly (one-sided "
        "binomial p = 0.557 >= 0.05)."
    )
    # The same slice judged on the point value alone (gate.slice_test: point) fails on those two patches.
    decision, checks = decide(candidate(GOOD, slices=spring), None, None, rules(slice_test="point"))
    assert decision == REJECT
    assert failures(checks) == [
        "slice country=Spring (51 test patches): recall at the operating threshold 0.8333 is below the slice floor "
        "0.8500 (no champion)."
    ]


def test_a_slice_that_misses_half_its_few_clouds_still_fails():
    broken = slices_frame([("Spring", 51, 6 / 12)], positives=12)
    decision, checks = decide(candidate(GOOD, slices=broken), None, None, rules())
    assert decision == REJECT
    assert failures(checks) == [
        "slice country=Spring (51 test patches): recall at the operating threshold 0.5000 is below the slice floor "
        "0.8500 (6 of 12, one-sided binomial p = 0.0046 < 0.05; no champion)."
    ]
    assert slice_floor_p_value(12, 6, 0.85) == pytest.approx(stats.binom.cdf(6, 12, 0.85))


def test_slice_metrics_undefined_on_a_slice_are_not_checked():
    mine = slices_frame([("Serbia", 60, float("nan"))])
    decision, checks = decide(candidate(GOOD, slices=mine), None, None, rules())
    assert decision == BOOTSTRAP
    assert any("all 1 test slices of 50 patches or more meet recall >= 0.8500" in r for r in reasons_for(checks))
    decision, checks = decide(candidate(GOOD), None, None, rules())
    assert any("apply to none" in r for r in reasons_for(checks))


def test_missing_or_undefined_metrics_fail_their_rules_with_a_reason():
    challenger = {"test_op_precision": 0.93, "test_roc_auc": float("nan")}
    decision, checks = decide(candidate(challenger), None, None, rules())
    reasons = failures(checks)
    assert decision == REJECT
    assert "test_op_recall is not recorded for the challenger, so the floor 0.9200 is not met (no champion)." in reasons
    assert "test_roc_auc is undefined for the challenger, so the floor 0.9500 is not met (no champion)." in reasons
    assert (
        "cost_usd is not recorded on the challenger's run, so the cost ceiling $10.00 cannot be checked "
        "(no champion)." in reasons
    )


def test_non_regression_of_a_lower_is_better_metric_and_an_undefined_champion_value():
    rule = rules(non_regression={"test_log_loss": 0.05, "natural_op_precision": 0.05}, paired_test="off")
    champion = candidate(CHAMPION | {"test_log_loss": 0.20, "natural_op_precision": float("nan")}, "1")
    worse = candidate(GOOD | {"test_log_loss": 0.30, "natural_op_precision": 0.2})
    decision, checks = decide(worse, champion, None, rule)
    assert decision == REJECT
    assert failures(checks) == [
        "test_log_loss 0.3000 regressed beyond the tolerance 0.0500 from the champion's 0.2000 (bound 0.2500)."
    ]
    assert decide(candidate(GOOD | {"test_log_loss": 0.24}), champion, None, rule)[0] == PROMOTE


def test_a_forced_promotion_leads_with_who_and_why_and_lists_what_it_overrode():
    worse = {"test_op_recall": 0.80, "test_op_precision": 0.93, "test_roc_auc": 0.99, "cost_usd": 1.0}
    decision, checks = decide(candidate(worse), candidate(CHAMPION, "1"), TIED, rules())
    assert decision == REJECT
    reasons = reasons_for(checks, {"by": "alice", "reason": "hotfix for the Finland outage"})
    assert reasons[0] == "Promotion forced by alice: hotfix for the Finland outage"
    assert "Overridden: test_op_recall 0.8000 is below the floor 0.9200 (champion 0.9600)." in reasons
    assert len(reasons) == 1 + len(failures(checks))
    _, passing = decide(candidate(GOOD), None, None, rules())
    assert reasons_for(passing, {"by": "bob", "reason": "r"})[1].startswith("No rule failed")


# --- params, verdict, who, input errors ---------------------------------------------------------------------------


def test_params_yaml_configures_rules_so_the_gate_can_promote():
    params = load_section("gate", GateParams)
    assert params.quality_rules and params.floors and params.paired_test == "better"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("gate.floors={test_recall: 0.9}", "not a tasks.evaluate metric"),
        ("gate.floors={test_log_loss: 0.2}", "lower-is-better"),
        ("gate.non_regression={train_op_recall: 0.01}", "not a tasks.evaluate metric"),
        ("gate.non_regression={test_roc_auc: -0.1}", "greater than or equal to 0"),
        ("gate.slice_floors={auc: 0.9}", "slice floors take"),
        ("gate.floors={test_op_recall: 1.5}", "less than or equal to 1"),
        ("gate.paired_test=maybe", "paired_test"),
        ("gate.max_cost_usd=0", "greater than 0"),
    ],
)
def test_bad_gate_params_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_section("gate", GateParams, overrides=[override])


def test_no_cost_ceiling_is_a_choice():
    assert load_section("gate", GateParams, overrides=["gate.max_cost_usd=null"]).max_cost_usd is None


def test_verdict_json_has_no_nan_and_round_trips():
    verdict = Verdict(
        decision=PROMOTE,
        reasons=("a.",),
        registered_model="m",
        run_id="r",
        challenger={"version": "2", "test_roc_auc": float("nan")},
        champion=None,
        rules=RULES,
        checks=({"rule": "floor", "metric": "x", "passed": True, "message": "a."},),
        paired=None,
        data={},
        forced=None,
        registry={"champion": "2", "previous_champion": None, "changed": True},
    )
    data = verdict.to_json()
    assert data["challenger"]["test_roc_auc"] is None
    assert list(data)[:5] == ["decision", "reasons", "registered_model", "run_id", "challenger"]
    assert Verdict.from_json(data).to_json() == data
    assert verdict.promoted and not Verdict.from_json(data | {"decision": REJECT}).promoted


def test_who_prefers_by_then_the_airflow_task_then_the_user(monkeypatch):
    for name in ("AIRFLOW_CTX_DAG_ID", "AIRFLOW_CTX_DAG_RUN_ID", "AIRFLOW_CTX_TASK_ID", "AIRFLOW_CTX_DAG_OWNER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("USER", "carol")
    assert who("alice") == "alice"
    assert who() == "carol"
    monkeypatch.setenv("AIRFLOW_CTX_DAG_ID", "cloudscreen_training")
    monkeypatch.setenv("AIRFLOW_CTX_DAG_RUN_ID", "manual__2026-11-16")
    monkeypatch.setenv("AIRFLOW_CTX_TASK_ID", "gate")
    monkeypatch.setenv("AIRFLOW_CTX_DAG_OWNER", "mlops")
    assert who() == "airflow:cloudscreen_training/manual__2026-11-16/gate (owner mlops)"
    assert who("alice") == "alice"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"force": True}, "--force needs --reason"),
        ({"force": True, "reason": "  "}, "--force needs --reason"),
        ({"reason": "because"}, "only with --force"),
        ({"manifest": "m.parquet"}, "--manifest and --tiles go together"),
    ],
)
def test_bad_arguments_are_refused_before_mlflow_is_reached(kwargs, message, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # unreachable: nothing may talk to it
    with pytest.raises(GateError, match=message):
        gate(run_id="r", params=rules(), registered_model="m", **kwargs)


def test_scores_the_rules_read_are_floats():
    # decide works on plain numbers, whatever numeric type an evaluation produced
    decision, _ = decide(candidate({k: np.float32(v) for k, v in GOOD.items()}), None, None, rules())
    assert decision == BOOTSTRAP
