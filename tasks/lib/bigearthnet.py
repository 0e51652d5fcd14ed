"""BigEarthNet-S2 v1 format facts and the official lists shipped by the bigearthnet-common package.

The lists (cloud-and-shadow, seasonal snow, names with country and season) and the example archive are read as
package data; `bigearthnet_common.base` is never imported because it breaks with current fastcore.
"""

from __future__ import annotations

import bz2
import functools
import io
import re
from importlib import resources
from pathlib import Path

import pandas as pd
from bigearthnet_common import constants as _ben

# Band name → side length in pixels of its 1,200 m patch (10 m → 120, 20 m → 60, 60 m → 20).
BAND_SIZES: dict[str, int] = {
    **dict.fromkeys(_ben.BEN_10m_CHANNELS, 120),
    **dict.fromkeys(_ben.BEN_20m_CHANNELS, 60),
    **dict.fromkeys(_ben.BEN_60m_CHANNELS, 20),
}
BANDS: tuple[str, ...] = tuple(_ben.BEN_CHANNELS)  # B01 … B12 in the official order
RGB_BANDS: tuple[str, ...] = tuple(_ben.BEN_RGB_CHANNELS)  # the red, green and blue bands, in that order
PATCH_SIZE_M: int = _ben.BEN_PATCH_SIZE_M
LABELS: frozenset[str] = frozenset(_ben.OLD_LABELS)  # the 43 CORINE level-3 names used in labels_metadata.json
LABEL_ORDER: tuple[str, ...] = tuple(_ben.OLD_LABELS_ORIGINAL_ORDER)  # CORINE code order, as the JSON lists them
JSON_KEYS: frozenset[str] = frozenset(_ben.BEN_S2_V1_0_JSON_KEYS)
BAND_MEAN: dict[str, float] = dict(_ben.BAND_STATS_S2["mean"])
BAND_STD: dict[str, float] = dict(_ben.BAND_STATS_S2["std"])
# Anchored form of the official S2 patch-name pattern (the upstream one is unanchored and verbose).
PATCH_NAME_RE = re.compile(r"S2[AB]_MSIL2A_\d{8}T\d{5,6}_\d{1,2}_\d{1,2}")
PATCH_NAME_PATTERN = PATCH_NAME_RE.pattern

OFFICIAL_URL: str = _ben.URL
OFFICIAL_MD5: str = _ben.BEN_S2_V1_0_TAR_MD5SUM
EXAMPLE_TOP_FOLDER = "BigEarthNet-S2-Example"


def band_file(patch_id: str, band: str) -> str:
    return f"{patch_id}_{band}.tif"


def metadata_file(patch_id: str) -> str:
    return f"{patch_id}_labels_metadata.json"


def _package_file(name: str) -> resources.abc.Traversable:
    return resources.files("bigearthnet_common") / name


def example_archive() -> Path:
    """Path of the real 6-patch S2 example archive (tar.bz2) inside the installed package."""
    return Path(str(_package_file("BigEarthNet-S2-Example.tar.bz2")))


def _read_name_list(name: str) -> frozenset[str]:
    text = bz2.decompress(_package_file(name).read_bytes()).decode()
    return frozenset(line.strip() for line in text.splitlines() if line.strip())


@functools.cache
def cloud_and_shadow_patches() -> frozenset[str]:
    """The 9,280 official patch names with clouds or cloud shadows: the `cloud` label of this project."""
    return _read_name_list("patches_with_cloud_and_shadow.csv.bz2")


@functools.cache
def seasonal_snow_patches() -> frozenset[str]:
    """The 61,707 official patch names covered by seasonal snow (bright, but no_cloud)."""
    return _read_name_list("patches_with_seasonal_snow.csv.bz2")


@functools.cache
def name_table() -> pd.DataFrame:
    """All 590,326 S2 patch names with country and season, indexed by `patch_id`."""
    raw = bz2.decompress(_package_file("s1_s2_name_country_season.csv.bz2").read_bytes())
    table = pd.read_csv(io.BytesIO(raw), usecols=["s2_name", "country", "season"])
    return table.rename(columns={"s2_name": "patch_id"}).set_index("patch_id")
