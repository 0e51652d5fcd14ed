"""tasks.evaluate's pure parts: metrics against scikit-learn and by hand, the operating threshold, slices, output
coercion, batching, rendering, plots, and input errors caught before any model is loaded."""

from __future__ import annotations

import math
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from tasks.evaluate import EvaluateParams, assess, evaluate, predict
from tasks.lib.config import load_section
from tasks.lib.errors import EvaluationError
from tasks.lib.metrics import (
    COUNT_METRICS,
    SCORE_METRICS,
    THRESHOLD_METRICS,
    as_scores,
    binary_metrics,
    metric_name,
    set_metrics,
    slice_metrics,
)
from tasks.lib.plots import (
    confusion_figure,
    pr_curve_figure,
    render_rgb,
    threshold_figure,
    worst_errors,
    worst_errors_figure,
)
from tasks.lib.thresholds import operating_threshold, recall_confidence
from tasks.lib.tiles import INDEX_FILE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Eight patches: at 0.5 the flagged ones score 0.9, 0.8, 0.5 (cloud) and 0.6 (no_cloud); 0.2 is a missed cloud.
LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0])
SCORES = np.array([0.9, 0.8, 0.5, 0.2, 0.6, 0.4, 0.1, 0.05])


def recall_at(labels, scores, threshold):
    return ((scores >= threshold) & (labels == 1)).sum() / (labels == 1).sum()


# --- binary_metrics ------------------------------------------------------------------------------------------------


def test_metrics_of_a_small_case_computed_by_hand():
    m = binary_metrics(LABELS, SCORES, 0.5)
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (3, 1, 1, 3)
    assert (m["patches"], m["positives"]) == (8, 4)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(3 / 4)
    # ROC-AUC: the share of (cloud, no_cloud) pairs ranked right; only 0.5 < 0.6 and 0.2 < 0.6, 0.4 are wrong.
    assert m["roc_auc"] == pytest.approx(13 / 16)
    # Average precision: precision at each cloud patch's rank (1, 2, 4, 6 in score order), averaged.
    assert m["average_precision"] == pytest.approx((1 / 1 + 2 / 2 + 3 / 4 + 4 / 6) / 4)
    expected_bce = -np.mean(LABELS * np.log(SCORES) + (1 - LABELS) * np.log(1 - SCORES))
    assert m["log_loss"] == pytest.approx(expected_bce)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_metrics_match_scikit_learn_on_random_predictions(threshold):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 300)
    scores = np.clip(0.35 * labels + rng.uniform(0, 0.65, 300), 0, 1).round(2)  # rounded: plenty of ties
    predicted = (scores >= threshold).astype(int)
    m = binary_metrics(labels, scores, threshold)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, predicted))
    assert m["precision"] == pytest.approx(skm.precision_score(labels, predicted, zero_division=np.nan), nan_ok=True)
    assert m["recall"] == pytest.approx(skm.recall_score(labels, predicted))
    assert m["f1"] == pytest.approx(skm.f1_score(labels, predicted))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, scores))
    assert m["average_precision"] == pytest.approx(skm.average_precision_score(labels, scores))
    assert m["log_loss"] == pytest.approx(skm.log_loss(labels, scores))
    tn, fp, fn, tp = skm.confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (tn, fp, fn, tp)
    assert set(m) == {*COUNT_METRICS, *THRESHOLD_METRICS, *SCORE_METRICS}


def test_metrics_undefined_on_the_data_are_nan_not_errors():
    only_cloud = binary_metrics(np.array([1, 1, 1]), np.array([0.9, 0.4, 0.7]), 0.5)
    assert only_cloud["recall"] == pytest.approx(2 / 3) and only_cloud["precision"] == 1.0
    assert math.isnan(only_cloud["roc_auc"]) and math.isnan(only_cloud["average_precision"])
    assert math.isfinite(only_cloud["log_loss"])

    only_clear = binary_metrics(np.array([0, 0]), np.array([0.9, 0.1]), 0.5)
    assert math.isnan(only_clear["recall"]) and only_clear["precision"] == 0.0 and only_clear["f1"] == 0.0
    assert (only_clear["tn"], only_clear["fp"]) == (1, 1)

    nothing_flagged = binary_metrics(np.array([0, 0]), np.array([0.2, 0.1]), 0.5)
    assert math.isnan(nothing_flagged["precision"]) and math.isnan(nothing_flagged["f1"])
    assert nothing_flagged["accuracy"] == 1.0

    empty = binary_metrics(np.array([], dtype=int), np.array([]), 0.5)
    assert empty["patches"] == 0 and empty["tp"] == 0
    assert all(math.isnan(empty[k]) for k in ("accuracy", "precision", "recall", "f1", *SCORE_METRICS))


def test_scores_of_exactly_zero_and_one_give_a_finite_log_loss():
    assert math.isfinite(binary_metrics(np.array([1, 0]), np.array([0.0, 1.0]), 0.5)["log_loss"])


# --- the operating threshold ---------------------------------------------------------------------------------------


def test_operating_threshold_is_the_kth_highest_cloud_score():
    labels = np.array([1, 1, 1, 1, 1, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.95, 0.65, 0.1])
    # 5 cloud patches, target 0.8: 4 must be flagged, so the 4th highest cloud score; no-cloud scores do not count.
    assert operating_threshold(labels, scores, 0.8) == 0.6
    assert operating_threshold(labels, scores, 0.81) == 0.3  # 4 of 5 is not enough any more
    assert operating_threshold(labels, scores, 0.2) == 0.9
    assert operating_threshold(labels, scores, 0.19) == 0.9  # at least one patch, never a threshold above them all


def test_operating_threshold_with_ties_reaches_at_least_the_target():
    labels = np.array([1, 1, 1, 1, 1, 0])
    scores = np.array([0.9, 0.7, 0.7, 0.7, 0.2, 0.7])
    threshold = operating_threshold(labels, scores, 0.5)  # 3 of 5 needed; the 2nd to 4th tie
    assert threshold == 0.7
    assert recall_at(labels, scores, threshold) == pytest.approx(0.8)


def test_full_recall_may_need_threshold_zero():
    labels = np.array([1, 1, 0, 0])
    scores = np.array([0.8, 0.0, 0.3, 0.0])
    assert operating_threshold(labels, scores, 1.0) == 0.0
    assert binary_metrics(labels, scores, 0.0)["recall"] == 1.0  # everything is flagged at 0


def test_target_times_count_is_not_spoilt_by_floating_point():
    labels = np.ones(1000, dtype=int)
    scores = np.linspace(1, 0.001, 1000)  # descending: the k-th highest is scores[k - 1]
    threshold = operating_threshold(labels, scores, 0.958)  # 0.958 × 1000 is 957.9999999999999 in floating point
    assert threshold == scores[957]
    assert recall_at(labels, scores, threshold) == pytest.approx(0.958)


def test_operating_threshold_is_the_highest_meeting_the_target_by_brute_force():
    rng = np.random.default_rng(8)
    for _ in range(30):
        labels = rng.integers(0, 2, 40)
        labels[0] = 1
        scores = rng.choice(np.linspace(0, 1, 11), 40)  # coarse: many ties
        target = rng.uniform(0.05, 1)
        threshold = operating_threshold(labels, scores, target)
        meeting = [t for t in np.unique(scores) if recall_at(labels, scores, t) >= target - 1e-12]
        assert threshold == max(meeting)


def test_operating_threshold_needs_cloud_patches_and_a_sane_target():
    with pytest.raises(ValueError, match="no cloud patches"):
        operating_threshold(np.array([0, 0]), np.array([0.1, 0.2]), 0.9)
    with pytest.raises(ValueError, match="outside"):
        operating_threshold(LABELS, SCORES, 0.0)
    with pytest.raises(ValueError, match="confidence 1 is outside"):
        operating_threshold(LABELS, SCORES, 0.5, confidence=1)


def binomial_cdf(x: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= x), summed exactly: an independent check of scipy's."""
    q = Fraction(str(p))
    return float(sum(math.comb(n, i) * q**i * (1 - q) ** (n - i) for i in range(x + 1)))


@pytest.mark.parametrize(
    ("confidence", "k"), [(None, 115), (0.01, 115), (0.5, 116), (0.6, 117), (0.8, 118), (0.9, 119), (0.95, 119)]
)
def test_confidence_picks_the_kth_highest_cloud_score_of_the_order_statistic_bound(confidence, k):
    labels = np.r_[np.ones(120, dtype=int), np.zeros(50, dtype=int)]
    scores = np.r_[np.linspace(0.99, 0.2, 120), np.linspace(0.9, 0.0, 50)]  # cloud scores descending: k-th = [k-1]
    assert operating_threshold(labels, scores, 0.958, confidence) == scores[k - 1]
    if k > 115:  # moved by the confidence: the smallest k whose bound reaches it
        assert binomial_cdf(k - 1, 120, 0.958) >= confidence > binomial_cdf(k - 2, 120, 0.958)
    assert recall_confidence(k, 120, 0.958) == pytest.approx(binomial_cdf(k - 1, 120, 0.958))


def test_confidence_is_the_share_of_val_draws_whose_threshold_reaches_the_target_on_new_patches():
    # Cloud scores uniform on [0, 1]: the recall on new patches at threshold t is exactly 1 - t. With 60 cloud
    # patches and target 0.9 the rule without confidence takes the 54th highest score, which reaches the target on
    # new patches in 39 % of val draws only; confidence 0.5 takes the 55th (56 %), 0.9 the 58th (95 %).
    rng = np.random.default_rng(5)
    labels = np.ones(60, dtype=int)
    draws = rng.uniform(size=(2000, 60))
    for confidence, expected in ((None, 0.394), (0.5, 0.563), (0.9, 0.947)):
        reached = np.mean([1 - operating_threshold(labels, s, 0.9, confidence) >= 0.9 for s in draws])
        assert reached == pytest.approx(expected, abs=0.035), confidence


def test_confidence_falls_back_to_the_lowest_cloud_score_when_val_has_too_few_clouds():
    labels = np.array([1, 1, 1, 1, 1, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    # 5 cloud patches: even flagging all of them shows recall 0.958 with confidence 1 - 0.958^5 = 0.19 only.
    assert operating_threshold(labels, scores, 0.958, 0.9) == 0.5
    assert recall_confidence(5, 5, 0.958) == pytest.approx(1 - 0.958**5)


# --- names and slices ----------------------------------------------------------------------------------------------


def test_metric_names_follow_one_scheme():
    assert metric_name("test", "recall", "op") == "test_op_recall"
    assert metric_name("natural", "precision", "t50") == "natural_t50_precision"
    assert metric_name("test", "roc_auc") == "test_roc_auc"
    names = set_metrics("val", LABELS, SCORES, {"t50": 0.5, "op": 0.2})
    assert names["val_op_recall"] == 1.0 and names["val_t50_recall"] == 0.75
    assert {"val_roc_auc", "val_average_precision", "val_log_loss", "val_patches", "val_positives"} <= set(names)
    assert len(names) == 2 * len(THRESHOLD_METRICS) + len(SCORE_METRICS) + len(COUNT_METRICS)


def test_slice_metrics_have_sizes_and_survive_one_class_slices():
    frame = pd.DataFrame(
        {
            "label": LABELS,
            "score": SCORES,
            "season": ["Summer"] * 4 + ["Winter"] * 4,  # Summer: cloud only; Winter: no_cloud only
            "country": ["Austria", "Serbia"] * 4,
        }
    )
    slices = slice_metrics(frame, 0.5, ["season", "country"])
    assert list(slices[["column", "value"]].itertuples(index=False, name=None)) == [
        ("season", "Summer"),
        ("season", "Winter"),
        ("country", "Austria"),
        ("country", "Serbia"),
    ]
    summer, winter, austria, _ = (row for _, row in slices.iterrows())
    assert (summer["patches"], summer["positives"], summer["recall"]) == (4, 4, 0.75)
    assert math.isnan(summer["roc_auc"]) and math.isnan(winter["recall"])
    assert (winter["fp"], winter["precision"]) == (1, 0.0)
    mask = frame["country"] == "Austria"
    expected = binary_metrics(LABELS[mask], SCORES[mask], 0.5)
    assert austria[list(expected)].to_dict() == pytest.approx(expected, nan_ok=True)


def test_assess_picks_the_threshold_on_val_and_reports_every_set():
    val = pd.DataFrame({"label": [1, 1, 1, 0, 0], "score": [0.9, 0.7, 0.4, 0.5, 0.1]})
    test = pd.DataFrame({"label": LABELS, "score": SCORES})
    natural = pd.DataFrame({"label": [1, 0, 0, 0], "score": [0.9, 0.3, 0.7, 0.2]})
    predictions = pd.concat(
        [val.assign(set="val"), test.assign(set="test"), natural.assign(set="natural")], ignore_index=True
    ).assign(season="Summer")
    threshold, metrics, slices = assess(predictions, 0.6, ["season"])
    assert threshold == 0.7  # 2 of val's 3 cloud patches
    assert metrics["operating_threshold"] == 0.7 and metrics["target_recall"] == 0.6
    for name, frame in (("val", val), ("test", test), ("natural", natural)):
        expected = set_metrics(name, frame["label"].to_numpy(), frame["score"].to_numpy(), {"t50": 0.5, "op": 0.7})
        assert {k: metrics[k] for k in expected} == pytest.approx(expected, nan_ok=True)
    assert metrics["test_op_recall"] == 0.5 and metrics["natural_op_precision"] == 0.5
    assert slices[["set", "column", "value", "patches"]].values.tolist() == [
        ["test", "season", "Summer", 8],
        ["natural", "season", "Summer", 4],
    ]
    # With a confidence the threshold is lower: val's 3 cloud patches show recall 0.6 on new patches with confidence
    # P(Binomial(3, 0.6) <= 1) = 0.35 when 2 of them are flagged, 1 - 0.6^3 = 0.78 when all 3 are.
    cautious, metrics, _ = assess(predictions, 0.6, ["season"], confidence=0.75)
    assert cautious == 0.4 and metrics["operating_threshold"] == 0.4 and metrics["val_op_recall"] == 1.0


# --- model output, batching, rendering, plots ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        np.array([0.1, 0.9], dtype=np.float32),
        np.array([[0.1], [0.9]]),
        [0.1, 0.9],
        pd.Series([0.1, 0.9]),
        pd.DataFrame({"cloud": [0.1, 0.9]}),
    ],
)
def test_model_output_is_coerced_to_float64_scores(raw):
    scores = as_scores(raw, 2)
    assert scores.dtype == np.float64 and scores.shape == (2,)
    np.testing.assert_allclose(scores, [0.1, 0.9], rtol=1e-6)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (np.array([0.1, 0.9, 0.5]), r"shape \(3,\) for 2 patches"),
        (np.array([[0.1, 0.9], [0.2, 0.8]]), r"shape \(2, 2\)"),
        (pd.DataFrame({"a": [0.1, 0.2], "b": [0.9, 0.8]}), "expected one score column"),
        (np.array([0.1, 1.5]), r"not probabilities in \[0, 1\], e.g. 1.5"),
        (np.array([np.nan, 0.5]), "not probabilities"),
        (["a", "b"], "not numeric"),
    ],
)
def test_model_output_breaking_the_contract_is_named(raw, message):
    with pytest.raises(EvaluationError, match=message):
        as_scores(raw, 2)


def make_tiles(root: Path, patches: np.ndarray, ids: list[str]) -> Path:
    """A minimal tile-step output: one shard and its index."""
    (root / "shards").mkdir(parents=True)
    np.save(root / "shards" / "shard-00000.npy", patches)
    pd.DataFrame({"patch_id": ids, "shard": "shards/shard-00000.npy", "offset": range(len(ids))}).to_parquet(
        root / INDEX_FILE, index=False
    )
    return root


class MeanModel:
    """Scores a patch by its first pixel's red value / 1000, remembering its batch sizes."""

    def __init__(self):
        self.batches = []

    def predict(self, patches):
        self.batches.append(len(patches))
        return patches[:, 0, 0, 0] / 1000.0


def test_predict_batches_and_keeps_the_order_asked(tmp_path):
    ids = [f"p{i}" for i in range(7)]
    patches = np.zeros((7, 120, 120, 3), dtype=np.uint16)
    patches[:, 0, 0, 0] = np.arange(7) * 100
    tiles = make_tiles(tmp_path, patches, ids)
    model = MeanModel()
    frame = pd.DataFrame({"patch_id": ["p6", "p0", "p3", "p5", "p1"]})
    scores = predict(model, frame, tiles, batch=2)
    np.testing.assert_allclose(scores, [0.6, 0.0, 0.3, 0.5, 0.1])
    assert model.batches == [2, 2, 1]


def test_render_rgb_stretches_between_percentiles():
    patches = np.zeros((2, 8, 8, 4), dtype=np.uint16)
    patches[0, ..., :3] = 1000
    patches[1, ..., :3] = 3000
    patches[1, 0, 0, 0] = 65535  # one saturated pixel must not darken the rest
    patches[..., 3] = 9999  # channels beyond R, G, B are ignored
    images = render_rgb(patches, (1.0, 99.0))
    assert images.dtype == np.uint8 and images.shape == (2, 8, 8, 3)
    assert images[0].max() == 0 and images[1, 1, 1].min() == 255  # joint stretch: the darker patch stays dark
    assert render_rgb(np.full((1, 4, 4, 3), 500, np.uint16), (2.0, 98.0)).max() == 0  # flat: no division by zero


def test_worst_errors_are_ranked_and_each_patch_appears_once():
    predictions = pd.DataFrame(
        {
            "patch_id": ["a", "b", "c", "d", "e", "a"],
            "label": [1, 0, 0, 1, 0, 1],
            "score": [0.1, 0.9, 0.7, 0.3, 0.2, 0.1],
        }
    )
    false_pos, false_neg = worst_errors(predictions, 0.5, k=5)
    assert false_pos["patch_id"].tolist() == ["b", "c"]
    assert false_neg["patch_id"].tolist() == ["a", "d"]
    assert worst_errors(predictions, 0.5, k=1)[0]["patch_id"].tolist() == ["b"]


def test_plots_render_to_png_even_with_one_class_or_no_errors(tmp_path):
    curves = {"test": (LABELS, SCORES), "natural": (np.zeros(3, int), np.array([0.1, 0.2, 0.3]))}
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    figures = {
        "threshold": threshold_figure(curves, 0.5, 0.958),
        "pr": pr_curve_figure(curves, 0.5),
        "confusion": confusion_figure({name: binary_metrics(*c, 0.5) for name, c in curves.items()}, 0.5),
        "grid": worst_errors_figure(
            {"false positives": (images, ["x", "y"], np.array([0.9, 0.8])), "false negatives": (images[:0], [], [])},
            columns=3,
        ),
    }
    for name, fig in figures.items():
        fig.savefig(tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG_MAGIC


# --- bad input, found before a model is loaded ----------------------------------------------------------------------


@pytest.fixture
def data(tmp_path) -> tuple[Path, Path]:
    """A sample manifest with val and test splits, its natural set and tiles holding every patch."""
    ids = [f"p{i}" for i in range(12)]
    manifest = pd.DataFrame(
        {
            "patch_id": ids[:8],
            "label": np.array([1, 0] * 4, dtype=np.int8),
            "split": ["train", "train", "val", "val", "test", "test", "test", "test"],
            "season": "Summer",
            "country": "Austria",
        }
    )
    natural = manifest[manifest["split"] == "test"].assign(patch_id=ids[4:8])
    samples = tmp_path / "samples" / "small"
    samples.mkdir(parents=True)
    manifest.to_parquet(samples / "manifest.parquet", index=False)
    natural.to_parquet(samples / "natural.parquet", index=False)
    tiles = make_tiles(tmp_path / "tiles", np.zeros((12, 120, 120, 3), np.uint16), ids)
    return samples / "manifest.parquet", tiles


def run_evaluate(manifest: Path, tiles: Path) -> None:
    params = load_section("evaluate", EvaluateParams)
    evaluate(model_uri="runs:/nosuchrun/model", manifest=manifest, tiles=tiles, params=params, log_to_run=None)


def rewrite(path: Path, change) -> None:
    change(pd.read_parquet(path)).to_parquet(path, index=False)


def test_missing_inputs_are_named(data, tmp_path):
    manifest, tiles = data
    with pytest.raises(EvaluationError, match=r"nope\.parquet: not found"):
        run_evaluate(manifest.with_name("nope.parquet"), tiles)
    with pytest.raises(EvaluationError, match=re.escape(f"{tmp_path / 'elsewhere' / INDEX_FILE}: not found")):
        run_evaluate(manifest, tmp_path / "elsewhere")
    (manifest.parent / "natural.parquet").unlink()
    with pytest.raises(EvaluationError, match=r"natural\.parquet: not found"):
        run_evaluate(manifest, tiles)


def test_a_manifest_without_a_val_or_test_split_is_refused(data):
    manifest, tiles = data
    rewrite(manifest, lambda f: f.assign(split=f["split"].replace({"test": "train"})))
    with pytest.raises(EvaluationError, match=r"manifest\.parquet: has no test split"):
        run_evaluate(manifest, tiles)
    rewrite(manifest, lambda f: f.assign(split="train"))
    with pytest.raises(EvaluationError, match=r"manifest\.parquet: has no val split"):
        run_evaluate(manifest, tiles)


def test_one_class_in_val_is_refused(data):
    manifest, tiles = data
    rewrite(manifest, lambda f: f.assign(label=np.int8(0)))
    with pytest.raises(EvaluationError, match=r"manifest\.parquet: the val split holds only no_cloud patches"):
        run_evaluate(manifest, tiles)


def test_missing_columns_labels_and_untiled_patches_are_named(data):
    manifest, tiles = data
    rewrite(manifest.with_name("natural.parquet"), lambda f: f.assign(patch_id=["p4", "p5", "p6", "zz"]))
    with pytest.raises(EvaluationError, match=r"index\.parquet: 1 patches of the natural set are not tiled, e.g. zz"):
        run_evaluate(manifest, tiles)
    rewrite(manifest, lambda f: f.assign(label=np.int8(3)))
    with pytest.raises(EvaluationError, match="column label holds values other than 0 and 1"):
        run_evaluate(manifest, tiles)
    rewrite(manifest, lambda f: f.drop(columns="country"))
    with pytest.raises(EvaluationError, match=r"manifest\.parquet: lacks column\(s\) country"):
        run_evaluate(manifest, tiles)


def test_params_take_a_threshold_confidence_or_none():
    from tasks.lib.errors import ConfigError

    assert (
        load_section("evaluate", EvaluateParams, overrides=["evaluate.threshold_confidence=null"]).threshold_confidence
        is None
    )
    for bad in ("0", "1", "1.5"):
        with pytest.raises(ConfigError, match="threshold_confidence"):
            load_section("evaluate", EvaluateParams, overrides=[f"evaluate.threshold_confidence={bad}"])
    # Evaluations recorded before the setting existed (the gate re-reads their params) keep their rule.
    recorded = load_section("evaluate", EvaluateParams).model_dump(exclude={"threshold_confidence"})
    assert EvaluateParams.model_validate(recorded).threshold_confidence is None


def test_params_reject_bad_percentiles():
    from tasks.lib.errors import ConfigError

    with pytest.raises(ConfigError, match="stretch_percentiles"):
        load_section("evaluate", EvaluateParams, overrides=["evaluate.stretch_percentiles=[90, 10]"])
