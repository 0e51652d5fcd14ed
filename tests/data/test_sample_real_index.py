"""The sampling step on the real BigEarthNet-S2 index (590,326 names) reproduces the seed project's set sizes."""

from __future__ import annotations

import pandas as pd
import pytest

from tasks.lib import bigearthnet as ben
from tasks.lib.config import load_section
from tasks.sample import SPLITS, SampleParams, build_sets

pytestmark = pytest.mark.slow

N_PATCHES, N_CLOUD = 590_326, 9_280


def params(**changes) -> SampleParams:
    return load_section("sample", SampleParams, overrides=[f"sample.{k}={v}" for k, v in changes.items()])


@pytest.fixture(scope="module")
def index() -> pd.DataFrame:
    """Every S2 patch name with country, season and the official cloud and snow flags."""
    names = ben.name_table().reset_index()
    cloud, snow = ben.cloud_and_shadow_patches(), ben.seasonal_snow_patches()
    names["cloud"] = [p in cloud for p in names["patch_id"]]
    names["snow"] = [p in snow for p in names["patch_id"]]
    return names


@pytest.fixture(scope="module")
def sets(index) -> dict[str, pd.DataFrame]:
    return build_sets(index, params())


def _counts(frame: pd.DataFrame) -> dict[tuple[str, int], int]:
    return frame.groupby(["split", "label"]).size().to_dict()


def test_the_index_is_the_one_the_anchors_count(index):
    assert len(index) == N_PATCHES and index["cloud"].sum() == N_CLOUD


def test_small_and_large_have_the_seed_projects_sizes_split_80_10_10(sets):
    assert _counts(sets["small"]) == {(s, c): n for s, n in zip(SPLITS, (960, 120, 120), strict=True) for c in (0, 1)}
    assert _counts(sets["large"]) == {(s, c): n for s, n in zip(SPLITS, (7424, 928, 928), strict=True) for c in (0, 1)}


def test_small_is_a_subset_of_large_with_the_same_splits(sets):
    for small, large in ((sets["small"], sets["large"]), (sets["small_natural"], sets["large_natural"])):
        small_split = small.set_index("patch_id")["split"]
        large_split = large.set_index("patch_id")["split"]
        assert small_split.index.isin(large_split.index).all()
        assert (large_split[small_split.index] == small_split).all()


def test_natural_sets_have_the_real_prevalence_and_no_train_or_val_patch(sets):
    trained = set(sets["large"].loc[sets["large"]["split"] != "test", "patch_id"])
    for name, n_test_cloud in (("small", 120), ("large", 928)):
        natural = sets[f"{name}_natural"]
        assert (natural["label"] == 1).sum() == n_test_cloud
        assert natural["label"].mean() == pytest.approx(N_CLOUD / N_PATCHES, abs=1e-5)
        assert not trained & set(natural["patch_id"])
    prevalence = params().natural_prevalence
    assert (sets["large_natural"]["label"] == 0).sum() == round(928 * (1 - prevalence) / prevalence)


def test_balanced_sets_mirror_each_class_season_mix(index, sets):
    large = sets["large"].merge(index, on="patch_id")
    no_cloud = large[large["label"] == 0]
    pool = index.loc[~index["cloud"], "season"].value_counts(normalize=True)
    assert (no_cloud["season"].value_counts(normalize=True) - pool).abs().max() < 0.002


def test_exclude_snow_draws_no_snow_patch_as_no_cloud(index):
    sets = build_sets(index, params(exclude_snow=True))
    snow = set(index.loc[index["snow"], "patch_id"])
    assert not snow & set(sets["large"]["patch_id"])
    assert _counts(sets["large"])[("test", 0)] == 928
