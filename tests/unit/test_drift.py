"""tasks.lib.drift: band features, and drift values computed without a report equal Evidently's report's."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.lib import drift
from tasks.lib.errors import MonitoringError

METHODS = {"numerical": ("wasserstein", 0.2), "categorical": ("jensenshannon", 0.15), "score": ("ks", 0.05)}


def _frames(shift: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(3)

    def frame(n: int, moved: float) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "B04_mean": rng.normal(1000 + moved, 200, n),
                "B04_std": rng.gamma(4, 50, n),
                "score": rng.beta(2, 5 + moved / 100, n),
                "season": rng.choice(["Winter", "Summer", "Spring"], n, p=[0.2, 0.5, 0.3] if moved else None),
                "cloud": rng.choice(["True", "False"], n),
            }
        )

    return frame(300, 0.0), frame(250, shift)


@pytest.mark.parametrize("shift", [0.0, 400.0])
def test_the_values_without_a_report_are_the_reports_own(shift, tmp_path):
    reference, current = _frames(shift)
    columns = drift.column_drift(
        reference, current, numerical=["B04_mean", "B04_std", "score"], categorical=["season", "cloud"],
        methods=METHODS,
    )  # fmt: skip
    assert [c.method for c in columns] == ["wasserstein", "wasserstein", "ks", "jensenshannon", "jensenshannon"]
    reported = drift.html_report(reference, current, columns, tmp_path / "report.html")
    assert {c.column: c.value for c in columns} == pytest.approx(reported, rel=1e-12)
    assert (tmp_path / "report.html").read_text().lstrip().lower().startswith("<!doctype html")
    flagged = {c.column for c in columns if c.drifted}
    assert flagged == (set() if shift == 0 else {"B04_mean", "score", "season"})


def test_a_p_value_drifts_below_its_threshold_and_a_distance_at_or_above_it():
    reference, current = _frames(400.0)
    by_name = {c.column: c for c in drift.column_drift(
        reference, current, numerical=["B04_mean", "score"], categorical=[], methods=METHODS,
    )}  # fmt: skip
    assert by_name["score"].value < 0.05 and by_name["score"].drifted
    assert by_name["B04_mean"].value >= 0.2 and by_name["B04_mean"].drifted


def test_a_column_without_a_finite_value_is_named():
    reference, current = _frames(0.0)
    current["B04_mean"] = np.inf
    with pytest.raises(MonitoringError, match="'B04_mean' has no finite value in the new snapshot's sample"):
        drift.column_drift(reference, current, numerical=["B04_mean"], categorical=[], methods=METHODS)


def test_band_features_are_each_patchs_statistics():
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 4000, size=(5, 120, 120, 3), dtype=np.uint16)
    features = drift.band_features(patches, ["B04", "B03", "B02"], stride=1)
    assert features.shape == (5, 12)
    pixels = patches[2, :, :, 1].astype(np.float64)
    assert features.loc[2, "B03_mean"] == pytest.approx(pixels.mean(), rel=1e-6)
    assert features.loc[2, "B03_std"] == pytest.approx(pixels.std(), rel=1e-5)
    assert features.loc[2, "B03_p05"] == pytest.approx(np.percentile(pixels, 5))
    assert features.loc[2, "B03_p95"] == pytest.approx(np.percentile(pixels, 95))
