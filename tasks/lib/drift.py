"""Has a snapshot moved away from a reference? Per-patch band features and column-by-column drift tests, run by
Evidently (the statistical tests behind its per-column `ValueDrift` metric), with its HTML `Report` as the artifact
people open.

Features are tabular, as Evidently wants them: for each patch of a seeded sample, each band's mean, standard
deviation and 5th and 95th percentiles (`FEATURE_STATS`); plus the context columns (season, country, the official
cloud label) and the model's score when known. A column drifts when its method's value crosses its threshold:
distances (Wasserstein, Jensen-Shannon, PSI) at or above it, p-values (K-S, chi-square) below it. Distances measure
how far a distribution moved, not whether a sample can tell, so big snapshots do not turn tiny shifts into alarms.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.lib.errors import MonitoringError

log = logging.getLogger(__name__)

FEATURE_STATS = ("mean", "std", "p05", "p95")
DISTANCE_METHODS = ("wasserstein", "jensenshannon", "psi", "hellinger")
P_VALUE_METHODS = ("ks", "chisquare", "z")
METHODS = DISTANCE_METHODS + P_VALUE_METHODS


def band_features(patches: np.ndarray, bands: tuple[str, ...] | list[str], stride: int = 1) -> pd.DataFrame:
    """One row per patch: `<band>_<stat>` for every band and FEATURE_STATS (percentiles on every `stride`-th pixel
    in each direction: a subsample that keeps the distribution, at a fraction of the sort).

    Each band's pixels are made contiguous first (band-last patches put a band's pixels 3 values apart, which made
    numpy's reductions over them ten times slower). Means and standard deviations come from exact integer sums of the
    pixels and their squares (the same values on every CPU, and a third of the float work); the percentiles are
    order statistics picked by one partial partition of the raw values, interpolated linearly as numpy's default
    percentile does."""
    n = len(patches)
    if n == 0:
        return pd.DataFrame(columns=[f"{b}_{s}" for b in bands for s in FEATURE_STATS], dtype=np.float64)
    by_band = np.ascontiguousarray(patches.reshape(n, -1, patches.shape[-1]).transpose(0, 2, 1))  # (n, band, pixel)
    mean, std = _moments(by_band)
    sampled = np.ascontiguousarray(
        patches[:, ::stride, ::stride, :].reshape(n, -1, patches.shape[-1]).transpose(0, 2, 1)
    )
    low, high = _percentiles(sampled, (5, 95))
    columns: dict[str, np.ndarray] = {}
    for i, band in enumerate(bands):
        columns[f"{band}_mean"] = mean[:, i]
        columns[f"{band}_std"] = std[:, i]
        columns[f"{band}_p05"] = low[:, i]
        columns[f"{band}_p95"] = high[:, i]
    return pd.DataFrame(columns).astype(np.float64)


def _moments(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) standard deviation along the last axis."""
    count = values.shape[-1]
    exact = values.dtype.kind in "ui" and count**2 * float(np.iinfo(values.dtype).max) ** 2 < 2**62
    if not exact:  # floats, or integers whose squared sums could overflow int64
        as_float = values.astype(np.float64)
        return as_float.mean(axis=-1), as_float.std(axis=-1)
    total = values.sum(axis=-1, dtype=np.int64)
    squares = np.einsum("...k,...k->...", values, values, dtype=np.int64)
    # count·Σx² − (Σx)² is count² × the variance, exactly: no rounding before the one division.
    return total / count, np.sqrt((count * squares - total * total) / count**2)


def _percentiles(values: np.ndarray, qs: tuple[float, ...]) -> list[np.ndarray]:
    """numpy's default ("linear") percentiles along the last axis, each from the two order statistics around it,
    all picked by one partial partition."""
    last = values.shape[-1] - 1
    positions = [last * q / 100 for q in qs]
    around = [(int(np.floor(p)), min(int(np.floor(p)) + 1, last)) for p in positions]
    ordered = np.partition(values, sorted({k for pair in around for k in pair}), axis=-1)
    result = []
    for position, (below, above) in zip(positions, around, strict=True):
        low, high = ordered[..., below].astype(np.float64), ordered[..., above].astype(np.float64)
        result.append(low + (high - low) * (position - below))
    return result


@dataclass(frozen=True)
class ColumnDrift:
    column: str
    kind: str  # numerical or categorical
    method: str
    value: float  # the method's distance or p-value
    threshold: float
    drifted: bool

    def reason(self, reference: pd.Series, current: pd.Series) -> str:
        relation = ">=" if self.method in DISTANCE_METHODS else "<"
        what = "distance" if self.method in DISTANCE_METHODS else "p-value"
        text = f"{self.column}: {self.method} {what} {self.value:.3g} {relation} threshold {self.threshold:g}"
        if self.kind == "numerical":
            return text + f" (median {reference.median():.4g} in the reference, {current.median():.4g} now)"
        before, after = _top_share(reference), _top_share(current)
        return text + f" (reference {before}; now {after})"


def _top_share(values: pd.Series, k: int = 3) -> str:
    shares = values.astype(str).value_counts(normalize=True).head(k)
    return ", ".join(f"{name} {share:.0%}" for name, share in shares.items())


def _evidently() -> Any:
    """Import Evidently 0.7, shimming the one pandas function it imports that pandas 3 removed.

    evidently.legacy.tests.data_integrity_tests imports pandas.core.dtypes.common.infer_dtype_from_object at import
    time; nothing on the drift path calls it. Defining it (as pandas 2 did: the scalar type of a dtype) lets the
    import succeed; the shim is only added when pandas lacks it.
    """
    import pandas.core.dtypes.common as common

    if not hasattr(common, "infer_dtype_from_object"):

        def infer_dtype_from_object(dtype: Any) -> type:
            return dtype if isinstance(dtype, type) else np.dtype(dtype).type

        common.infer_dtype_from_object = infer_dtype_from_object
    import evidently

    return evidently


def column_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    *,
    numerical: list[str],
    categorical: list[str],
    methods: dict[str, tuple[str, float]],
) -> list[ColumnDrift]:
    """Each column's drift of `current` against `reference` by Evidently's statistical test, the method and threshold
    `methods` gives its kind ("numerical", "categorical") or its own name.

    These are the functions Evidently's `ValueDrift` metric calls, on the same cleaned columns, so the values equal
    the report's; called directly they skip the plotly figures a report renders for every column while it computes
    (most of its time), which only `html_report` needs.
    """
    _evidently()
    from evidently.legacy.calculations.stattests import get_stattest
    from evidently.legacy.core import ColumnType

    results = []
    for column, kind, column_type in [
        *((c, "numerical", ColumnType.Numerical) for c in numerical),
        *((c, "categorical", ColumnType.Categorical) for c in categorical),
    ]:
        method, threshold = methods.get(column, methods[kind])
        ref, cur = (_finite(frame[column]) for frame in (reference, current))
        if ref.empty or cur.empty:
            side = "reference" if ref.empty else "new snapshot"
            raise MonitoringError(f"column {column!r} has no finite value in the {side}'s sample")
        test = get_stattest(ref, cur, column_type, method)
        value = float(test(ref, cur, column_type, threshold).drift_score)
        drifted = value >= threshold if method in DISTANCE_METHODS else value < threshold
        results.append(ColumnDrift(column, kind, method, value, threshold, bool(drifted)))
    return results


def _finite(values: pd.Series) -> pd.Series:
    """The values a drift test sees: infinities and NaN dropped, as Evidently's own column drift does."""
    return values.replace([-np.inf, np.inf], np.nan).dropna()


def html_report(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    columns: list[ColumnDrift],
    path: Path,
) -> dict[str, float]:
    """Evidently's HTML report of per-column `ValueDrift` (figures of both distributions per column) for `columns`,
    each with its method and threshold, saved to `path`; returns the report's own value per column."""
    _evidently()
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    names = [c.column for c in columns]
    definition = DataDefinition(
        numerical_columns=[c.column for c in columns if c.kind == "numerical"],
        categorical_columns=[c.column for c in columns if c.kind == "categorical"],
    )
    report = Report([ValueDrift(column=c.column, method=c.method, threshold=c.threshold) for c in columns])
    snapshot = report.run(
        Dataset.from_pandas(current[names], data_definition=definition),
        Dataset.from_pandas(reference[names], data_definition=definition),
    )
    snapshot.save_html(str(path))
    return {metric["config"]["column"]: float(metric["value"]) for metric in snapshot.dict()["metrics"]}
