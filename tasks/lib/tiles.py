"""The tile step's output format, defined once: what tasks.tile writes and what every reader of it relies on.

A tiles directory holds:
- `tiles.json` (MANIFEST_FILE): channel order, dtype, shape per patch, counts, shard list, skipped patches, params;
- `metadata.parquet` (METADATA_FILE): one row per patch (labels, cloud, snow, season, country, date, coordinates);
- `index.parquet` (INDEX_FILE): patch_id → (shard, offset), the shard as a path relative to the directory;
- `stats.json` (STATS_FILE): per-band count, mean, std, min and max over all patches and per class (CLASSES);
- `shards/shard-NNNNN.npy` (SHARD_DIR, `shard_name`): each a .npy array of shape (n, PATCH_PX, PATCH_PX, C) and
  dtype DTYPE, memory-mappable; the patch at `offset` is row `offset`.

Channels (CHANNELS): `rgb` is R, G, B = B04, B03, B02, the classifier's input (RGB_CHANNELS, PATCH_SHAPE); `all` is
the 12 bands in BigEarthNet's official order, the 20 m and 60 m bands repeated up to PATCH_PX (nearest neighbour).

Light to import (numpy, pandas and the BigEarthNet constants): tasks.lib.serving, loaded wherever a model is
served, takes the patch shape from here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.lib import bigearthnet as ben
from tasks.lib.errors import InputError

MANIFEST_FILE = "tiles.json"
METADATA_FILE = "metadata.parquet"
INDEX_FILE = "index.parquet"
STATS_FILE = "stats.json"
SHARD_DIR = "shards"

DTYPE = "uint16"  # raw Sentinel-2 L2A reflectance, as the band files hold it
PATCH_PX: int = max(ben.BAND_SIZES.values())  # the 10 m bands' side: every band is brought to it
CHANNELS: dict[str, tuple[str, ...]] = {"rgb": ben.RGB_BANDS, "all": ben.BANDS}
RGB_CHANNELS: tuple[str, ...] = CHANNELS["rgb"]
PATCH_SHAPE: tuple[int, int, int] = (PATCH_PX, PATCH_PX, len(RGB_CHANNELS))  # one patch as the classifier takes it
CLASSES = {"cloud": True, "no_cloud": False}  # stats.json's classes → membership of the official cloud list


def shard_name(number: int) -> str:
    """The path of shard `number` relative to the tiles directory, as index.parquet and tiles.json name it."""
    return f"{SHARD_DIR}/shard-{number:05d}.npy"


def patch_bytes(channels: int) -> int:
    """The size of one patch of `channels` channels in a shard."""
    return PATCH_PX * PATCH_PX * channels * np.dtype(DTYPE).itemsize


def create_shard(path: Path | str, patches: int, channels: int) -> np.memmap:
    """A new shard file for `patches` patches of `channels` channels, memory-mapped for writing."""
    return np.lib.format.open_memmap(path, mode="w+", dtype=DTYPE, shape=(patches, PATCH_PX, PATCH_PX, channels))


def channels(root: Path) -> list[str]:
    """The bands the shards of `root` hold, in their order (tiles.json's `channels`).

    Raises:
        InputError: tiles.json is missing or names no channels.
    """
    try:
        return list(json.loads((root / MANIFEST_FILE).read_text())["channels"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{root / MANIFEST_FILE}: unreadable tiles manifest ({exc})") from exc


class PatchReader:
    """Patches of one tiles directory, gathered from its memory-mapped shards (each opened once, on first use)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._shards: dict[str, np.ndarray] = {}
        self._index: pd.DataFrame | None = None

    def _shard(self, name: str) -> np.ndarray:
        if name not in self._shards:
            path = self.root / name
            try:
                self._shards[name] = np.load(path, mmap_mode="r")
            except FileNotFoundError as exc:
                raise InputError(f"{path}: shard named by the manifest does not exist") from exc
        return self._shards[name]

    def gather(self, shards: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Patches (n, PATCH_PX, PATCH_PX, C) for rows given as shard names and offsets, in the order given; with no
        rows, (0, *PATCH_SHAPE).

        Raises:
            InputError: a shard does not exist or holds fewer patches than an offset asks for.
        """
        opened = {str(name): self._shard(str(name)) for name in np.unique(shards)}
        shape = next(iter(opened.values())).shape[1:] if opened else PATCH_SHAPE
        out = np.empty((len(offsets), *shape), dtype=DTYPE)
        for name, shard in opened.items():
            rows = np.flatnonzero(shards == name)
            wanted = offsets[rows]
            if wanted.max(initial=-1) >= len(shard):
                raise InputError(f"{self.root / name}: offset {wanted.max()} beyond its {len(shard)} patches")
            out[rows] = shard[wanted]
        return out

    def frame_patches(self, frame: pd.DataFrame) -> np.ndarray:
        """The patches of a table's rows by its `shard` and `offset` columns (index.parquet's, a sample manifest's)."""
        return self.gather(frame["shard"].to_numpy(dtype=object), frame["offset"].to_numpy(dtype=np.int64))

    def read(self, patch_ids: Sequence[str]) -> np.ndarray:
        """The patches named `patch_ids`, in that order, located through index.parquet (read once).

        Raises:
            KeyError: a patch is not in the index.
        """
        if self._index is None:
            self._index = pd.read_parquet(self.root / INDEX_FILE).set_index("patch_id")
        return self.frame_patches(self._index.loc[list(patch_ids)])


def load_patches(root: Path, patch_ids: Sequence[str]) -> np.ndarray:
    """The patches named `patch_ids` of the tiles directory `root`, in that order (n, PATCH_PX, PATCH_PX, C)."""
    return PatchReader(root).read(patch_ids)
