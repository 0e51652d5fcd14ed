"""Behavioural checks of the classifier, run before any long training (Made-With-ML's model tests): an untrained
network prefers neither class, the network can overfit a handful of patches, and a model trained with the project's
augmentation scores a patch alike under each of the 8 symmetries it was trained with.

Patches come from the tiny tiled mirror of tests/conftest.py's `training_data`; normalisation is its train split's
per-channel moments, as tasks.train computes them. The seed, optimizer and learning rate are params.yaml's `train`
section's unless a test says why not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from tasks.lib.config import load_section
from tasks.lib.inputs import random_symmetries
from tasks.lib.model import ModelParams, build_model, compile_for_training
from tasks.lib.tiles import load_patches
from tasks.train import TrainParams

pytestmark = pytest.mark.slow  # the session's tiled mirror takes tens of seconds to build; each test a few seconds

LN2 = math.log(2)  # binary cross-entropy of a score of 0.5, whatever the label
# A network small enough to train 50 steps in a few seconds on 2 cores (tests/model/test_train.py's): one 4-filter
# 3x3 convolution, a 4x4 max-pool, Flatten and an 8-unit Dense, as the default CNN has them.
TINY = ["model.conv_layers=[{filters: 4, kernel: 3, pool: 4}]", "model.dense_units=8"]


@dataclass(frozen=True)
class Split:
    patches: np.ndarray  # raw uint16 reflectance (n, 120, 120, 3), as the model is served
    labels: np.ndarray  # float32 0/1 (1: cloud)

    def balanced(self, per_class: int) -> Split:
        """The first `per_class` cloud patches and as many no_cloud patches."""
        rows = np.concatenate([np.flatnonzero(self.labels == label)[:per_class] for label in (1, 0)])
        return Split(self.patches[rows], self.labels[rows])


@dataclass(frozen=True)
class Patches:
    train: Split
    held_out: Split  # the val and test splits: never trained on here
    mean: list[float]
    variance: list[float]


@pytest.fixture(scope="module")
def patches(training_data) -> Patches:
    manifest = pd.read_parquet(training_data.manifest())
    train_rows = manifest["split"] == "train"

    def split(frame: pd.DataFrame) -> Split:
        pixels = load_patches(training_data.tiles, frame["patch_id"].tolist())
        return Split(pixels, frame["label"].to_numpy(dtype=np.float32))

    train = split(manifest[train_rows])
    # The train split's per-channel moments, as tasks.lib.inputs.channel_moments gives them to tasks.train.
    pixels = train.patches.reshape(-1, train.patches.shape[-1]).astype(np.float64)
    return Patches(train, split(manifest[~train_rows]), pixels.mean(axis=0).tolist(), pixels.var(axis=0).tolist())


def _scores(model, patches: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict_on_batch(patches.astype(np.float32))).reshape(-1)


def _symmetries(patches: np.ndarray) -> list[np.ndarray]:
    """The 8 symmetries of the square (4 rotations, each also mirrored) of patches (n, h, w, c), identity first."""
    rotations = [np.rot90(patches, k, axes=(1, 2)) for k in range(4)]
    return rotations + [r[:, :, ::-1] for r in rotations]


@pytest.mark.xfail(
    strict=True,
    reason="measured: the default CNN starts at BCE 0.70-1.53 and mean score 0.09-0.91 over seeds 7-16; the `cloud` "
    "head (glorot_uniform) sums 64 non-negative ReLU features that inference-mode BatchNorm leaves uncentred at init",
)
def test_an_untrained_model_prefers_neither_class(patches):
    """The network tasks.train starts from (params.yaml's `model` section, seeded as `train.seed` seeds it, and the
    two seeds after it) scores a balanced batch at about 0.5: loss about ln 2, no preferred class, no saturated
    score. A model that starts confidently one-sided spends its first epochs undoing its initialisation.

    Tolerances, from BCE ≈ ln 2 + E[z²]/8 for logits z near 0 on a balanced batch (the linear term cancels):
    loss within 0.1 of ln 2 allows an RMS logit of about 0.9; a mean score within 0.1 of 0.5 allows a logit shared
    by every patch of about 0.4; no score beyond 0.05 or 0.95 (|z| > 2.9, over three times that RMS).
    """
    import keras

    train = load_section("train", TrainParams)
    batch = patches.train.balanced(16)
    for seed in (train.seed, train.seed + 1, train.seed + 2):
        keras.utils.set_random_seed(seed)
        model = build_model(load_section("model", ModelParams), patches.mean, patches.variance)
        scores = _scores(model, batch.patches)
        loss = float(keras.losses.binary_crossentropy(batch.labels, scores))
        assert abs(loss - LN2) < 0.1, f"seed {seed}: initial loss {loss:.3f}, ln 2 = {LN2:.3f}"
        assert abs(scores.mean() - 0.5) < 0.1, f"seed {seed}: mean initial score {scores.mean():.3f}"
        assert ((scores > 0.05) & (scores < 0.95)).all(), f"seed {seed}: saturated initial scores {scores.round(3)}"


def test_the_network_overfits_a_handful_of_patches(patches):
    """params.yaml's network and optimizer fit 8 patches (4 cloud, 4 no_cloud) within 40 full-batch steps: the model
    as served (inference mode) then classifies all 8 correctly at a loss below ln 2 / 5. A network that cannot
    memorise 8 patches has a broken gradient path (a saturated output, a frozen layer, labels that never reach the
    loss), whatever its data.

    Inference mode, not the training-mode metrics: BatchNorm then normalises with the 8 patches' own statistics, and
    those metrics read accuracy 1.0 (loss 0.04) after 2 steps while the served model still scored 4 of 8 right.
    Measured (seeds 7 and 0): all 8 right at a loss below ln 2 / 5 after 10-15 steps, 0.002 after 40.
    """
    import keras

    train = load_section("train", TrainParams)
    few = patches.train.balanced(4)
    keras.utils.set_random_seed(train.seed)
    model = build_model(load_section("model", ModelParams), patches.mean, patches.variance)
    compile_for_training(model, train.optimizer, train.learning_rate)
    history = []
    for _ in range(40):
        model.train_on_batch(few.patches.astype(np.float32), few.labels)
        scores = _scores(model, few.patches)
        loss = float(keras.losses.binary_crossentropy(few.labels, scores))
        accuracy = float(((scores > 0.5) == few.labels).mean())
        history.append((round(loss, 3), accuracy))
        if accuracy == 1.0 and loss < LN2 / 5:
            break
    assert accuracy == 1.0 and loss < LN2 / 5, f"(loss, accuracy) after each step: {history}"


def test_a_model_trained_with_the_augmentation_scores_every_symmetry_alike(patches):
    """A tiny network trained with the project's augmentation (tasks.lib.inputs.random_symmetries: one of the 8 flips
    and rotations per patch) scores each held-out patch nearly alike under all 8.

    The invariance is learned, not built in: the CNN's Flatten → Dense weighs each position on its own, and its
    unpadded convolution and pooling drop the last rows and columns, so a flipped patch meets other weights. Only
    approximate invariance can be asked for, and it does not tell flips-only training from the full group (measured:
    both the same). Measured, 10 epochs of the 76 train patches, held-out val and test (20 patches), train seeds 7, 8,
    9: max |score(symmetry(x)) - score(x)| 0.31, 0.30, 0.24, mean 0.038, 0.034, 0.032, held-out score std 0.17, 0.28,
    0.12; trained alike without augmentation: max 0.67, 0.58, 0.46, mean 0.085, 0.097, 0.101. Hence max 0.45 and
    mean 0.06. A constant model is trivially invariant, so the scores must also vary between patches (std at least 0.05)
    and at least 3 times as much as under symmetries: a saturated model fails that.
    """
    import keras

    train = load_section("train", TrainParams)
    keras.utils.set_random_seed(train.seed)
    model = build_model(load_section("model", ModelParams, overrides=TINY), patches.mean, patches.variance)
    # Ten times train.learning_rate, so that 50 steps (10 epochs) train it this far: held-out AUC 0.80 at seed 7.
    compile_for_training(model, train.optimizer, 10 * train.learning_rate)
    rng = np.random.default_rng(train.seed)
    x, y = patches.train.patches, patches.train.labels
    for _epoch in range(10):
        order = rng.permutation(len(x))
        for start in range(0, len(order), 16):
            rows = order[start : start + 16]
            model.train_on_batch(random_symmetries(x[rows], rng), y[rows])

    held_out = patches.held_out.patches
    scores = _scores(model, np.concatenate(_symmetries(held_out))).reshape(8, len(held_out))
    deviation = np.abs(scores - scores[0])
    assert deviation.max() <= 0.45, f"max deviation {deviation.max():.3f} per symmetry {deviation.max(axis=1).round(3)}"
    assert deviation.mean() <= 0.06, f"mean deviation {deviation.mean():.3f}"
    spread = scores[0].std()
    assert spread >= max(0.05, 3 * deviation.mean()), (
        f"held-out scores vary by {spread:.3f} between patches, {deviation.mean():.3f} under symmetries"
    )
