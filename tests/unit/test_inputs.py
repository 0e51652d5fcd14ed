"""The training input pipeline: augmentation (flips and 90° rotations, uniform, seeded; photometric jitter) and the
normalisation moments."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tasks.lib import inputs
from tasks.lib.inputs import Photometric, photometric_jitter, random_symmetries
from tasks.lib.tiles import PatchReader


def _symmetries_of(patch: np.ndarray) -> list[np.ndarray]:
    rotations = [np.rot90(patch, k, axes=(0, 1)) for k in range(4)]
    return rotations + [r[:, ::-1] for r in rotations]


def test_every_output_is_a_flip_or_rotation_of_its_input_and_all_8_occur():
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 10_000, size=(64, 6, 6, 3), dtype=np.uint16)  # asymmetric: the 8 images differ
    out = random_symmetries(patches, np.random.default_rng(1))
    assert out.dtype == np.float32 and out.shape == patches.shape
    seen = set()
    for before, after in zip(patches, out, strict=True):
        matches = [i for i, candidate in enumerate(_symmetries_of(before)) if np.array_equal(candidate, after)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == set(range(8))


def test_the_same_seed_gives_the_same_augmentation_and_another_seed_does_not():
    patches = np.random.default_rng(0).integers(0, 10_000, size=(32, 6, 6, 3), dtype=np.uint16)
    first = random_symmetries(patches, np.random.default_rng(5))
    assert np.array_equal(first, random_symmetries(patches, np.random.default_rng(5)))
    assert not np.array_equal(first, random_symmetries(patches, np.random.default_rng(6)))


def test_symmetries_are_drawn_uniformly():
    patches = np.arange(4, dtype=np.uint16).reshape(1, 2, 2, 1).repeat(8000, axis=0)
    out = random_symmetries(patches, np.random.default_rng(3))
    counts = np.unique(out.reshape(len(out), -1), axis=0, return_counts=True)[1]
    assert len(counts) == 8
    chi2 = ((counts - 1000) ** 2 / 1000).sum()
    assert chi2 < 24.3  # 7 degrees of freedom, p = 0.001


def _bright_patches(count: int = 200) -> np.ndarray:
    return np.random.default_rng(0).uniform(1000, 3000, size=(count, 8, 8, 3)).astype(np.float32)


def test_the_gain_scales_each_band_of_a_patch_by_one_factor_within_its_range():
    patches = _bright_patches()
    out = photometric_jitter(patches.copy(), Photometric(gain=0.1), np.random.default_rng(1))
    ratio = out / patches
    per_band = ratio[:, :1, :1, :]
    np.testing.assert_allclose(ratio, np.broadcast_to(per_band, ratio.shape), rtol=1e-6)  # one factor per band
    assert per_band.min() >= 0.9 and per_band.max() <= 1.1 and per_band.std() > 0.04  # spread over the range
    assert (np.abs(per_band[:, 0, 0, 0] - per_band[:, 0, 0, 1]) > 1e-3).mean() > 0.9  # bands drawn apart


def test_the_offset_shifts_every_band_of_a_patch_alike_and_noise_is_per_pixel():
    patches = _bright_patches()
    shifted = photometric_jitter(patches.copy(), Photometric(offset=200), np.random.default_rng(1)) - patches
    np.testing.assert_allclose(shifted, np.broadcast_to(shifted[:, :1, :1, :1], shifted.shape), atol=1e-3)
    assert np.abs(shifted).max() <= 200 and shifted[:, 0, 0, 0].std() > 80
    noise = photometric_jitter(patches.copy(), Photometric(noise=20), np.random.default_rng(1)) - patches
    assert abs(noise.mean()) < 1 and 19 < noise.std() < 21


def test_jitter_keeps_reflectance_non_negative_and_zero_jitter_is_off():
    dark = np.zeros((16, 4, 4, 3), dtype=np.float32)
    out = photometric_jitter(dark.copy(), Photometric(offset=500, noise=100), np.random.default_rng(2))
    assert out.min() == 0 and out.max() > 0
    assert not Photometric().active
    patches = _bright_patches(4)
    assert np.array_equal(photometric_jitter(patches.copy(), Photometric(), np.random.default_rng(3)), patches)


def test_channel_moments_are_the_train_frames_mean_and_variance_across_shards_and_chunks(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    shards = {name: rng.integers(0, 2**16, size=(3, 120, 120, 3), dtype=np.uint16) for name in ("a.npy", "b.npy")}
    shards["b.npy"][..., 2] = 65_535  # the largest DN: squares sums in float32 or 32-bit ints would lose it
    for name, array in shards.items():
        np.save(tmp_path / name, array)
    frame = pd.DataFrame({"shard": ["a.npy", "b.npy", "a.npy", "b.npy", "b.npy"], "offset": [0, 2, 2, 0, 1]})
    monkeypatch.setattr(inputs, "_STATS_CHUNK", 2)  # three chunks, one of them short
    mean, variance = inputs.channel_moments(PatchReader(tmp_path), frame)
    pixels = np.stack([shards[s][o] for s, o in zip(frame["shard"], frame["offset"], strict=True)]).astype(np.float64)
    np.testing.assert_allclose(mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(variance, pixels.var(axis=(0, 1, 2)), rtol=1e-9)
