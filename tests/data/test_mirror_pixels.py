"""The embedded default must make the cloud task learnable but not trivial, with plausible reflectances."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from tasks.lib import bigearthnet as ben
from tasks.mirror import _plan, _synthesize_bands
from tests.conftest import mirror_params

FEATURE_BANDS = ("B02", "B03", "B04", "B08", "B11", "B12")


@pytest.fixture(scope="module")
def patches():
    plans = _plan(mirror_params(patches=300, seed=11), exclude=set())
    return plans, [_synthesize_bands(p)[0] for p in plans]


def _summary(bands):
    return [f(bands[b].astype(float)) for b in FEATURE_BANDS for f in (np.mean, np.std, lambda a: np.percentile(a, 90))]


def test_cloud_is_learnable_from_pixels_but_not_by_one_brightness_threshold(patches):
    plans, bands = patches
    x = np.array([_summary(b) for b in bands])
    y = np.array([p.cloud for p in plans])
    majority = max(y.mean(), 1 - y.mean())
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    accuracy = cross_val_score(model, x, y, cv=5).mean()
    assert accuracy > majority + 0.08, (accuracy, majority)
    brightness = x[:, 0]
    best_threshold = max(((brightness > t) == y).mean() for t in np.unique(brightness))
    assert best_threshold < 0.95, "a single brightness threshold should not solve the task"


def test_clear_land_reflectance_is_near_bigearthnet_band_statistics(patches):
    plans, bands = patches
    clear = [b for p, b in zip(plans, bands, strict=True) if not (p.cloud or p.snow or p.bright_surface)]
    for band in ben.BANDS:
        mean = np.mean([b[band].mean() for b in clear])
        # Within a factor of two of the real dataset's mean (which also contains clouds and snow).
        assert ben.BAND_MEAN[band] / 2 < mean < ben.BAND_MEAN[band] * 2, (band, mean, ben.BAND_MEAN[band])


def test_snow_is_dark_in_short_wave_infrared_and_cloud_is_not(patches):
    plans, bands = patches
    snow = [b for p, b in zip(plans, bands, strict=True) if p.snow]
    thick = [b for p, b in zip(plans, bands, strict=True) if p.cloud and not p.thin_cloud]
    ratio = lambda b: b["B11"].mean() / b["B03"].mean()  # noqa: E731
    assert snow and thick
    assert np.median([ratio(b) for b in snow]) < np.median([ratio(b) for b in thick])
