from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile

from tasks.lib import bigearthnet as ben
from tasks.lib.config import load_section
from tasks.lib.tiles import INDEX_FILE, MANIFEST_FILE, METADATA_FILE, STATS_FILE, load_patches
from tasks.tile import TileParams, TilingError, tile
from tasks.validate import ValidateParams, validate


def params(**changes) -> TileParams:
    return load_section("tile", TileParams, overrides=[f"tile.{k}={v}" for k, v in changes.items()])


@pytest.fixture(scope="module", autouse=True)
def dask_cluster():
    """One LocalCluster for the module, reached the way production reaches a remote one."""
    from distributed import LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        pytest.MonkeyPatch.context() as mp,
    ):
        mp.setenv("DASK_SCHEDULER_ADDRESS", cluster.scheduler_address)
        yield cluster


@pytest.fixture(scope="module")
def tiled(small_mirror_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiles") / "tiles"
    result = tile(patches=small_mirror_root, out=out, params=params(shard_patches=16))
    return result


def test_outputs_and_shards(tiled, small_mirror):
    out = tiled.out
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["channels"] == ["B04", "B03", "B02"] and manifest["channel_meaning"] == "red, green, blue"
    assert tiled.patches == 46 and tiled.shards == 3 and len(manifest["shards"]) == 3
    shards = [np.load(out / s, mmap_mode="r") for s in manifest["shards"]]
    assert [s.shape for s in shards] == [(16, 120, 120, 3), (16, 120, 120, 3), (14, 120, 120, 3)]
    assert all(s.dtype == np.uint16 for s in shards)
    index = pd.read_parquet(out / INDEX_FILE)
    assert sorted(index["patch_id"]) == sorted(small_mirror.patch_ids)
    assert not index.duplicated(["shard", "offset"]).any()


def test_pixels_are_the_band_files_in_red_green_blue_order(tiled, small_mirror_root):
    ids = sorted(p.name for p in small_mirror_root.iterdir())[::9]
    patches = load_patches(tiled.out, ids)
    for patch_id, patch in zip(ids, patches, strict=True):
        for c, band in enumerate(("B04", "B03", "B02")):
            expected = tifffile.imread(small_mirror_root / patch_id / ben.band_file(patch_id, band))
            np.testing.assert_array_equal(patch[..., c], expected)


def test_metadata_table(tiled, small_mirror):
    meta = pd.read_parquet(tiled.out / METADATA_FILE)
    assert list(meta["patch_id"]) == sorted(small_mirror.patch_ids)
    assert set(meta.loc[meta["cloud"], "patch_id"]) == set(small_mirror.cloud_patch_ids)
    names = ben.name_table().loc[meta["patch_id"]]
    assert list(meta["season"]) == list(names["season"]) and list(meta["country"]) == list(names["country"])
    assert all(len(labels) and set(labels) <= ben.LABELS for labels in meta["labels"])
    assert ((meta["lrx"] - meta["ulx"]) == ben.PATCH_SIZE_M).all()
    assert meta["snow"].dtype == bool and meta["acquisition_date"].str.match(r"\d{4}-\d\d-\d\d ").all()


def test_stats_match_numpy_over_all_pixels(tiled):
    meta = pd.read_parquet(tiled.out / METADATA_FILE)
    stats = json.loads((tiled.out / STATS_FILE).read_text())
    for name, ids in (("all", meta["patch_id"]), ("cloud", meta.loc[meta["cloud"], "patch_id"]),
                      ("no_cloud", meta.loc[~meta["cloud"], "patch_id"])):  # fmt: skip
        pixels = load_patches(tiled.out, list(ids)).astype(np.float64)
        for c, band in enumerate(stats["channels"]):
            s = stats[name][band]
            assert s["count"] == pixels[..., c].size
            assert s["mean"] == pytest.approx(pixels[..., c].mean(), rel=1e-12)
            assert s["std"] == pytest.approx(pixels[..., c].std(), rel=1e-9)
            assert (s["min"], s["max"]) == (pixels[..., c].min(), pixels[..., c].max())


def test_all_bands_are_stacked_and_upsampled(small_mirror_root, tmp_path):
    result = tile(patches=small_mirror_root, out=tmp_path / "t", params=params(bands="all"))
    manifest = json.loads((tmp_path / "t" / MANIFEST_FILE).read_text())
    assert manifest["channels"] == list(ben.BANDS)
    patch_id = sorted(p.name for p in small_mirror_root.iterdir())[3]
    (patch,) = load_patches(result.out, [patch_id])
    b01 = tifffile.imread(small_mirror_root / patch_id / ben.band_file(patch_id, "B01"))  # 20×20, 60 m
    np.testing.assert_array_equal(patch[::6, ::6, 0], b01)
    np.testing.assert_array_equal(patch[:6, :6, 0], np.full((6, 6), b01[0, 0]))
    b05 = tifffile.imread(small_mirror_root / patch_id / ben.band_file(patch_id, "B05"))  # 60×60, 20 m
    np.testing.assert_array_equal(patch[::2, ::2, ben.BANDS.index("B05")], b05)


def test_quarantined_patches_are_skipped_and_listed(faulty_mirror_root, faulty_mirror, tmp_path):
    vparams = load_section("validate", ValidateParams, overrides=["validate.max_bad_fraction=0.5"])
    report = validate(patches=faulty_mirror_root, out=tmp_path / "v", params=vparams)
    result = tile(patches=faulty_mirror_root, out=tmp_path / "t", params=params(), report=report.report_path)
    quarantined = {q["patch_id"] for q in report.report["quarantined"]}
    assert result.patches == len(faulty_mirror.patch_ids) - len(quarantined)
    manifest = json.loads((tmp_path / "t" / MANIFEST_FILE).read_text())
    assert set(manifest["skipped_quarantined"]) == quarantined
    assert not set(pd.read_parquet(tmp_path / "t" / INDEX_FILE)["patch_id"]) & quarantined


def test_a_failed_or_foreign_report_is_refused(faulty_mirror_root, small_mirror_root, tmp_path):
    report = validate(patches=faulty_mirror_root, out=tmp_path / "v",
                      params=load_section("validate", ValidateParams))  # fmt: skip
    with pytest.raises(TilingError, match="validation of this snapshot failed"):
        tile(patches=faulty_mirror_root, out=tmp_path / "t", params=params(), report=report.report_path)
    with pytest.raises(TilingError, match="the report is for"):
        tile(patches=small_mirror_root, out=tmp_path / "t", params=params(), report=report.report_path)
    with pytest.raises(TilingError, match="not a readable validation report"):
        tile(patches=small_mirror_root, out=tmp_path / "t", params=params(), report=tmp_path / "nope.json")


def test_rerun_is_skipped_and_changed_params_rebuild(small_mirror_root, tmp_path):
    out = tmp_path / "t"
    assert not tile(patches=small_mirror_root, out=out, params=params()).skipped
    assert tile(patches=small_mirror_root, out=out, params=params()).skipped
    assert not tile(patches=small_mirror_root, out=out, params=params(shard_patches=20)).skipped
    assert len(json.loads((out / MANIFEST_FILE).read_text())["shards"]) == 3


def test_a_crash_leaves_no_shard_under_a_final_name(small_mirror_root, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(small_mirror_root, broken)
    victim = sorted(broken.iterdir())[30]
    (victim / ben.band_file(victim.name, "B03")).write_bytes(b"not a tiff")
    with pytest.raises(Exception, match=r"not a TIFF|TiffFileError|invalid"):
        tile(patches=broken, out=tmp_path / "t", params=params(shard_patches=8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_identical_data_tiled_elsewhere_gives_identical_bytes(small_mirror_root, tmp_path):
    """The output is what DVC versions: it must not depend on where or when the patches were tiled."""
    elsewhere = tmp_path / "elsewhere" / small_mirror_root.name
    shutil.copytree(small_mirror_root, elsewhere, copy_function=shutil.copy)  # new paths, new file times
    first = tile(patches=small_mirror_root, out=tmp_path / "a", params=params())
    second = tile(patches=elsewhere, out=tmp_path / "b", params=params())
    files = sorted(p.relative_to(first.out) for p in first.out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second.out) for p in second.out.rglob("*") if p.is_file())
    for name in files:
        assert (first.out / name).read_bytes() == (second.out / name).read_bytes(), name
    state = json.loads((tmp_path / ".b.state.json").read_text())
    assert state["source"] == str(elsewhere.resolve())


def test_editing_a_band_file_makes_the_rerun_rebuild(small_mirror_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(small_mirror_root, root)
    assert not tile(patches=root, out=tmp_path / "t", params=params()).skipped
    band = next(root.rglob("*_B03.tif"))
    band.write_bytes(band.read_bytes())  # same bytes, new modification time: cannot be told apart from an edit
    assert not tile(patches=root, out=tmp_path / "t", params=params()).skipped


def test_sample_draws_its_sets_from_real_tile_output(tiled, tmp_path):
    from tasks.sample import SampleParams, sample

    sample_params = load_section("sample", SampleParams, overrides=["sample.small_per_class=10"])
    result = sample(tiles=tiled.out, out=tmp_path / "samples", dataset="small", params=sample_params)
    manifest = pd.read_parquet(result.manifest_path)
    assert len(manifest) == 20 and manifest["label"].sum() == 10
    index = pd.read_parquet(tiled.out / INDEX_FILE).set_index("patch_id")
    assert (manifest.set_index("patch_id")[["shard", "offset"]] == index.loc[manifest["patch_id"]]).all().all()
    assert set(manifest["season"]) <= {"Winter", "Spring", "Summer", "Fall"}
