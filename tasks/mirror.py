"""Build BigEarthNet-S2-format archives of any size: the embedded default dataset of cloudscreen.

The archive has the exact BigEarthNet-S2 v1 layout (a top folder, one folder per patch, 12 uint16 GeoTIFF bands at
their native 120/60/20 px sizes, `<patch>_labels_metadata.json`). It holds the 6 real patches of bigearthnet-common's
example archive verbatim, plus synthesized patches whose names are real BigEarthNet names, a chosen share of them in
the official cloud-and-shadow list. Their pixels are synthesized so the cloud task is learnable but not trivial:
land-cover textures at real per-band reflectance levels, thick and thin clouds and shadows on cloud patches, and bright
non-cloud surfaces (textured, often soft-edged snow as bright as cloud in the visible; sand, rock, bright roofs;
light haze) on no_cloud patches. Same seed, same bytes.

Faults can be injected (`--fault KIND[=COUNT]`) so tests never hand-craft broken archives; which patch got which fault
is written, with the list of patches and which are cloud patches, to `<archive>.contents.json` beside it.

Drift can be rendered (`--shift KIND[=MAGNITUDE]`, params `mirror.shifts`) so drift monitoring is tested on data that
moved the way real Sentinel-2 archives have moved: a processing-baseline offset, a calibration gain, one season, another
cloud share, more haze, another country. Without shifts the archive is byte for byte the reference one.
"""

from __future__ import annotations

import enum
import functools
import gzip
import hashlib
import io
import json
import logging
import os
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tifffile
from pydantic import Field, field_validator
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from tasks.lib import bigearthnet as ben
from tasks.lib import cli
from tasks.lib.config import StepParams, load_section
from tasks.lib.errors import ConfigError
from tasks.lib.files import atomic_path, file_digest
from tasks.lib.outputs import completed

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

# Archive members carry this fixed time so that the same seed gives byte-identical archives.
_MEMBER_MTIME = int(datetime(2019, 1, 1).timestamp())


class MirrorParams(StepParams):
    patches: int = Field(ge=0)
    seed: int
    cloud_fraction: float = Field(ge=0, le=1)
    include_real: bool
    snow_fraction: float = Field(ge=0, le=1)
    bright_surface_fraction: float = Field(ge=0, le=1)
    thin_cloud_fraction: float = Field(ge=0, le=1)
    shadow_fraction: float = Field(ge=0, le=1)
    haze_fraction: float = Field(default=0.0, ge=0, le=1)
    compresslevel: int = Field(ge=0, le=9)
    # Drift to render ("KIND" or "KIND=MAGNITUDE", see Shift); stored as "KIND=MAGNITUDE" in Shift order, so the same
    # drift spelled another way gives the same recipe and the same bytes.
    shifts: tuple[str, ...]

    @field_validator("shifts", mode="before")
    @classmethod
    def _canonical_shifts(cls, value: object) -> tuple[str, ...]:
        if value is None:
            value = ()
        elif isinstance(value, str):
            value = (value,)
        elif not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"mirror.shifts: expected a list of 'KIND' or 'KIND=MAGNITUDE' strings, got {value!r}")
        # A ConfigError, not a ValueError: pydantic passes it on as it is, naming the bad shift and the known kinds.
        return canonical_shifts(parse_shifts(value))


class Fault(enum.StrEnum):
    """Defects a real archive can have; each is caught by tasks.validate with its own reason."""

    CORRUPT_BAND = "corrupt_band"  # a band file cut short: not a readable TIFF
    MISSING_BAND = "missing_band"
    WRONG_SHAPE = "wrong_shape"  # a 10 m band stored at 60×60
    MISSING_JSON = "missing_json"
    MALFORMED_JSON = "malformed_json"
    UNKNOWN_LABEL = "unknown_label"  # a label outside the 43 CORINE names
    DUPLICATE_PATCH = "duplicate_patch"  # a second name with identical band data (a train/test leak)
    ZERO_BAND = "zero_band"  # a band of zeros (nodata everywhere)
    SATURATED_BAND = "saturated_band"
    NODATA_BAND = "nodata_band"  # most of a band is nodata (0)


class Shift(enum.StrEnum):
    """Ways real Sentinel-2 archives have drifted; docs/steps/mirror.md gives each one's real precedent."""

    OFFSET = "offset"  # DN added to every band's valid pixels (processing baseline 04.00 added 1,000 from 2022-01-25)
    GAIN = "gain"  # a calibration factor on the visible bands B02 B03 B04 (sensor or calibration change)
    SEASON = "season"  # acquisitions of one season only
    CLOUD_FRACTION = "cloud_fraction"  # another share of patches from the official cloud-and-shadow list
    HAZE = "haze"  # a haze veil (smoke, dust, aerosol) over every patch, thickest in the blue
    REGION = "region"  # patches of one country only, one the reference hardly holds


# MAGNITUDE when a shift is given as KIND alone.
SHIFT_DEFAULTS: dict[Shift, str] = {
    Shift.OFFSET: "1000",  # the offset of processing baseline 04.00
    Shift.GAIN: "1.1",  # strong for a calibration change (those are a few percent), so a test sees it at once
    Shift.SEASON: "Winter",  # low sun and three times the snow of the whole archive
    Shift.CLOUD_FRACTION: "0.6",  # twice the reference's 0.3
    Shift.HAZE: "0.2",  # the veil's mean opacity in B02
    Shift.REGION: "Luxembourg",  # 43 of the default 4,000 and absent from small mirrors (docs/steps/mirror.md)
}
# The visible bands: the three the classifier sees (tiles hold B04 B03 B02), and where calibration and atmospheric
# correction differ most between sensors and processing versions.
GAIN_BANDS = ("B02", "B03", "B04")
# Central wavelengths (nm, Sentinel-2A) for the haze veil, whose opacity falls with wavelength like aerosol scattering.
_WAVELENGTH_NM = {
    "B01": 443,
    "B02": 490,
    "B03": 560,
    "B04": 665,
    "B05": 705,
    "B06": 740,
    "B07": 783,
    "B08": 842,
    "B8A": 865,
    "B09": 945,
    "B11": 1610,
    "B12": 2190,
}
_HAZE_ANGSTROM = 1.3  # Ångström exponent of continental haze and smoke (desert dust is flatter, ~0.3)
_HAZE_AIRLIGHT = 3000  # the veil's own reflectance × 10,000: a bright grey layer, thinner than cloud (~7,000)


def parse_shifts(specs: Iterable[str]) -> dict[Shift, int | float | str]:
    """['offset', 'season=winter'] → {Shift.OFFSET: 1000, Shift.SEASON: 'Winter'}, in Shift order.

    Raises:
        ConfigError: an unknown kind, a kind given twice, or a magnitude of the wrong type or out of range; the
            message names the shift and the known kinds.
    """
    parsed: dict[Shift, int | float | str] = {}
    for spec in specs:
        kind, sep, raw = spec.strip().partition("=")
        try:
            shift = Shift(kind.strip())
        except ValueError:
            raise ConfigError(f"shift {spec!r}: unknown kind; choose from {', '.join(Shift)}") from None
        if shift in parsed:
            raise ConfigError(f"shift {spec!r}: {shift} is given twice")
        raw = raw.strip() if sep else SHIFT_DEFAULTS[shift]
        parsed[shift] = _magnitude(shift, raw, spec)
    return {shift: parsed[shift] for shift in Shift if shift in parsed}


def _magnitude(shift: Shift, raw: str, spec: str) -> int | float | str:
    """The MAGNITUDE of one shift, checked and in its canonical form."""
    wanted = {
        Shift.OFFSET: "an integer number of DN from -65535 to 65535, e.g. offset=1000",
        Shift.GAIN: "a factor above 0 and at most 100, e.g. gain=1.1",
        Shift.CLOUD_FRACTION: "a share from 0 to 1, e.g. cloud_fraction=0.6",
        Shift.HAZE: "the veil's opacity in B02, above 0 and at most 0.6, e.g. haze=0.2",
        Shift.SEASON: f"a season, one of {', '.join(_SEASON_SUN)}",
        Shift.REGION: f"a BigEarthNet country, one of {', '.join(sorted(_COUNTRY_COVERS))}",
    }[shift]
    bad = ConfigError(f"shift {spec!r}: MAGNITUDE must be {wanted}")
    if shift in (Shift.SEASON, Shift.REGION):
        names = {name.lower(): name for name in (_SEASON_SUN if shift is Shift.SEASON else _COUNTRY_COVERS)}
        if raw.lower() not in names:
            raise bad
        return names[raw.lower()]
    try:
        value = int(raw) if shift is Shift.OFFSET else float(raw)
    except ValueError:
        raise bad from None
    inside = {
        Shift.OFFSET: -65535 <= value <= 65535,
        Shift.GAIN: 0 < value <= 100,
        Shift.CLOUD_FRACTION: 0 <= value <= 1,
        Shift.HAZE: 0 < value <= 0.6,
    }[shift]
    if not inside:  # also NaN, whose comparisons are all false
        raise bad
    return value


def canonical_shifts(shifts: dict[Shift, int | float | str]) -> tuple[str, ...]:
    return tuple(f"{shift}={value}" for shift, value in shifts.items())


@dataclass(frozen=True)
class MirrorResult:
    archive: Path
    sha256: str
    patch_ids: tuple[str, ...]  # every patch folder in the archive, sorted
    cloud_patch_ids: tuple[str, ...]  # those in the official cloud-and-shadow list
    faults: dict[str, str]  # patch_id → fault kind (duplicates: "duplicate_patch:<original>")
    skipped: bool  # the archive already existed with a matching checksum
    shifts: tuple[str, ...] = ()  # the drift rendered, "KIND=MAGNITUDE" (none: the reference archive)


def archive_name(patches: int, seed: int, faulty: bool = False, shifts: Iterable[str] = ()) -> str:
    """BigEarthNet-S2-mirror-<patches>-<seed>[-<kind><magnitude>…][-faulty].tar.gz: a drifted archive never takes the
    name of the reference one it is compared with."""
    drift = "".join(f"-{spec.replace('=', '')}" for spec in shifts)
    return f"BigEarthNet-S2-mirror-{patches}-{seed}{drift}{'-faulty' if faulty else ''}.tar.gz"


# --- spectra ----------------------------------------------------------------------------------------------------
# Bottom-of-atmosphere reflectance × 10,000 (the L2A digital numbers of BigEarthNet) per band, in ben.BANDS order
# B01 B02 B03 B04 B05 B06 B07 B08 B8A B09 B11 B12. What separates the bright classes: clouds stay bright in the
# short-wave infrared (B11, B12) where snow turns dark, and clouds are flat across the visible where sand is red.
_SPECTRA = {
    "conifer": [250, 240, 380, 230, 650, 1700, 2100, 2300, 2500, 2400, 1100, 500],
    "broadleaf": [280, 300, 560, 330, 900, 2500, 3100, 3400, 3600, 3300, 1700, 750],
    "grass": [330, 380, 700, 480, 1100, 2300, 2800, 3000, 3200, 3000, 2100, 1100],
    "arable": [850, 950, 1250, 1550, 1850, 2150, 2350, 2450, 2650, 2550, 2950, 2350],
    "water": [420, 460, 420, 260, 200, 150, 130, 110, 100, 90, 50, 30],
    "urban": [950, 1050, 1150, 1250, 1450, 1650, 1750, 1850, 1950, 1850, 2250, 1950],
    "wetland": [350, 380, 520, 480, 780, 1300, 1500, 1650, 1750, 1650, 1350, 780],
    # bright, but not cloud
    # Fresh snow is as bright and as flat across the visible as cloud; only the short-wave infrared tells them apart.
    "snow": [7000, 7200, 7100, 7150, 6900, 6700, 6500, 6400, 6200, 4500, 900, 700],
    "sand": [1700, 1900, 2500, 3100, 3400, 3600, 3750, 3850, 3950, 3700, 4800, 4200],
    "rock": [1500, 1650, 1950, 2250, 2550, 2750, 2850, 2950, 3050, 2850, 3550, 3150],
    "roofs": [2100, 2500, 2700, 2900, 3000, 3100, 3200, 3300, 3300, 3100, 3700, 3300],
    # white roofs, greenhouses, salt flats: ~0.5 reflectance, grey across the visible (the soft-edged bright covers)
    "bright": [4700, 4900, 4950, 5000, 5200, 5300, 5400, 5500, 5500, 5200, 5600, 5000],
    # clouds
    "cloud": [6800, 7200, 7100, 7200, 7300, 7400, 7450, 7500, 7550, 4800, 5400, 4100],
}
_SPECTRA_ARRAY = {name: np.asarray(v, dtype=np.float32)[:, None, None] for name, v in _SPECTRA.items()}
# Everyday land covers by country (dominant first), and the CORINE labels each cover stands for.
_COUNTRY_COVERS = {
    "Finland": ["conifer", "wetland", "water", "broadleaf", "grass"],
    "Lithuania": ["arable", "grass", "broadleaf", "conifer", "water"],
    "Ireland": ["grass", "wetland", "arable", "water", "urban"],
    "Portugal": ["broadleaf", "arable", "grass", "urban", "water"],
    "Serbia": ["arable", "broadleaf", "grass", "urban", "water"],
    "Kosovo": ["arable", "broadleaf", "grass", "urban"],
    "Austria": ["conifer", "grass", "arable", "broadleaf", "urban"],
    "Switzerland": ["conifer", "grass", "urban", "water", "broadleaf"],
    "Belgium": ["arable", "urban", "grass", "broadleaf"],
    "Luxembourg": ["arable", "broadleaf", "grass", "urban"],
}
_COVER_LABELS = {
    "conifer": ["Coniferous forest", "Mixed forest"],
    "broadleaf": ["Broad-leaved forest", "Mixed forest", "Transitional woodland/shrub"],
    "grass": ["Pastures", "Natural grassland", "Complex cultivation patterns"],
    "arable": ["Non-irrigated arable land", "Complex cultivation patterns"],
    "water": ["Water bodies", "Water courses"],
    "urban": ["Discontinuous urban fabric", "Industrial or commercial units"],
    "wetland": ["Peatbogs", "Moors and heathland", "Inland marshes"],
    "sand": ["Beaches, dunes, sands"],
    "rock": ["Bare rock", "Sparsely vegetated areas"],
    "roofs": ["Continuous urban fabric", "Industrial or commercial units"],
}
_SEASON_SUN = {"Winter": 0.7, "Fall": 0.85, "Spring": 0.95, "Summer": 1.0}
# UTM zone and a typical upper-left northing of each country's tiles, for plausible coordinates and projections.
_COUNTRY_UTM = {
    "Finland": (35, 7_000_000),
    "Lithuania": (34, 6_150_000),
    "Ireland": (29, 5_900_000),
    "Portugal": (29, 4_500_000),
    "Serbia": (34, 4_950_000),
    "Kosovo": (34, 4_730_000),
    "Austria": (33, 5_300_000),
    "Switzerland": (32, 5_200_000),
    "Belgium": (31, 5_650_000),
    "Luxembourg": (31, 5_530_000),
}


@dataclass(frozen=True)
class _PatchPlan:
    """What one synthesized patch will show; drawn up front so workers need only this and a seed."""

    patch_id: str
    country: str
    season: str
    cloud: bool
    snow: bool
    bright_surface: bool
    thin_cloud: bool
    shadow: bool
    seed: int
    haze: bool = False  # a light grey veil over a no_cloud patch (haze, smoke, dust: not cloud)
    pixels: _PixelShift | None = None  # drift applied to the rendered band files (shifts offset, gain, haze)


@dataclass(frozen=True)
class _PixelShift:
    """Drift of one patch's digital numbers, applied to valid pixels (0 is nodata and stays 0, as in the products)."""

    offset: int = 0  # added last, as a processing baseline adds it to the finished product
    gain: float = 1.0  # on GAIN_BANDS, before the offset: a calibration factor scales the measured signal
    haze: float = 0.0  # the veil's opacity in B02 on this patch, applied first (the atmosphere comes before the sensor)

    @classmethod
    def of(cls, shifts: dict[Shift, int | float | str], seed: int, patch_id: str) -> _PixelShift | None:
        """This patch's pixel drift, or None when no pixel shift is asked for."""
        if not {Shift.OFFSET, Shift.GAIN, Shift.HAZE} & set(shifts):
            return None
        haze = 0.0
        if Shift.HAZE in shifts:
            # Thicker over some patches than others, the same for a patch whatever else the archive holds.
            rng = np.random.default_rng([seed, 3, zlib.crc32(patch_id.encode())])
            haze = float(shifts[Shift.HAZE]) * float(rng.uniform(0.5, 1.5))
        return cls(offset=int(shifts.get(Shift.OFFSET, 0)), gain=float(shifts.get(Shift.GAIN, 1.0)), haze=haze)

    def apply(self, band: str, array: np.ndarray) -> np.ndarray:
        """The band's uint16 digital numbers after the drift, clipped to 1..65535 (never wrapping, never nodata)."""
        x = array.astype(np.float64)
        if self.haze:
            # A scattering layer: transmits (1 - t) of the ground signal and adds its own light; t falls with
            # wavelength (Ångström law), so haze brightens and flattens the blue most and barely touches the SWIR.
            t = min(0.95, self.haze * (_WAVELENGTH_NM["B02"] / _WAVELENGTH_NM[band]) ** _HAZE_ANGSTROM)
            x = x * (1 - t) + _HAZE_AIRLIGHT * t
        if band in GAIN_BANDS:
            x = x * self.gain
        x = x + self.offset
        shifted = np.clip(np.rint(x), 1, np.iinfo(np.uint16).max).astype(np.uint16)
        return np.where(array > 0, shifted, np.uint16(0))


# --- noise and pixels ---------------------------------------------------------------------------------------------


@functools.cache
@functools.cache
def _bilinear_weights(cells: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each of `size` pixels along an axis: the grid cell it falls in and the weights of its two corners."""
    pos = np.linspace(0, cells, size, dtype=np.float64)
    lo = np.minimum(pos.astype(int), cells - 1)
    frac = pos - lo
    return lo, (1 - frac).astype(np.float32), frac.astype(np.float32)


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear interpolation of a (cells+1)² grid to size² pixels, one axis after the other.

    Element-wise arithmetic only: a matrix product (BLAS) sums in an order that depends on the CPU's kernels, so the
    same seed gave other bytes on AVX-512 machines than on AVX2 ones; each element-wise operation is rounded the same
    everywhere."""
    lo, left, right = _bilinear_weights(grid.shape[0] - 1, size)
    rows = grid[lo] * left[:, None] + grid[lo + 1] * right[:, None]
    return rows[:, lo] * left[None, :] + rows[:, lo + 1] * right[None, :]


def _fractal_noise(rng: np.random.Generator, size: int = 120, octaves: tuple[int, ...] = (3, 6, 12, 30)) -> np.ndarray:
    """Smooth noise with detail at several scales, normalised to mean 0, std 1."""
    out = np.zeros((size, size), dtype=np.float32)
    for i, cells in enumerate(octaves):
        out += np.float32(0.55**i) * _upsample(rng.standard_normal((cells + 1, cells + 1)).astype(np.float32), size)
    return (out - out.mean()) / (out.std() + 1e-6)


def _soft_mask(noise: np.ndarray, coverage: float, softness: float) -> np.ndarray:
    """A 0..1 mask covering about `coverage` of the patch, with soft edges."""
    threshold = np.quantile(noise, 1 - coverage)
    return 1 / (1 + np.exp(-(noise - threshold) / softness))


def _land(rng: np.random.Generator, plan: _PatchPlan) -> tuple[np.ndarray, list[str]]:
    """(12, 120, 120) land reflectance and the covers that occupy a visible share of it."""
    pool = _COUNTRY_COVERS[plan.country]
    n_covers = int(rng.integers(1, 4))
    # Dominant covers of the country come up more often.
    weights = np.linspace(2.0, 1.0, len(pool))
    covers = list(rng.choice(pool, size=min(n_covers, len(pool)), replace=False, p=weights / weights.sum()))
    if plan.bright_surface:
        covers[0] = str(rng.choice(["sand", "rock", "roofs"]))
    fields = np.stack([_fractal_noise(rng) + (1.2 if i == 0 else 0) for i in range(len(covers))])
    if "arable" in covers or "urban" in covers:
        # Parcels and blocks: piecewise-constant noise looks like fields and streets, not clouds.
        blocks = rng.standard_normal((8, 8)).astype(np.float32)
        fields += 0.6 * np.kron(blocks, np.ones((15, 15), dtype=np.float32))[None]
    winner = fields.argmax(axis=0)
    reflectance = np.zeros((len(ben.BANDS), 120, 120), dtype=np.float32)
    present = []
    for i, cover in enumerate(covers):
        share = float((winner == i).mean())
        if share == 0:
            continue
        if share > 0.05:
            present.append(cover)
        texture = 1 + 0.12 * _fractal_noise(rng, octaves=(6, 20, 60))
        reflectance += (winner == i) * _SPECTRA_ARRAY[cover] * texture * float(rng.uniform(0.85, 1.15))
    reflectance *= _SEASON_SUN[plan.season]
    if plan.bright_surface:
        # Bright, textured covers with soft edges over part of the patch (greenhouses, white roofs, salt, pale sand),
        # so that "bright and soft-edged with internal variation" is not cloud alone.
        mask = _soft_mask(_fractal_noise(rng), float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.1, 0.6)))
        level = float(rng.uniform(0.45, 0.6)) / 0.49  # visible reflectance 0.45-0.6
        texture = 1 + 0.15 * _fractal_noise(rng, octaves=(4, 12, 40))
        reflectance = reflectance * (1 - mask) + _SPECTRA_ARRAY["bright"] * level * texture * mask
    if plan.snow:
        # Snow with cloud-like texture; most of it with soft edges (melting, patchy snow, snow under trees).
        softness = float(rng.uniform(0.3, 0.6)) if rng.random() < 0.7 else 0.15
        snow = _soft_mask(_fractal_noise(rng), float(rng.uniform(0.3, 1.0)), softness)
        texture = 1 + 0.15 * _fractal_noise(rng, octaves=(4, 12, 40))
        snow_level = float(rng.uniform(0.8, 1.05)) * texture
        reflectance = reflectance * (1 - snow) + _SPECTRA_ARRAY["snow"] * snow_level * snow
    if plan.haze:
        # A light veil over the whole patch, thickest in places: haze, smoke or dust that the cloud labels do not
        # count; its thicker parts overlap with the thinnest clouds, as in the real labels.
        veil = float(rng.uniform(0.08, 0.3)) * np.clip(1 + 0.5 * _fractal_noise(rng, octaves=(2, 4, 10)), 0.2, 2.0)
        reflectance = reflectance * (1 - veil) + _SPECTRA_ARRAY["cloud"] * 0.8 * veil
    return reflectance, present


def _add_clouds(rng: np.random.Generator, plan: _PatchPlan, land: np.ndarray) -> np.ndarray:
    """Composite shadows and thick or thin clouds over land reflectance."""
    noise = _fractal_noise(rng, octaves=(2, 4, 10, 30))
    if plan.thin_cloud:
        coverage, opacity, softness = rng.uniform(0.3, 1.0), rng.uniform(0.15, 0.45), 0.6
    else:
        coverage, opacity, softness = rng.uniform(0.05, 0.9), rng.uniform(0.8, 1.0), 0.2
    alpha = _soft_mask(noise, float(coverage), softness) * float(opacity)
    if plan.shadow:
        # Shadows fall a few hundred metres from their clouds; a fifth of the time the cloud itself is just
        # outside the patch and only its shadow is inside (the hardest cloud patches to see).
        dy, dx = (int(v) for v in rng.integers(8, 30, size=2) * rng.choice([-1, 1], size=2))
        shadow = np.roll(alpha / max(float(opacity), 1e-6), (dy, dx), axis=(0, 1))
        land = land * (1 - 0.65 * shadow)
        if rng.random() < 0.2:
            alpha = np.zeros_like(alpha)
    brightness = (1 + 0.08 * _fractal_noise(rng, octaves=(4, 12, 40))) * float(rng.uniform(0.85, 1.15))
    return land * (1 - alpha) + _SPECTRA_ARRAY["cloud"] * brightness * alpha


def _downsample(band: np.ndarray, size: int) -> np.ndarray:
    factor = band.shape[0] // size
    return band.reshape(size, factor, size, factor).mean(axis=(1, 3))


def _synthesize_bands(plan: _PatchPlan) -> tuple[dict[str, np.ndarray], list[str]]:
    """Band name → uint16 array at native size, and the land covers shown."""
    rng = np.random.default_rng(plan.seed)
    reflectance, covers = _land(rng, plan)
    if plan.cloud:
        reflectance = _add_clouds(rng, plan, reflectance)
    reflectance *= 1 + 0.02 * rng.standard_normal(reflectance.shape, dtype=np.float32)  # sensor noise
    bands = {}
    for i, band in enumerate(ben.BANDS):
        native = _downsample(reflectance[i], ben.BAND_SIZES[band])
        # 0 is nodata in BigEarthNet; real values stay well below saturation.
        bands[band] = np.clip(np.rint(native), 1, 20_000).astype(np.uint16)
    return bands, covers


# --- file formats -------------------------------------------------------------------------------------------------


def _utm(country: str) -> tuple[int, int]:
    return _COUNTRY_UTM[country]


def _projection_wkt(zone: int) -> str:
    return (
        f'PROJCS["WGS 84 / UTM zone {zone}N",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,'
        '298.257223563,AUTHORITY["EPSG","7030"]],AUTHORITY["EPSG","6326"]],PRIMEM["Greenwich",0,AUTHORITY["EPSG",'
        '"8901"]],UNIT["degree",0.0174532925199433,AUTHORITY["EPSG","9122"]],AXIS["Latitude",NORTH],AXIS['
        '"Longitude",EAST],AUTHORITY["EPSG","4326"]],PROJECTION["Transverse_Mercator"],PARAMETER['
        f'"latitude_of_origin",0],PARAMETER["central_meridian",{zone * 6 - 183}],PARAMETER["scale_factor",0.9996],'
        'PARAMETER["false_easting",500000],PARAMETER["false_northing",0],UNIT["metre",1,AUTHORITY["EPSG","9001"]],'
        f'AXIS["Easting",EAST],AXIS["Northing",NORTH],AUTHORITY["EPSG","326{zone:02d}"]]'
    )


def _upper_left(plan: _PatchPlan) -> tuple[int, int]:
    """Upper-left UTM corner from the column/row ids at the end of the patch name."""
    _, northing = _utm(plan.country)
    col, row = (int(v) for v in plan.patch_id.rsplit("_", 2)[1:])
    tile_x = 300_000 + 109_800 * (plan.seed % 4)
    return tile_x + 1200 * col, northing - 1200 * row


def _geotiff(array: np.ndarray, plan: _PatchPlan) -> bytes:
    """Uncompressed strip GeoTIFF with the tags GDAL writes for BigEarthNet bands."""
    zone, _ = _utm(plan.country)
    ulx, uly = _upper_left(plan)
    resolution = ben.PATCH_SIZE_M / array.shape[0]
    citation = f"WGS 84 / UTM zone {zone}N|WGS 84|"
    geokeys = (
        1,
        1,
        0,
        7,
        1024,
        0,
        1,
        1,
        1025,
        0,
        1,
        1,
        1026,
        34737,
        22,
        0,
        2049,
        34737,
        7,
        22,
        2054,
        0,
        1,
        9102,
        3072,
        0,
        1,
        32600 + zone,
        3076,
        0,
        1,
        9001,
    )
    buffer = io.BytesIO()
    tifffile.imwrite(
        buffer,
        array,
        photometric="minisblack",
        metadata=None,
        rowsperstrip=34 if array.shape[0] > 34 else array.shape[0],
        extratags=[
            (33550, "d", 3, (resolution, resolution, 0.0), False),
            (33922, "d", 6, (0.0, 0.0, 0.0, float(ulx), float(uly), 0.0), False),
            (34735, "H", len(geokeys), geokeys, False),
            (34737, "s", 0, citation, False),
        ],
    )
    return buffer.getvalue()


def _acquisition_date(patch_id: str) -> str:
    """'S2A_MSIL2A_20170613T101031_…' → '2017-06-13 10:10:31'.

    Names drop the hour's leading zero and some carry impossible seconds (T94161); the JSON date of such a real
    patch is still a valid time (S2B_MSIL2A_20180204T94161_57_38 says 09:41:56), so seconds past 59 are pulled back.
    """
    day, time = patch_id.split("_")[2].split("T")
    time = time.zfill(6)
    seconds = int(time[4:])
    if seconds > 59:
        seconds -= 5
    return f"{day[:4]}-{day[4:6]}-{day[6:]} {time[:2]}:{time[2:4]}:{seconds:02d}"


def _metadata(plan: _PatchPlan, labels: list[str]) -> dict:
    zone, _ = _utm(plan.country)
    ulx, uly = _upper_left(plan)
    mission, _, stamp = plan.patch_id.split("_")[:3]
    day, time = stamp.split("T")
    tile = (
        f"T{zone}{'UVWST'[plan.seed % 5]}{'ABCDEFGHJKLMNPQR'[plan.seed % 16]}{'ABCDEFGHJKLMNPQRSTUV'[plan.seed % 20]}"
    )
    return {
        "labels": labels,
        "coordinates": {"ulx": ulx, "uly": uly, "lrx": ulx + ben.PATCH_SIZE_M, "lry": uly - ben.PATCH_SIZE_M},
        "projection": _projection_wkt(zone),
        # The L1C product name keeps the patch name's time stamp as it is, as in the real metadata.
        "tile_source": f"{mission}_MSIL1C_{day}T{time}_N0206_R{plan.seed % 143:03d}_{tile}_{day}T{time.zfill(6)}.SAFE",
        "acquisition_date": _acquisition_date(plan.patch_id),
    }


def _labels(rng: np.random.Generator, covers: list[str]) -> list[str]:
    labels = []
    for cover in covers or ["grass"]:
        label = str(rng.choice(_COVER_LABELS[cover]))
        if label not in labels:
            labels.append(label)
    return sorted(labels, key=ben.LABEL_ORDER.index)


def _render_patch(plan: _PatchPlan) -> dict[str, bytes]:
    """Every file of one synthesized patch: relative file name → bytes."""
    bands, covers = _synthesize_bands(plan)
    rng = np.random.default_rng([plan.seed, 1])
    files = _band_files(plan, bands)
    metadata = _metadata(plan, _labels(rng, covers))
    files[ben.metadata_file(plan.patch_id)] = json.dumps(metadata).encode()
    if plan.pixels is not None:
        files = _shift_files(plan.patch_id, files, plan.pixels)
    return files


def _band_files(plan: _PatchPlan, bands: dict[str, np.ndarray]) -> dict[str, bytes]:
    """Every band of the patch as a GeoTIFF file: relative file name → bytes.

    Bands of one size share every tag, and tifffile writes the pixels last, so it writes one file per size and the
    others take that file's header with their own pixels: a third of the writes, byte for byte the same files (the
    reference digests in the tests). A writer that put the pixels elsewhere would simply write every band.
    """
    headers: dict[tuple[int, ...], bytes] = {}
    files = {}
    for band in ben.BANDS:
        array = bands[band]
        pixels = array.tobytes()
        if array.shape in headers:
            files[ben.band_file(plan.patch_id, band)] = headers[array.shape] + pixels
            continue
        data = _geotiff(array, plan)
        if data.endswith(pixels):
            headers[array.shape] = data[: len(data) - len(pixels)]
        files[ben.band_file(plan.patch_id, band)] = data
    return files


def _shift_files(patch_id: str, files: dict[str, bytes], shift: _PixelShift) -> dict[str, bytes]:
    """The patch's files with every band's pixel data drifted in place: tags and layout stay byte for byte."""
    files = dict(files)
    for band in ben.BANDS:
        name = ben.band_file(patch_id, band)
        if name in files:
            files[name] = _shift_tiff(files[name], band, shift)
    return files


def _shift_tiff(data: bytes, band: str, shift: _PixelShift) -> bytes:
    """Rewrite the strips of an uncompressed single-page TIFF (the BigEarthNet band format) with drifted pixels."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages[0]
        if page.compression != tifffile.COMPRESSION.NONE or page.dtype != np.uint16:
            raise ValueError(f"{band}: expected an uncompressed uint16 band, got {page.compression!r} {page.dtype}")
        array = page.asarray()
        strips = list(zip(page.dataoffsets, page.databytecounts, strict=True))
        order = tif.byteorder
    raw = shift.apply(band, array).astype(f"{order}u2").tobytes()
    out = bytearray(data)
    position = 0
    for offset, count in strips:
        out[offset : offset + count] = raw[position : position + count]
        position += count
    return bytes(out)


# --- faults -------------------------------------------------------------------------------------------------------


def _inject(fault: Fault, patch_id: str, files: dict[str, bytes], rng: np.random.Generator) -> dict[str, bytes]:
    """Return the files of one patch with `fault` applied."""
    files = dict(files)
    band = str(rng.choice(ben.BANDS))
    name = ben.band_file(patch_id, band)
    meta = ben.metadata_file(patch_id)
    size = ben.BAND_SIZES[band]
    plan_for_tags = _PatchPlan(patch_id, "Finland", "Summer", False, False, False, False, False, 0)
    match fault:
        case Fault.CORRUPT_BAND:
            files[name] = files[name][: len(files[name]) // 3]
        case Fault.MISSING_BAND:
            del files[name]
        case Fault.WRONG_SHAPE:
            name = ben.band_file(patch_id, "B04")
            files[name] = _geotiff(np.full((60, 60), 500, dtype=np.uint16), plan_for_tags)
        case Fault.MISSING_JSON:
            del files[meta]
        case Fault.MALFORMED_JSON:
            files[meta] = files[meta][: len(files[meta]) // 2]
        case Fault.UNKNOWN_LABEL:
            data = json.loads(files[meta])
            data["labels"] = [*data["labels"], "Broadleaved forrest"]
            files[meta] = json.dumps(data).encode()
        case Fault.ZERO_BAND:
            files[name] = _geotiff(np.zeros((size, size), dtype=np.uint16), plan_for_tags)
        case Fault.SATURATED_BAND:
            files[name] = _geotiff(np.full((size, size), 65535, dtype=np.uint16), plan_for_tags)
        case Fault.NODATA_BAND:
            array = tifffile.imread(io.BytesIO(files[name]))
            array[: int(size * 0.8)] = 0
            files[name] = _geotiff(array, plan_for_tags)
        case Fault.DUPLICATE_PATCH:
            raise AssertionError("duplicates are added as patches of their own, not applied in place")
    return files


def _duplicate(original: str, copy: str, files: dict[str, bytes]) -> dict[str, bytes]:
    """Files of `copy`: the original's band bytes under a new name, with its own metadata file."""
    renamed = {name.replace(original, copy, 1): data for name, data in files.items()}
    return renamed


def parse_faults(specs: list[str]) -> dict[Fault, int]:
    """['missing_band', 'corrupt_band=2'] → {Fault.MISSING_BAND: 1, Fault.CORRUPT_BAND: 2}."""
    faults: dict[Fault, int] = {}
    for spec in specs:
        kind, _, count = spec.partition("=")
        try:
            fault = Fault(kind)
        except ValueError:
            raise ConfigError(f"--fault {spec!r}: unknown fault; choose from {', '.join(Fault)}") from None
        if count and (not count.isdigit() or int(count) < 1):
            raise ConfigError(f"--fault {spec!r}: COUNT must be a positive integer")
        faults[fault] = faults.get(fault, 0) + int(count or 1)
    return faults


# --- planning and writing -----------------------------------------------------------------------------------------


def _selected(table: pd.DataFrame, shifts: dict[Shift, int | float | str]) -> np.ndarray | None:
    """Which names the selection shifts (season, region) allow, or None when neither is asked for."""
    if Shift.SEASON not in shifts and Shift.REGION not in shifts:
        return None
    keep = np.ones(len(table), dtype=bool)
    if Shift.SEASON in shifts:
        keep &= (table["season"] == shifts[Shift.SEASON]).to_numpy()
    if Shift.REGION in shifts:
        keep &= (table["country"] == shifts[Shift.REGION]).to_numpy()
    return keep


@functools.cache
def _name_pools() -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The name table in name order, and which names are in the cloud-and-shadow and seasonal-snow lists.

    Sorted once, so each plan's pools are masks of it (sorting 590,000 names took most of a small mirror's plan).
    """
    table = ben.name_table()
    table = table.iloc[np.argsort(table.index.to_numpy(), kind="stable")]
    is_cloud = table.index.isin(list(ben.cloud_and_shadow_patches()))
    is_snow = table.index.isin(list(ben.seasonal_snow_patches()))
    return table, is_cloud, is_snow


def _plan(params: MirrorParams, exclude: set[str]) -> list[_PatchPlan]:
    """Choose real names, cloud membership and what each synthesized patch shows; deterministic by seed.

    The selection shifts draw from a part of the official lists: season and region only names of that season or
    country (and the snow share follows that part's real snow share), cloud_fraction another share from the cloud
    list. Without them every draw is the reference archive's.
    """
    rng = np.random.default_rng([params.seed, 0])
    shifts = parse_shifts(params.shifts)
    table, is_cloud, is_snow = _name_pools()
    names = table.index.to_numpy()
    usable = ~table.index.isin(list(exclude))
    selected = _selected(table, shifts)
    snow_fraction = params.snow_fraction
    if selected is not None:
        usable &= selected
        # A winter archive holds three times the whole archive's share of snow, a summer one almost none: scale the
        # reference's snow share (chosen for difficulty, above the real 10.6%) by the selected part's real share.
        share = lambda rows: (is_snow & ~is_cloud & rows).sum() / max((~is_cloud & rows).sum(), 1)  # noqa: E731
        snow_fraction = min(1.0, params.snow_fraction * share(selected) / share(np.ones_like(selected)))

    n_cloud = round(float(shifts.get(Shift.CLOUD_FRACTION, params.cloud_fraction)) * params.patches)
    n_clear = params.patches - n_cloud
    n_snow = round(snow_fraction * n_clear)
    pools = {  # in name order, as the table is
        "cloud": names[is_cloud & usable],
        "snow": names[is_snow & ~is_cloud & usable],
        "clear": names[~is_snow & ~is_cloud & usable],
    }
    wanted = {"cloud": n_cloud, "snow": n_snow, "clear": n_clear - n_snow}
    for pool, n in wanted.items():
        if n > len(pools[pool]):
            within = f" of {', '.join(params.shifts)}" if shifts else ""
            raise ConfigError(
                f"mirror: {n} {pool} patches asked for, the official lists hold {len(pools[pool])}{within}"
            )
    chosen = {pool: rng.choice(pools[pool], size=n, replace=False) for pool, n in wanted.items()}

    plans = []
    seeds = rng.integers(0, 2**31, size=params.patches)
    for pool, ids in chosen.items():
        for patch_id in ids:
            i = len(plans)
            plans.append(
                _PatchPlan(
                    patch_id=str(patch_id),
                    country=str(table.at[patch_id, "country"]),
                    season=str(table.at[patch_id, "season"]),
                    cloud=pool == "cloud",
                    snow=pool == "snow",
                    bright_surface=pool == "clear" and rng.random() < params.bright_surface_fraction,
                    thin_cloud=pool == "cloud" and rng.random() < params.thin_cloud_fraction,
                    shadow=pool == "cloud" and rng.random() < params.shadow_fraction,
                    seed=int(seeds[i]),
                    haze=pool != "cloud" and rng.random() < params.haze_fraction,
                )
            )
    if params.shifts:
        plans = [replace(p, pixels=_PixelShift.of(shifts, params.seed, p.patch_id)) for p in plans]
    return sorted(plans, key=lambda p: p.patch_id)


def _real_in_selection(params: MirrorParams, real: dict[str, dict[str, bytes]]) -> dict[str, dict[str, bytes]]:
    """The real example patches a drifted archive keeps, with its pixel drift: a winter archive holds no summer
    patch and an offset reaches every band of every patch."""
    shifts = parse_shifts(params.shifts)
    if not shifts:
        return real
    ids = sorted(real)
    selected = _selected(ben.name_table().loc[ids], shifts)
    kept = {}
    for patch_id in ids if selected is None else [p for p, keep in zip(ids, selected, strict=True) if keep]:
        pixels = _PixelShift.of(shifts, params.seed, patch_id)
        kept[patch_id] = real[patch_id] if pixels is None else _shift_files(patch_id, real[patch_id], pixels)
    return kept


def _real_patches() -> dict[str, dict[str, bytes]]:
    """The real example patches, verbatim: patch_id → {file name → bytes}."""
    patches: dict[str, dict[str, bytes]] = {}
    with tarfile.open(ben.example_archive(), "r:bz2") as tar:
        for member in tar:
            if member.isfile():
                patch_id, name = Path(member.name).parts[-2:]
                patches.setdefault(patch_id, {})[name] = tar.extractfile(member).read()
    return patches


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes | None) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = _MEMBER_MTIME
    info.uname = info.gname = ""
    if data is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
    else:
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))


def _single_threaded_blas() -> None:
    # Patches are rendered one per process; BLAS threads on these tiny matrices only wait on each other, which
    # made rendering 5-10x slower on a busy 2-core machine.
    threadpool_limits(limits=1, user_api="blas")


def _rendered(plans: list[_PatchPlan], workers: int) -> Iterator[tuple[_PatchPlan, dict[str, bytes]]]:
    """Render patches in worker processes, yielded in plan order (the archive order must not depend on timing)."""
    if workers <= 1 or len(plans) < 50:
        with threadpool_limits(limits=1, user_api="blas"):
            for plan in plans:
                yield plan, _render_patch(plan)
        return
    with ProcessPoolExecutor(max_workers=workers, initializer=_single_threaded_blas) as pool:
        yield from zip(plans, pool.map(_render_patch, plans, chunksize=16), strict=True)


def build_mirror(
    *, out: Path, params: MirrorParams, faults: dict[Fault, int] | None = None, workers: int | None = None
) -> MirrorResult:
    """Write `out/<archive_name>`, its `.sha256` and its `.contents.json` (patches, cloud patches, faults).

    With `params.shifts` the archive holds drifted data (see Shift) and is named for its shifts.

    Raises:
        ConfigError: more patches or faults asked for than the official lists (or the part of them a shift selects)
            or the mirror can supply.
    """
    faults = faults or {}
    name = archive_name(params.patches, params.seed, faulty=bool(faults), shifts=params.shifts)
    archive = out / name
    checksum_file = out / f"{name}.sha256"
    contents_file = out / f"{name}.contents.json"
    recipe = _recipe(params, faults)
    previous = completed(contents_file, recipe, requires=(archive, checksum_file), at=("recipe",), what=str(archive))
    if previous is not None:
        recorded = checksum_file.read_text().split()[0]
        if file_digest(archive, "sha256") == recorded:
            return _result_from_disk(archive, recorded, previous)
        log.warning("%s does not match its checksum file %s: rebuilding", archive, checksum_file)

    log.info(
        "building %s: %d synthesized patches, seed %d, faults %s, shifts %s",
        archive,
        params.patches,
        params.seed,
        {str(k): v for k, v in faults.items()} or "none",
        ", ".join(params.shifts) or "none",
    )
    real = _real_patches() if params.include_real else {}
    plans = _plan(params, exclude=set(real))
    real = _real_in_selection(params, real)
    fault_rng = np.random.default_rng([params.seed, 2])
    n_faults = sum(faults.values())
    if n_faults > len(plans):
        raise ConfigError(f"mirror: {n_faults} faults asked for but only {len(plans)} synthesized patches")
    targets = iter(fault_rng.choice(len(plans), size=n_faults, replace=False))
    fault_of = {int(next(targets)): fault for fault, count in sorted(faults.items()) for _ in range(count)}
    # A duplicate needs a spare real name that no other patch uses (of the season or country a shift selects).
    table = ben.name_table()
    selected = _selected(table, parse_shifts(params.shifts))
    names = table.index if selected is None else table.index[selected]
    spare_pool = [n for n in names[:5000] if n not in {p.patch_id for p in plans} | set(real)]
    spare = iter(sorted(fault_rng.choice(spare_pool, size=faults.get(Fault.DUPLICATE_PATCH, 0), replace=False)))

    top = name.removesuffix(".tar.gz")
    injected: dict[str, str] = {}
    extra: dict[str, dict[str, bytes]] = {}
    cloud_list = ben.cloud_and_shadow_patches()
    with atomic_path(archive) as tmp, tmp.open("wb") as raw:
        with (
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=params.compresslevel) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            _tar_add(tar, top, None)
            for patch_id in sorted(real):
                _write_patch(tar, top, patch_id, real[patch_id])
            index = {plan.patch_id: i for i, plan in enumerate(plans)}
            progress = tqdm(total=len(plans), unit="patch", desc="mirror", disable=None)
            for plan, files in _rendered(plans, workers or min(2, os.cpu_count() or 1)):
                fault = fault_of.get(index[plan.patch_id])
                if fault is Fault.DUPLICATE_PATCH:
                    copy = str(next(spare))
                    extra[copy] = _duplicate(plan.patch_id, copy, files)
                    injected[copy] = f"{fault}:{plan.patch_id}"
                elif fault is not None:
                    files = _inject(fault, plan.patch_id, files, fault_rng)
                    injected[plan.patch_id] = str(fault)
                _write_patch(tar, top, plan.patch_id, files)
                progress.update()
            progress.close()
            for copy in sorted(extra):
                _write_patch(tar, top, copy, extra[copy])
        raw.flush()
        os.fsync(raw.fileno())
    digest = file_digest(archive, "sha256")
    with atomic_path(checksum_file) as tmp:
        tmp.write_text(f"{digest}  {name}\n")
    all_ids = sorted([*real, *(p.patch_id for p in plans), *extra])
    cloud_ids = tuple(p for p in all_ids if p in cloud_list)
    summary = {
        "patch_ids": all_ids,
        "cloud_patch_ids": list(cloud_ids),
        "faults": dict(sorted(injected.items())),
        "shifts": list(params.shifts),
        "recipe": recipe,
    }
    with atomic_path(contents_file) as tmp:
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
    log.info(
        "wrote %s (%d patches, %d cloud, %.1f MB)", archive, len(all_ids), len(cloud_ids), archive.stat().st_size / 1e6
    )
    return MirrorResult(
        archive, digest, tuple(all_ids), cloud_ids, summary["faults"], skipped=False, shifts=params.shifts
    )


def _write_patch(tar: tarfile.TarFile, top: str, patch_id: str, files: dict[str, bytes]) -> None:
    _tar_add(tar, f"{top}/{patch_id}", None)
    for file_name in sorted(files):
        _tar_add(tar, f"{top}/{patch_id}/{file_name}", files[file_name])


def _recipe(params: MirrorParams, faults: dict[Fault, int]) -> str:
    """What the archive's bytes depend on: the params, the faults and this module's rendering code."""
    record = {
        "params": params.model_dump(mode="json"),
        "faults": {str(k): v for k, v in sorted(faults.items())},
        "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _result_from_disk(archive: Path, digest: str, summary: dict) -> MirrorResult:
    return MirrorResult(
        archive,
        digest,
        tuple(summary.get("patch_ids", ())),
        tuple(summary.get("cloud_patch_ids", ())),
        summary.get("faults", {}),
        skipped=True,
        shifts=tuple(summary.get("shifts", ())),
    )


def main() -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the archive and its .sha256")
    p.add_argument("--patches", type=int, help="synthesized patches (default: params mirror.patches)")
    p.add_argument("--seed", type=int, help="random seed (default: params mirror.seed)")
    p.add_argument("--cloud-fraction", type=float, help="share of cloud patches (default: params)")
    p.add_argument("--no-real", action="store_true", help="leave out the 6 real example patches")
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND[=COUNT]",
        help=f"inject a fault into COUNT patches (repeatable); KIND is one of {', '.join(Fault)}",
    )
    p.add_argument(
        "--shift",
        action="append",
        default=[],
        metavar="KIND[=MAGNITUDE]",
        help="render drifted data (repeatable; replaces params mirror.shifts); KIND=default MAGNITUDE: "
        + ", ".join(f"{kind}={value}" for kind, value in SHIFT_DEFAULTS.items())
        + f" (gain on {' '.join(GAIN_BANDS)})",
    )
    p.add_argument("--workers", type=int, help="rendering processes (default: up to 2)")
    args = p.parse_args()
    cli.configure_logging(args.verbose)
    overrides = list(args.overrides)
    for key, value in (
        ("patches", args.patches),
        ("seed", args.seed),
        ("cloud_fraction", args.cloud_fraction),
    ):
        if value is not None:
            overrides.append(f"mirror.{key}={value}")
    if args.no_real:
        overrides.append("mirror.include_real=false")
    if args.shift:
        overrides.append(f"mirror.shifts={json.dumps(args.shift)}")  # a JSON list is a YAML list
    params = load_section("mirror", MirrorParams, args.params, overrides)
    result = build_mirror(out=args.out, params=params, faults=parse_faults(args.fault), workers=args.workers)
    print(result.archive)


if __name__ == "__main__":
    cli.run(main)
