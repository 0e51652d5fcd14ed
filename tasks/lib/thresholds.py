"""The operating threshold: the highest one whose recall reaches a target, optionally with a confidence that the
recall on new patches does too. Order statistics of the cloud scores, apart from the metrics they feed."""

from __future__ import annotations

import math

import numpy as np

RECALL_TOLERANCE = 1e-9  # target × positives is computed in floating point: 0.958 × 1000 must count as 958


def operating_threshold(
    labels: np.ndarray, scores: np.ndarray, target_recall: float, confidence: float | None = None
) -> float:
    """The highest threshold whose recall on these patches is at least `target_recall`; with `confidence`, the
    highest at which these patches show with that confidence that the recall on new patches is at least the target.

    With P cloud patches, recall at threshold t counts the cloud scores >= t, so the answer is the k-th highest
    cloud score, k = ceil(target_recall × P): any higher threshold loses a cloud patch below the target. Hence:
    - ties: cloud patches scoring the same as the k-th all count, so the recall reached may exceed the target;
    - the threshold is a score that occurs in the data; no-cloud scores do not move it (they only set precision);
    - when the target needs every cloud patch (target 1, or few cloud patches), it is the lowest cloud score, and
      can be 0 if the model gives a cloud patch 0 — then every patch is flagged, which the caller should report.

    That threshold reaches the target on these patches, not on new ones: the recall a new set of patches gets at it
    falls below the target more often than not (with P = 120 and a target of 0.958, its expected value is 0.950).
    `confidence` asks for a margin that follows from the data alone. The recall on new patches at the k-th highest
    of P cloud scores — distribution-free, for scores of patches drawn from the same population (exchangeable) — is
    Beta(k, P + 1 - k) distributed, so P(recall >= target) = P(Binomial(P, target) <= k - 1): the threshold is the
    k-th highest cloud score for the smallest k with that probability >= `confidence` (0.5: the median recall
    reaches the target; 0.9: a one-sided 90 % lower bound does), never above the threshold without `confidence`.
    When even the lowest cloud score does not give the confidence (P too small), it is the lowest cloud score: see
    `recall_confidence` for what was reached.

    Raises:
        ValueError: no cloud patches, a target outside (0, 1], or a confidence outside (0, 1).
    """
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall {target_recall} is outside (0, 1]")
    if confidence is not None and not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} is outside (0, 1)")
    positive = np.sort(np.asarray(scores, dtype=np.float64)[np.asarray(labels) == 1])[::-1]
    if not len(positive):
        raise ValueError("no cloud patches: recall is undefined")
    k = min(max(math.ceil(target_recall * len(positive) - RECALL_TOLERANCE), 1), len(positive))
    if confidence is not None:
        reached = recall_confidence(np.arange(1, len(positive) + 1), len(positive), target_recall)
        enough = np.flatnonzero(reached >= confidence - RECALL_TOLERANCE)
        k = max(k, int(enough[0]) + 1 if len(enough) else len(positive))
    return float(positive[k - 1])


def recall_confidence(k: np.ndarray | int, positives: int, target_recall: float) -> np.ndarray:
    """The probability that the recall on new patches at the k-th highest of `positives` cloud scores is at least
    `target_recall`: P(Binomial(positives, target_recall) <= k - 1) (see `operating_threshold`)."""
    from scipy import stats

    return stats.binom.cdf(np.asarray(k) - 1, positives, target_recall)
