"""The training input pipeline: tf.data over the tile step's memory-mapped shards, as the sample manifest lists them.

Pixels stay in the shards until a batch needs them: each batch gathers its rows from the memory maps in one call,
so a set far larger than memory trains the same way as the embedded default. The pipeline yields raw reflectance as
float32; normalisation lives inside the model (tasks.lib.model), so what is served is what was trained.

Augmentation (train split only) draws one of the 8 symmetries of the square per patch: an optional transpose followed
by optional vertical and horizontal flips covers every flip and every 90° rotation, uniformly. It runs inside the
batch's gather, as strided copies that convert to float32 on the way (one pass per group of patches sharing a
symmetry). The whole pipeline then costs about a sixth of the CPU time per patch it did with the augmentation as
TensorFlow selects over the batch, and on a 2-core machine that time is taken from the training step
(bench/train_input.py). Its randomness comes from `tf.data.Dataset.random`, re-drawn each epoch from the seed, so
runs with the same seed see the same batches in the same order.

Photometric augmentation (train split only, off by default) varies what real imagery varies in besides orientation,
the seed documents' scale, shift and noise: a gain per band, one brightness offset per patch and sensor noise per
pixel, applied to the float32 copy the symmetries made, from the same per-batch draw.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.lib.errors import InputError
from tasks.lib.tiles import MANIFEST_FILE as TILES_MANIFEST
from tasks.lib.tiles import PATCH_PX, PATCH_SHAPE, RGB_CHANNELS, PatchReader

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("patch_id", "label", "split", "shard", "offset")
_STATS_CHUNK = 512  # patches per step when computing channel statistics (bounded memory on any set size)
_PREFETCH_BATCHES = 2  # a batch is gathered in a few ms per core, a training step takes far longer


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


def open_tiles(tiles: Path) -> PatchReader:
    """The tile step's output as training reads it: R, G, B shards, gathered by manifest row (shard, offset).

    Raises:
        InputError: no tiles.json, or tiles of other channels.
    """
    manifest_path = tiles / TILES_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError as exc:
        raise InputError(f"{manifest_path}: not found (expected the tile step's output)") from exc
    if manifest.get("channels") != list(RGB_CHANNELS):
        raise InputError(
            f"{manifest_path}: the classifier takes R, G, B tiles ({', '.join(RGB_CHANNELS)}), these hold "
            f"{manifest.get('channels')}; tile with tile.bands=rgb"
        )
    return PatchReader(tiles)


def channel_moments(source: PatchReader, frame: pd.DataFrame) -> tuple[list[float], list[float]]:
    """Per-channel mean and variance of the patches in `frame` (the train split: never val or test)."""
    # Integer sums are exact at any set size and 7x cheaper than summing a float64 copy (a slow trainer's start).
    total = [0] * len(RGB_CHANNELS)
    squares = [0] * len(RGB_CHANNELS)
    for start in range(0, len(frame), _STATS_CHUNK):
        pixels = source.frame_patches(frame.iloc[start : start + _STATS_CHUNK]).reshape(-1, len(RGB_CHANNELS))
        total = [t + int(s) for t, s in zip(total, pixels.sum(axis=0, dtype=np.int64), strict=True)]
        chunk_squares = np.einsum("ij,ij->j", pixels, pixels, dtype=np.int64)  # < 2**55 per chunk of 16-bit DN
        squares = [t + int(s) for t, s in zip(squares, chunk_squares, strict=True)]
    count = len(frame) * PATCH_PX * PATCH_PX
    mean = [t / count for t in total]
    variance = [max(q / count - m * m, 1e-6) for q, m in zip(squares, mean, strict=True)]
    return mean, variance


@dataclass(frozen=True)
class Photometric:
    """Per-patch photometric jitter; zeros switch it off."""

    gain: float = 0.0  # each band multiplied by U(1 - gain, 1 + gain)
    offset: float = 0.0  # U(-offset, offset) DN added to every band alike
    noise: float = 0.0  # N(0, noise) DN added to every pixel

    @property
    def active(self) -> bool:
        return bool(self.gain or self.offset or self.noise)


@dataclass(frozen=True)
class PipelineSettings:
    batch_size: int
    shuffle: bool
    augment: bool
    seed: int
    shuffle_buffer: int = 4096
    photometric: Photometric = Photometric()


def dataset(source: PatchReader, frame: pd.DataFrame, settings: PipelineSettings) -> Any:
    """A tf.data.Dataset of (float32 patches (b, *PATCH_SHAPE), float32 labels (b,)) over `frame`'s rows."""
    import tensorflow as tf

    shards = frame["shard"].to_numpy(dtype=object)
    offsets = frame["offset"].to_numpy(dtype=np.int64)
    labels = frame["label"].to_numpy(dtype=np.float32)

    def gather(rows: np.ndarray, draw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        patches = source.gather(shards[rows], offsets[rows])
        if settings.augment:
            rng = np.random.default_rng(int(draw) % 2**64)
            augmented = random_symmetries(patches, rng)
            if settings.photometric.active:
                photometric_jitter(augmented, settings.photometric, rng)
            return augmented, labels[rows]
        return patches.astype(np.float32), labels[rows]

    def load(rows: Any, draw: Any) -> tuple[Any, Any]:
        images, batch_labels = tf.numpy_function(gather, [rows, draw], (tf.float32, tf.float32), stateful=False)
        images.set_shape([None, *PATCH_SHAPE])
        batch_labels.set_shape([None])
        return images, batch_labels

    rows = tf.data.Dataset.range(len(frame))
    if settings.shuffle:
        rows = rows.shuffle(min(settings.shuffle_buffer, len(frame)), seed=settings.seed, reshuffle_each_iteration=True)
    # One draw per batch seeds that batch's symmetries (unused without augmentation).
    draws = tf.data.Dataset.random(seed=settings.seed, rerandomize_each_iteration=True)
    batches = tf.data.Dataset.zip(rows.batch(settings.batch_size), draws)
    batches = batches.map(load, num_parallel_calls=tf.data.AUTOTUNE).prefetch(_PREFETCH_BATCHES)
    # tf.data's autotuning thread wakes at doubling intervals (10 ms, 20 ms, ... 5.12 s, 10.24 s, ...), and freeing
    # an iterator waits for its next wake-up: model.fit frees one per epoch, so every epoch ran on to the next
    # wake-up, idle (up to 7 s per epoch of the demo's set here). Without it, AUTOTUNE parallelism is one call per
    # core, which the gather, a few milliseconds of numpy per batch, never needs more of.
    options = tf.data.Options()
    options.autotune.enabled = False
    return batches.with_options(options)


def random_symmetries(patches: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each patch of (n, h, w, c) under a symmetry of the square drawn uniformly for it, as float32.

    Patches that drew the same symmetry are copied together through one strided view of them.
    """
    out = np.empty(patches.shape, dtype=np.float32)
    drawn = rng.integers(0, 8, size=len(patches))
    for symmetry in np.unique(drawn):
        rows = np.flatnonzero(drawn == symmetry)
        view = patches[rows]
        if symmetry & 4:
            view = view.transpose(0, 2, 1, 3)
        if symmetry & 2:
            view = view[:, ::-1]
        if symmetry & 1:
            view = view[:, :, ::-1]
        out[rows] = view
    return out


def photometric_jitter(patches: np.ndarray, jitter: Photometric, rng: np.random.Generator) -> np.ndarray:
    """`patches` (n, h, w, c) float32, jittered in place as `jitter` says and kept non-negative (reflectance)."""
    count, channels = len(patches), patches.shape[-1]
    if jitter.gain:
        patches *= rng.uniform(1 - jitter.gain, 1 + jitter.gain, size=(count, 1, 1, channels)).astype(np.float32)
    if jitter.offset:
        patches += rng.uniform(-jitter.offset, jitter.offset, size=(count, 1, 1, 1)).astype(np.float32)
    if jitter.noise:
        patches += np.float32(jitter.noise) * rng.standard_normal(patches.shape, dtype=np.float32)
    np.maximum(patches, 0, out=patches)
    return patches
