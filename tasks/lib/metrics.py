"""The metrics of a binary cloud classifier and their flat MLflow names: pure functions of labels and scores,
shared by tasks.evaluate (which logs them) and tasks.gate (which judges slices by them)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from tasks.lib.errors import EvaluationError

DEFAULT_THRESHOLD = 0.5
AT_DEFAULT = "t50"  # the threshold part of metric names: at DEFAULT_THRESHOLD ...
AT_OPERATING = "op"  # ... and at the operating threshold
SETS = ("val", "test", "natural")  # the `set` values of predictions.parquet, in row order
THRESHOLD_METRICS = ("accuracy", "precision", "recall", "f1", "tn", "fp", "fn", "tp")
SCORE_METRICS = ("roc_auc", "average_precision", "log_loss")
COUNT_METRICS = ("patches", "positives")
OPERATING_THRESHOLD = "operating_threshold"
TARGET_RECALL = "target_recall"


def metric_name(dataset: str, metric: str, at: str | None = None) -> str:
    """The flat MLflow name of a metric: `<set>_<at>_<metric>`, or `<set>_<metric>` for a threshold-free one."""
    return "_".join(part for part in (dataset, at, metric) if part)


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Counts, metrics at `threshold` (score >= threshold is cloud) and threshold-free metrics of one set of patches.

    Well-defined for any input, one class or none included: what the data cannot define is NaN (precision with no
    patch flagged, recall with no cloud patch, F1 with neither, ROC-AUC and average precision with one class, every
    rate of an empty set); log loss is the binary cross-entropy with scores clipped away from 0 and 1 by
    scikit-learn.

    Returns:
        Keys COUNT_METRICS + THRESHOLD_METRICS + SCORE_METRICS; counts and confusion cells as ints.
    """
    from sklearn import metrics as skm

    y = np.asarray(labels).astype(np.int8)
    s = np.asarray(scores, dtype=np.float64)
    predicted = (s >= threshold).astype(np.int8)
    n, positives = len(y), int(y.sum())
    nan = float("nan")
    if n == 0:  # scikit-learn refuses empty input
        return (
            {"patches": 0, "positives": 0}
            | dict.fromkeys(THRESHOLD_METRICS, nan)
            | {"tn": 0, "fp": 0, "fn": 0, "tp": 0}
            | dict.fromkeys(SCORE_METRICS, nan)
        )
    tn, fp, fn, tp = (int(v) for v in skm.confusion_matrix(y, predicted, labels=[0, 1]).ravel())
    both_classes = 0 < positives < n
    return {
        "patches": n,
        "positives": positives,
        "accuracy": float(skm.accuracy_score(y, predicted)),
        "precision": float(skm.precision_score(y, predicted, zero_division=np.nan)),
        "recall": float(skm.recall_score(y, predicted, zero_division=np.nan)),
        "f1": float(skm.f1_score(y, predicted, zero_division=np.nan)),
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "tp": tp,
        # On one class scikit-learn warns and answers nan (ROC-AUC) or 0 (average precision): both are undefined.
        "roc_auc": float(skm.roc_auc_score(y, s)) if both_classes else nan,
        "average_precision": float(skm.average_precision_score(y, s)) if both_classes else nan,
        "log_loss": float(skm.log_loss(y, s, labels=[0, 1])),
    }


def set_metrics(dataset: str, labels: np.ndarray, scores: np.ndarray, thresholds: dict[str, float]) -> dict[str, float]:
    """Flat-named metrics of one set at each of `thresholds` (AT label → threshold), see `metric_name`."""
    out: dict[str, float] = {}
    for at, threshold in thresholds.items():
        values = binary_metrics(labels, scores, threshold)
        out |= {metric_name(dataset, m, at): values[m] for m in THRESHOLD_METRICS}
    out |= {metric_name(dataset, m): values[m] for m in (*COUNT_METRICS, *SCORE_METRICS)}
    return out


def slice_metrics(frame: pd.DataFrame, threshold: float, columns: tuple[str, ...] | list[str]) -> pd.DataFrame:
    """Metrics per value of each of `columns` (e.g. season, country) at `threshold`.

    Args:
        frame: label, score and the slice columns, one row per patch.

    Returns:
        One row per (column, value), sorted by both: column, value (as text), then binary_metrics' keys (patches and
        positives are the slice sizes; metrics undefined on a slice, e.g. recall of a slice with no cloud, are NaN).
    """
    keys = [*COUNT_METRICS, *THRESHOLD_METRICS, *SCORE_METRICS]
    rows = []
    for column in columns:
        for value, group in frame.groupby(frame[column].astype(str), sort=True):
            values = binary_metrics(group["label"].to_numpy(), group["score"].to_numpy(), threshold)
            rows.append({"column": column, "value": value, **{k: values[k] for k in keys}})
    return pd.DataFrame(rows, columns=["column", "value", *keys])


def as_scores(raw: Any, n: int) -> np.ndarray:
    """Coerce a pyfunc model's output (array, list, Series or one-column DataFrame) to n cloud probabilities.

    Raises:
        EvaluationError: the output is not n finite numbers in [0, 1].
    """
    if isinstance(raw, pd.DataFrame):
        if raw.shape[1] != 1:
            raise EvaluationError(f"model returned a frame with columns {list(raw.columns)}; expected one score column")
        raw = raw.iloc[:, 0]
    try:
        scores = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise EvaluationError(f"model returned {type(raw).__name__} that is not numeric: {exc}") from exc
    if scores.ndim == 2 and scores.shape[1] == 1:  # a (n, 1) sigmoid output is a common Keras shape
        scores = scores[:, 0]
    if scores.shape != (n,):
        raise EvaluationError(f"model returned scores of shape {scores.shape} for {n} patches; expected ({n},)")
    bad = ~np.isfinite(scores) | (scores < 0) | (scores > 1)
    if bad.any():
        example = float(scores[bad][0])
        raise EvaluationError(
            f"model returned {int(bad.sum())} scores that are not probabilities in [0, 1], e.g. {example}"
        )
    return scores
