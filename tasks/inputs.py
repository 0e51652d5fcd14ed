"""The training input pipeline: tf.data over the tile step's memory-mapped shards, as the sample manifest lists them.

Pixels stay in the shards until a batch needs them: each batch gathers its rows from the memory maps in one call,
so a set far larger than memory trains the same way as the embedded default. The pipeline yields raw reflectance as
float32; normalisation lives inside the model (tasks.model), so what is served is what was trained.

Augmentation (train split only) draws one of the 8 symmetries of the square per patch: an optional transpose followed
by optional vertical and horizontal flips covers every flip and every 90° rotation, uniformly, in three vectorised
selects per batch. Its randomness comes from `tf.data.Dataset.random`, re-drawn each epoch from the seed, so runs
with the same seed see the same batches in the same order.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.errors import CloudscreenError
from tasks.tile import MANIFEST_FILE as TILES_MANIFEST
from tasks.tile import PATCH_PX

log = logging.getLogger(__name__)

RGB_CHANNELS = ["B04", "B03", "B02"]
PATCH_SHAPE = (PATCH_PX, PATCH_PX, len(RGB_CHANNELS))
MANIFEST_COLUMNS = ("patch_id", "label", "split", "shard", "offset")
_STATS_CHUNK = 512  # patches per step when computing channel statistics (bounded memory on any set size)


class InputError(CloudscreenError):
    """A manifest or the tiles it points at cannot feed training."""


def read_manifest(path: Path) -> pd.DataFrame:
    """Read a sample manifest and check it has what training needs.

    Raises:
        InputError: the file is missing or unreadable, a column is missing, labels are not 0/1.
    """
    try:
        frame = pd.read_parquet(path)
    except FileNotFoundError as exc:
        raise InputError(f"{path}: manifest not found (expected tasks.sample's manifest.parquet)") from exc
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise InputError(f"{path}: not a readable parquet manifest: {exc}") from exc
    missing = [c for c in MANIFEST_COLUMNS if c not in frame]
    if missing:
        raise InputError(f"{path}: manifest lacks column(s) {', '.join(missing)}")
    bad = ~frame["label"].isin([0, 1])
    if bad.any():
        raise InputError(
            f"{path}: label must be 0 or 1; {int(bad.sum())} rows are not (e.g. {frame.loc[bad].iloc[0].to_dict()})"
        )
    return frame


class PatchSource:
    """Memory-mapped shards of one tiles directory, gathered by manifest row (shard, offset)."""

    def __init__(self, tiles: Path) -> None:
        manifest_path = tiles / TILES_MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError as exc:
            raise InputError(f"{manifest_path}: not found (expected the tile step's output)") from exc
        if manifest.get("channels") != RGB_CHANNELS:
            raise InputError(
                f"{manifest_path}: the classifier takes R, G, B tiles ({', '.join(RGB_CHANNELS)}), these hold "
                f"{manifest.get('channels')}; tile with tile.bands=rgb"
            )
        self.tiles = tiles
        self._shards: dict[str, np.ndarray] = {}

    def _shard(self, name: str) -> np.ndarray:
        if name not in self._shards:
            path = self.tiles / name
            try:
                self._shards[name] = np.load(path, mmap_mode="r")
            except FileNotFoundError as exc:
                raise InputError(f"{path}: shard named by the manifest does not exist") from exc
        return self._shards[name]

    def gather(self, shards: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Patches (n, 120, 120, 3) uint16 for rows given as shard names and offsets, in the order given."""
        out = np.empty((len(offsets), PATCH_PX, PATCH_PX, len(RGB_CHANNELS)), dtype=np.uint16)
        for name in np.unique(shards):
            rows = np.flatnonzero(shards == name)
            shard = self._shard(str(name))
            wanted = offsets[rows]
            if wanted.max(initial=-1) >= len(shard):
                raise InputError(f"{self.tiles / str(name)}: offset {wanted.max()} beyond its {len(shard)} patches")
            out[rows] = shard[wanted]
        return out

    def frame_patches(self, frame: pd.DataFrame) -> np.ndarray:
        return self.gather(frame["shard"].to_numpy(dtype=object), frame["offset"].to_numpy(dtype=np.int64))


def channel_moments(source: PatchSource, frame: pd.DataFrame) -> tuple[list[float], list[float]]:
    """Per-channel mean and variance of the patches in `frame` (the train split: never val or test)."""
    total = np.zeros(len(RGB_CHANNELS))
    squares = np.zeros(len(RGB_CHANNELS))
    for start in range(0, len(frame), _STATS_CHUNK):
        pixels = source.frame_patches(frame.iloc[start : start + _STATS_CHUNK]).astype(np.float64)
        total += pixels.sum(axis=(0, 1, 2))
        squares += np.square(pixels).sum(axis=(0, 1, 2))
    count = len(frame) * PATCH_PX * PATCH_PX
    mean = total / count
    variance = np.maximum(squares / count - np.square(mean), 1e-6)
    return mean.tolist(), variance.tolist()


@dataclass(frozen=True)
class PipelineSettings:
    batch_size: int
    shuffle: bool
    augment: bool
    seed: int
    shuffle_buffer: int = 4096


def dataset(source: PatchSource, frame: pd.DataFrame, settings: PipelineSettings) -> Any:
    """A tf.data.Dataset of (float32 patches (b, 120, 120, 3), float32 labels (b,)) over `frame`'s rows."""
    import tensorflow as tf

    shards = frame["shard"].to_numpy(dtype=object)
    offsets = frame["offset"].to_numpy(dtype=np.int64)
    labels = frame["label"].to_numpy(dtype=np.float32)

    def gather(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return source.gather(shards[rows], offsets[rows]).astype(np.float32), labels[rows]

    def load(rows: Any) -> tuple[Any, Any]:
        images, batch_labels = tf.numpy_function(gather, [rows], (tf.float32, tf.float32), stateful=False)
        images.set_shape([None, PATCH_PX, PATCH_PX, len(RGB_CHANNELS)])
        batch_labels.set_shape([None])
        return images, batch_labels

    rows = tf.data.Dataset.range(len(frame))
    if settings.shuffle:
        rows = rows.shuffle(min(settings.shuffle_buffer, len(frame)), seed=settings.seed, reshuffle_each_iteration=True)
    batches = rows.batch(settings.batch_size).map(load, num_parallel_calls=tf.data.AUTOTUNE)
    if settings.augment:
        draws = tf.data.Dataset.random(seed=settings.seed, rerandomize_each_iteration=True)
        batches = tf.data.Dataset.zip(batches, draws).map(_symmetries, num_parallel_calls=tf.data.AUTOTUNE)
    return batches.prefetch(tf.data.AUTOTUNE)


def _symmetries(batch: tuple[Any, Any], draw: Any) -> tuple[Any, Any]:
    """Apply a uniformly drawn symmetry of the square to each patch of the batch."""
    import tensorflow as tf

    images, labels = batch
    n = tf.shape(images)[0]
    seed = tf.stack([draw, tf.constant(0, tf.int64)])
    bits = tf.random.stateless_uniform([n, 3], seed=seed, maxval=2, dtype=tf.int32) > 0

    def where(flag: Any, changed: Any, unchanged: Any) -> Any:
        return tf.where(flag[:, None, None, None], changed, unchanged)

    images = where(bits[:, 0], tf.transpose(images, [0, 2, 1, 3]), images)
    images = where(bits[:, 1], tf.reverse(images, axis=[1]), images)
    images = where(bits[:, 2], tf.reverse(images, axis=[2]), images)
    return images, labels
