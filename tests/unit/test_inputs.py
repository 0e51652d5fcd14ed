"""The training input pipeline's augmentation: flips and 90° rotations only, uniform, seeded."""

from __future__ import annotations

import numpy as np

from tasks.lib.inputs import random_symmetries


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
