from __future__ import annotations

import json
import logging
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest

from tasks import sample as sample_module
from tasks.lib.config import load_section
from tasks.lib.errors import ConfigError
from tasks.lib.tiles import INDEX_FILE, METADATA_FILE
from tasks.sample import (
    COLUMNS,
    SPLITS,
    SUMMARY_FILE,
    SampleError,
    SampleParams,
    _split_sequence,
    build_sets,
    sample,
)
from tests.conftest import REPO

SEASONS = ["Spring", "Summer", "Fall", "Winter"]
COUNTRIES = ["Finland", "Portugal", "Serbia"]


def params(**changes) -> SampleParams:
    changes = {"small_per_class": 200, **changes}
    return load_section("sample", SampleParams, overrides=[f"sample.{k}={v}" for k, v in changes.items()])


def synthetic_metadata(n: int = 4000, cloud_share: float = 0.3, seed: int = 0) -> pd.DataFrame:
    """A tile step's metadata table in miniature: about 1,200 cloud and 2,800 no_cloud patches, 10% snow."""
    rng = np.random.default_rng(seed)
    cloud = rng.random(n) < cloud_share
    return pd.DataFrame(
        {
            "patch_id": [f"S2A_MSIL2A_20170613T101031_{i // 100}_{i % 100}" for i in range(n)],
            "labels": [["Coniferous forest"]] * n,
            "cloud": cloud,
            "snow": ~cloud & (rng.random(n) < 0.1),
            "season": rng.choice(SEASONS, n),
            "country": rng.choice(COUNTRIES, n, p=[0.6, 0.3, 0.1]),
            "acquisition_date": "2017-06-13 10:10:31",
        }
    )


@pytest.fixture(scope="module")
def metadata() -> pd.DataFrame:
    return synthetic_metadata()


@pytest.fixture(scope="module")
def sets(metadata) -> dict[str, pd.DataFrame]:
    return build_sets(metadata, params(natural_prevalence=0.2))


def _counts(frame: pd.DataFrame) -> dict[tuple[str, int], int]:
    return frame.groupby(["split", "label"]).size().to_dict()


def _split_of(frame: pd.DataFrame) -> pd.Series:
    return frame.set_index("patch_id")["split"]


# --- build_sets -----------------------------------------------------------------------------------------------------


def test_frames_have_the_documented_keys_columns_and_order(sets):
    assert set(sets) == {"small", "large", "small_natural", "large_natural"}
    for frame in sets.values():
        assert list(frame.columns) == ["patch_id", "label", "split"]
        assert frame["label"].dtype == np.int8 and set(frame["label"]) == {0, 1}
        assert frame["patch_id"].is_unique
        split_rank = frame["split"].map(SPLITS.index)
        assert list(zip(split_rank, frame["patch_id"], strict=True)) == sorted(
            zip(split_rank, frame["patch_id"], strict=True)
        )


def test_small_has_small_per_class_of_each_class_split_80_10_10(sets):
    counts = _counts(sets["small"])
    assert counts == {(s, label): n for s, n in zip(SPLITS, (160, 20, 20), strict=True) for label in (0, 1)}


def test_large_has_every_cloud_patch_and_as_many_no_cloud_split_within_rounding(metadata, sets):
    large = sets["large"]
    n_cloud = int(metadata["cloud"].sum())
    assert set(large.loc[large["label"] == 1, "patch_id"]) == set(metadata.loc[metadata["cloud"], "patch_id"])
    assert (large["label"] == 0).sum() == n_cloud
    assert set(large.loc[large["label"] == 0, "patch_id"]) <= set(metadata.loc[~metadata["cloud"], "patch_id"])
    counts = _counts(large)
    for split, share in zip(SPLITS, (0.8, 0.1, 0.1), strict=True):
        assert counts[(split, 0)] == counts[(split, 1)]
        assert abs(counts[(split, 1)] - share * n_cloud) < 1


def test_small_is_a_subset_of_large_with_the_same_splits(sets):
    for small, large in ((sets["small"], sets["large"]), (sets["small_natural"], sets["large_natural"])):
        small_split, large_split = _split_of(small), _split_of(large)
        assert set(small_split.index) <= set(large_split.index)
        pd.testing.assert_series_equal(small_split, large_split[small_split.index])


@pytest.mark.parametrize("fractions", [(0.8, 0.1, 0.1), (0.7, 0.15, 0.15), (0.6, 0.3, 0.1), (1 / 3, 1 / 3, 1 / 3)])
def test_every_prefix_of_the_split_sequence_holds_each_share_within_one(fractions):
    p = params(**dict(zip(("train_fraction", "val_fraction", "test_fraction"), fractions, strict=True)))
    sequence = _split_sequence(3000, p)
    for split, share in zip(SPLITS, fractions, strict=True):
        prefix_counts = np.cumsum(sequence == split)
        exact = Fraction(share).limit_denominator(10**6) * np.arange(1, 3001)
        assert all(abs(c - e) < 1 for c, e in zip(prefix_counts, exact, strict=True))
    assert list(_split_sequence(100, p)) == list(sequence[:100])


def test_same_seed_and_shuffled_rows_give_identical_frames(metadata, sets):
    np.random.seed(123)  # the draw must not depend on global random state
    again = build_sets(metadata.sample(frac=1, random_state=1), params(natural_prevalence=0.2))
    assert again.keys() == sets.keys()
    for name, frame in sets.items():
        pd.testing.assert_frame_equal(again[name], frame)


def test_another_seed_draws_and_splits_differently(metadata, sets):
    other = build_sets(metadata, params(natural_prevalence=0.2, seed=8))
    small, other_small = sets["small"], other["small"]
    assert set(small["patch_id"]) != set(other_small["patch_id"])
    large, other_large = _split_of(sets["large"]), _split_of(other["large"])
    assert set(large.index) != set(other_large.index)
    cloud = sets["large"].loc[sets["large"]["label"] == 1, "patch_id"]  # every cloud patch is in both
    assert (large[cloud] != other_large[cloud]).mean() > 0.2
    assert _counts(other_small) == _counts(small)


def test_only_patch_id_and_cloud_are_needed(metadata):
    result = build_sets(metadata[["patch_id", "cloud"]], params(natural_prevalence=0.2))
    assert _counts(result["small"]) == _counts(build_sets(metadata, params(natural_prevalence=0.2))["small"])


def test_draws_mirror_each_class_season_and_country_mix(metadata, sets):
    small = sets["small"].merge(metadata, on="patch_id")
    for label, cloud in ((1, True), (0, False)):
        pool = metadata[metadata["cloud"] == cloud].groupby(["season", "country"]).size()
        drawn = small[small["label"] == label].groupby(["season", "country"]).size().reindex(pool.index, fill_value=0)
        expected = 200 * pool / pool.sum()
        assert (drawn - expected).abs().max() < 2, (drawn - expected).abs().max()


def test_exclude_snow_keeps_snow_out_of_no_cloud(metadata, sets):
    snow = set(metadata.loc[metadata["snow"], "patch_id"])
    assert snow & set(sets["large"]["patch_id"])  # without the option, snow patches are drawn like others
    excluded = build_sets(metadata, params(natural_prevalence=0.2, exclude_snow=True))
    for name in ("small", "large"):
        assert not snow & set(excluded[name]["patch_id"])
    # The natural set keeps the real world's snow: its prevalence is a share of the whole archive.
    assert snow & set(excluded["large_natural"]["patch_id"])


def test_exclude_snow_without_a_snow_column_is_an_error(metadata):
    with pytest.raises(SampleError, match=r"lacks column\(s\) snow \(exclude_snow is set\)"):
        build_sets(metadata.drop(columns="snow"), params(exclude_snow=True))


def test_a_class_below_min_class_fraction_of_a_split_names_set_split_and_class(metadata):
    # Five per class: the first five positions of 80/10/10 are train, train, train, val, train — no test patch.
    with pytest.raises(SampleError, match=r"the small set's test split holds 0 cloud patches of 0; every class"):
        build_sets(metadata, params(small_per_class=5))


def test_asking_for_more_patches_than_exist_names_the_counts(metadata):
    n_cloud = int(metadata["cloud"].sum())
    with pytest.raises(ConfigError, match=rf"small_per_class is 5000 but the metadata holds only {n_cloud} cloud"):
        build_sets(metadata, params(small_per_class=5000))
    cloudy = synthetic_metadata(cloud_share=0.6)
    n_cloud, n_clear = int(cloudy["cloud"].sum()), int((~cloudy["cloud"]).sum())
    with pytest.raises(SampleError, match=rf"needs {n_cloud} no_cloud patches .* holds only {n_clear}$"):
        build_sets(cloudy, params())
    n_snow = int(cloudy["snow"].sum())
    with pytest.raises(SampleError, match=rf"only {n_clear - n_snow} after excluding {n_snow} snow patches"):
        build_sets(cloudy, params(exclude_snow=True))


def test_natural_sets_have_the_prevalence_and_no_train_or_val_patch(metadata, sets):
    trained = set(sets["large"].loc[sets["large"]["split"] != "test", "patch_id"])
    for name in ("small", "large"):
        natural, balanced = sets[f"{name}_natural"], sets[name]
        assert set(natural["split"]) == {"test"}
        test_cloud = balanced.loc[(balanced["split"] == "test") & (balanced["label"] == 1), "patch_id"]
        assert set(natural.loc[natural["label"] == 1, "patch_id"]) == set(test_cloud)
        assert (natural["label"] == 0).sum() == round(len(test_cloud) * 0.8 / 0.2)
        assert not trained & set(natural["patch_id"])
        clear = set(metadata.loc[~metadata["cloud"], "patch_id"])
        assert set(natural.loc[natural["label"] == 0, "patch_id"]) <= clear


def test_too_few_patches_for_the_natural_prevalence_uses_all_and_warns(metadata, sets, caplog):
    with caplog.at_level(logging.WARNING, logger="tasks.sample"):
        result = build_sets(metadata, params())  # the default, real-world prevalence: ~1.6% cloud
    trained = set(sets["large"].loc[sets["large"]["split"] != "test", "patch_id"])
    eligible = set(metadata.loc[~metadata["cloud"], "patch_id"]) - trained
    natural = result["large_natural"]
    assert set(natural.loc[natural["label"] == 0, "patch_id"]) == eligible
    assert f"large_natural: {len(eligible)} no_cloud patches outside every train/val split" in caplog.text
    pd.testing.assert_frame_equal(result["large"], sets["large"])  # the prevalence changes nothing else


def test_bad_metadata_is_named(metadata):
    with pytest.raises(SampleError, match=r"lacks column\(s\) cloud"):
        build_sets(metadata.drop(columns="cloud"), params())
    twice = pd.concat([metadata, metadata.head(3)])
    with pytest.raises(SampleError, match=r"lists 3 patch_id\(s\) more than once, e.g. S2A_MSIL2A_20170613T101031_0_0"):
        build_sets(twice, params())
    holes = metadata.astype({"cloud": object})
    holes.loc[[1, 2], "cloud"] = None
    with pytest.raises(SampleError, match="column cloud has 2 missing values"):
        build_sets(holes, params())
    with pytest.raises(SampleError, match="column cloud holds 'False'; expected booleans"):
        build_sets(metadata.astype({"cloud": str}), params())
    pd.testing.assert_frame_equal(
        build_sets(metadata.astype({"cloud": int}), params())["large"], build_sets(metadata, params())["large"]
    )


def test_split_fractions_must_sum_to_one():
    with pytest.raises(ConfigError, match=r"val_fraction \+ test_fraction is 0.95, expected 1"):
        params(train_fraction=0.75)


# --- sample() and the CLI -------------------------------------------------------------------------------------------


@pytest.fixture
def tiles(tmp_path, metadata):
    """A tile step's output directory: metadata.parquet and index.parquet (20 patches per shard)."""
    directory = tmp_path / "tiles"
    directory.mkdir()
    metadata.to_parquet(directory / METADATA_FILE, index=False)
    order = metadata["patch_id"].sort_values(ignore_index=True)
    index = pd.DataFrame(
        {
            "patch_id": order,
            "shard": [f"shards/shard-{i // 20:05d}.npy" for i in range(len(order))],
            "offset": np.arange(len(order)) % 20,
        }
    )
    index.to_parquet(directory / INDEX_FILE, index=False)
    return directory


def test_sample_writes_manifest_natural_set_and_summary(tiles, tmp_path, metadata):
    p = params(natural_prevalence=0.2)
    result = sample(tiles=tiles, out=tmp_path / "samples", dataset="small", params=p)
    assert not result.skipped
    assert result.manifest_path == tmp_path / "samples" / "small" / "manifest.parquet"
    assert sorted(f.name for f in result.manifest_path.parent.iterdir()) == [
        "manifest.parquet",
        "natural.parquet",
        "summary.json",
    ]
    expected = build_sets(metadata, p)
    index = pd.read_parquet(tiles / INDEX_FILE).set_index("patch_id")
    for path, name in ((result.manifest_path, "small"), (result.natural_path, "small_natural")):
        table = pd.read_parquet(path)
        assert tuple(table.columns) == COLUMNS
        for column in ("patch_id", "split", "shard", "season", "country"):
            assert pd.api.types.is_string_dtype(table[column]), column
        assert table["label"].dtype == np.int8 and table["offset"].dtype == np.int64
        pd.testing.assert_frame_equal(table[["patch_id", "label", "split"]], expected[name])
        assert list(table["shard"]) == list(index.loc[table["patch_id"], "shard"])
        assert list(table["offset"]) == list(index.loc[table["patch_id"], "offset"])
        assert list(table["season"]) == list(metadata.set_index("patch_id").loc[table["patch_id"], "season"])
    summary = json.loads(result.summary_path.read_text())
    assert summary == result.summary
    assert summary["counts"] == {s: {"cloud": n, "no_cloud": n} for s, n in zip(SPLITS, (160, 20, 20), strict=True)}
    assert summary["natural"] == {
        "patches": 100,
        "cloud": 20,
        "no_cloud": 80,
        "prevalence": 0.2,
        "requested_prevalence": 0.2,
    }
    assert summary["seed"] == 7 and summary["params"] == p.model_dump()
    assert len(summary["input"]["fingerprint"]) == 64


def test_sample_is_skipped_when_inputs_and_params_are_unchanged(tiles, tmp_path):
    out = tmp_path / "samples"
    first = sample(tiles=tiles, out=out, dataset="large", params=params())
    stamp = first.manifest_path.stat().st_mtime_ns
    again = sample(tiles=tiles, out=out, dataset="large", params=params())
    assert again.skipped and again.summary == first.summary and first.manifest_path.stat().st_mtime_ns == stamp
    assert not sample(tiles=tiles, out=out, dataset="large", params=params(seed=8)).skipped
    assert not sample(tiles=tiles, out=out, dataset="small", params=params(seed=8)).skipped
    meta = pd.read_parquet(tiles / METADATA_FILE)
    meta.head(3000).to_parquet(tiles / METADATA_FILE, index=False)
    assert not sample(tiles=tiles, out=out, dataset="large", params=params(seed=8)).skipped


def test_a_crash_leaves_nothing_at_the_final_path_or_the_old_output_intact(tiles, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    out = tmp_path / "samples"
    monkeypatch.setattr(sample_module, "write_json", crash)  # after both parquet files are written
    with pytest.raises(RuntimeError, match="killed"):
        sample(tiles=tiles, out=out, dataset="small", params=params())
    assert list(out.iterdir()) == []
    monkeypatch.undo()
    done = sample(tiles=tiles, out=out, dataset="small", params=params())
    before = done.manifest_path.read_bytes()
    monkeypatch.setattr(sample_module, "write_json", crash)
    with pytest.raises(RuntimeError, match="killed"):
        sample(tiles=tiles, out=out, dataset="small", params=params(seed=8))
    assert [p.name for p in out.iterdir()] == ["small"]
    assert done.manifest_path.read_bytes() == before
    assert json.loads((out / "small" / SUMMARY_FILE).read_text()) == done.summary


def test_missing_inputs_are_named(tiles, tmp_path):
    with pytest.raises(ConfigError, match="dataset 'medium': expected one of small, large"):
        sample(tiles=tiles, out=tmp_path / "s", dataset="medium", params=params())
    with pytest.raises(SampleError, match=r"nowhere/metadata\.parquet: not found"):
        sample(tiles=tmp_path / "nowhere", out=tmp_path / "s", dataset="small", params=params())
    index = pd.read_parquet(tiles / INDEX_FILE)
    index.iloc[::2].to_parquet(tiles / INDEX_FILE, index=False)
    with pytest.raises(SampleError, match=r"patches of the small set are not in index\.parquet"):
        sample(tiles=tiles, out=tmp_path / "s", dataset="small", params=params())
    index.drop(columns="offset").to_parquet(tiles / INDEX_FILE, index=False)
    with pytest.raises(SampleError, match=r"index\.parquet: lacks column\(s\) offset"):
        sample(tiles=tiles, out=tmp_path / "s", dataset="small", params=params())
    assert not (tmp_path / "s").exists()


def test_cli_writes_both_sets_and_rejects_a_bad_request_in_one_line(tiles, tmp_path):
    command = [sys.executable, "-m", "tasks.sample", "--tiles", str(tiles), "--out", str(tmp_path / "s")]
    ok = subprocess.run([*command, "--set", "sample.small_per_class=100"], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == [str(tmp_path / "s" / d / "manifest.parquet") for d in ("small", "large")]
    bad = subprocess.run(
        [*command, "--dataset", "small", "--set", "sample.small_per_class=100000"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert "Traceback" not in bad.stderr
    (error,) = [line for line in bad.stderr.splitlines() if " ERROR " in line]
    assert error == bad.stderr.strip().splitlines()[-1]
    assert "small_per_class is 100000 but the metadata holds only" in error
