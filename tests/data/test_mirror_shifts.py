"""Each drift of `tasks.mirror --shift` moves the data the way it says, and nothing else.

The pixel shifts (offset, gain, haze) are compared band for band with the reference archive of the same seed (the
session's small mirror: 40 synthesized patches and the 6 real ones, seed 5); the selection shifts (season, region,
cloud_fraction) by what the drawn names are. Small mirrors, one process each, so the module stays well under a minute.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tasks.lib import bigearthnet as ben
from tasks.lib.errors import ConfigError
from tasks.mirror import GAIN_BANDS, MirrorResult, _plan, build_mirror
from tests.conftest import mirror_params

REAL = {  # the example archive's patches, with their season and country
    "S2A_MSIL2A_20171221T112501_56_35": ("Winter", "Portugal"),
    "S2B_MSIL2A_20180204T94161_57_38": ("Winter", "Finland"),
    "S2A_MSIL2A_20170617T113321_36_85": ("Summer", "Ireland"),
}


def _read(result: MirrorResult) -> tuple[dict[tuple[str, str], np.ndarray], dict[str, bytes], dict[str, bytes]]:
    """(patch_id, band) → pixels, patch_id → metadata JSON bytes, band file name → bytes."""
    bands, meta, raw = {}, {}, {}
    with tarfile.open(result.archive) as tar:
        for member in tar:
            if not member.isfile():
                continue
            patch_id, name = Path(member.name).parts[-2:]
            data = tar.extractfile(member).read()
            if name.endswith(".json"):
                meta[patch_id] = data
            else:
                band = name.removesuffix(".tif").rsplit("_", 1)[1]
                bands[patch_id, band] = tifffile.imread(io.BytesIO(data))
                raw[name] = data
    return bands, meta, raw


def _shifted(tmp_path_factory, *shifts: str, patches: int = 40, seed: int = 5) -> MirrorResult:
    out = tmp_path_factory.mktemp("shifted")
    return build_mirror(out=out, params=mirror_params(patches=patches, seed=seed, shifts=list(shifts)), workers=1)


@pytest.fixture(scope="module")
def reference(small_mirror):
    return small_mirror, *_read(small_mirror)


# --- pixel shifts: same patches, same metadata, other digital numbers ----------------------------------------------


def _same_patches_and_metadata(shifted: MirrorResult, reference) -> tuple[dict, dict]:
    ref, ref_bands, ref_meta, _ = reference
    bands, meta, raw = _read(shifted)
    assert shifted.patch_ids == ref.patch_ids and shifted.cloud_patch_ids == ref.cloud_patch_ids
    assert meta == ref_meta
    assert bands.keys() == ref_bands.keys()
    return bands, raw


def test_offset_adds_1000_to_every_band_of_every_patch(tmp_path_factory, reference):
    shifted = _shifted(tmp_path_factory, "offset")
    assert shifted.shifts == ("offset=1000",)
    assert shifted.archive.name == "BigEarthNet-S2-mirror-40-5-offset1000.tar.gz"
    bands, _ = _same_patches_and_metadata(shifted, reference)
    ref_bands = reference[1]
    for key, before in ref_bands.items():
        after = bands[key]
        assert after.dtype == np.uint16
        expected = np.where(before > 0, np.minimum(before.astype(np.int64) + 1000, 65535), 0)
        np.testing.assert_array_equal(after, expected, err_msg=str(key))
    for band in ben.BANDS:  # what a drift monitor on per-band means sees
        shift = np.mean([bands[k].mean() - ref_bands[k].mean() for k in bands if k[1] == band])
        assert shift == pytest.approx(1000, abs=1), band


def test_offset_keeps_the_real_patches_tiff_tags_and_clips_instead_of_wrapping(tmp_path_factory, reference):
    shifted = _shifted(tmp_path_factory, "offset=65000", patches=2)
    _, _, raw = _read(shifted)
    ref_raw = reference[3]
    name = ben.band_file("S2A_MSIL2A_20171221T112501_56_35", "B04")
    with tifffile.TiffFile(io.BytesIO(raw[name])) as after, tifffile.TiffFile(io.BytesIO(ref_raw[name])) as before:
        assert {t.name: t.value for t in after.pages[0].tags} == {t.name: t.value for t in before.pages[0].tags}
        before_pixels = before.pages[0].asarray().astype(np.int64)
        expected = np.minimum(before_pixels + 65000, 65535)  # clipped at the top of uint16, never wrapped
        np.testing.assert_array_equal(after.pages[0].asarray(), expected)
    assert len(raw[name]) == len(ref_raw[name])


def test_gain_scales_the_visible_bands_only(tmp_path_factory, reference):
    shifted = _shifted(tmp_path_factory, "gain")
    bands, raw = _same_patches_and_metadata(shifted, reference)
    assert GAIN_BANDS == ("B02", "B03", "B04")
    for (patch_id, band), before in reference[1].items():
        if band in GAIN_BANDS:
            expected = np.where(before > 0, np.rint(before * 1.1), 0)
            np.testing.assert_array_equal(bands[patch_id, band], expected, err_msg=f"{patch_id} {band}")
        else:
            name = ben.band_file(patch_id, band)
            assert raw[name] == reference[3][name], name  # untouched, byte for byte


def test_haze_brightens_and_flattens_the_blue_most(tmp_path_factory, reference):
    shifted = _shifted(tmp_path_factory, "haze")
    bands, _ = _same_patches_and_metadata(shifted, reference)
    ref_bands = reference[1]
    mean_gain, contrast = {}, {}
    for band in ben.BANDS:
        keys = [k for k in bands if k[1] == band]
        mean_gain[band] = np.mean([bands[k].mean() - ref_bands[k].mean() for k in keys])
        contrast[band] = np.median([bands[k].std() / max(ref_bands[k].std(), 1e-6) for k in keys])
        assert contrast[band] < 1, band  # every band loses contrast under the veil
    dark = [k for k in bands if k[1] == "B02" and ref_bands[k].mean() < 1000]  # clear land, no cloud or snow
    assert len(dark) > 5
    assert np.mean([bands[k].mean() - ref_bands[k].mean() for k in dark]) > 300  # much brighter in the blue
    assert mean_gain["B02"] > mean_gain["B04"] > mean_gain["B08"]
    assert contrast["B02"] < contrast["B04"] < contrast["B11"] < contrast["B12"] < 1
    # 0.2 in the blue on average, 0.1-0.3 from patch to patch: contrast falls to 0.7-0.9 there.
    assert 0.7 < contrast["B02"] < 0.9


# --- selection shifts: other names, from the official lists ----------------------------------------------------


def test_season_draws_only_that_season_with_its_real_share_of_snow(tmp_path_factory, small_mirror):
    shifted = _shifted(tmp_path_factory, "season", patches=30)
    table = ben.name_table()
    assert set(table.loc[list(shifted.patch_ids), "season"]) == {"Winter"}
    assert {"S2A_MSIL2A_20171221T112501_56_35", "S2B_MSIL2A_20180204T94161_57_38"} <= set(shifted.patch_ids)
    assert "S2A_MSIL2A_20170617T113321_36_85" not in shifted.patch_ids  # a summer patch, even a real one
    assert len(shifted.cloud_patch_ids) == round(0.3 * 30)  # the cloud share is not the season shift's
    winter = _plan(mirror_params(patches=300, seed=5, shifts=["season=Winter"]), exclude=set())
    summer = _plan(mirror_params(patches=300, seed=5, shifts=["season=summer"]), exclude=set())
    reference = _plan(mirror_params(patches=300, seed=5), exclude=set())
    snow = lambda plans: sum(p.snow for p in plans) / sum(not p.cloud for p in plans)  # noqa: E731
    assert snow(reference) == pytest.approx(0.2, abs=0.01)
    assert snow(winter) > 0.6 and snow(summer) == 0  # winter: 0.2 × (36.7% / 10.6%) of real snow
    assert {p.season for p in summer} == {"Summer"}


def test_region_draws_only_a_country_the_reference_does_not_hold(tmp_path_factory, small_mirror):
    table = ben.name_table()
    assert "Luxembourg" not in set(table.loc[list(small_mirror.patch_ids), "country"])
    shifted = _shifted(tmp_path_factory, "region", patches=30)
    assert shifted.archive.name == "BigEarthNet-S2-mirror-30-5-regionLuxembourg.tar.gz"
    assert set(table.loc[list(shifted.patch_ids), "country"]) == {"Luxembourg"}
    assert len(shifted.patch_ids) == 30  # none of the 6 real patches is from Luxembourg
    assert len(shifted.cloud_patch_ids) == round(0.3 * 30)
    _, meta, _ = _read(shifted)
    assert all("UTM zone 31N" in json.loads(m)["projection"] for m in meta.values())  # rendered as Luxembourg


def test_cloud_fraction_changes_the_cloudy_share_and_not_the_rest():
    shifted = _plan(mirror_params(patches=80, seed=5, shifts=["cloud_fraction"]), exclude=set())
    reference = _plan(mirror_params(patches=80, seed=5), exclude=set())
    clouds = ben.cloud_and_shadow_patches()
    assert sum(p.cloud for p in shifted) == sum(p.patch_id in clouds for p in shifted) == round(0.6 * 80)
    assert sum(p.cloud for p in reference) == round(0.3 * 80)
    assert all(p.pixels is None for p in shifted)
    zero = _plan(mirror_params(patches=80, seed=5, shifts=["cloud_fraction=0"]), exclude=set())
    assert not any(p.cloud for p in zero)


def test_pixel_shifts_draw_the_same_patches_as_the_reference():
    reference = _plan(mirror_params(patches=80, seed=5), exclude=set())
    shifted = _plan(mirror_params(patches=80, seed=5, shifts=["offset", "gain", "haze"]), exclude=set())
    assert [replace(p, pixels=None) for p in shifted] == reference
    assert all(p.pixels is not None and 0.1 <= p.pixels.haze <= 0.3 for p in shifted)


def test_a_selection_the_official_lists_cannot_fill_is_a_config_error():
    # Luxembourg has 137 cloud-list names: not the 1,200 cloud patches of the 4,000-patch default.
    with pytest.raises(
        ConfigError, match="1200 cloud patches asked for, the official lists hold 137 of region=Luxembourg"
    ):
        _plan(mirror_params(shifts=["region"]), exclude=set())
