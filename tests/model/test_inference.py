"""The compiled inference path (tasks.lib.inference) scores as the Keras network does, to 1e-4, on the real example
patches bigearthnet-common ships and on mirror patches (tests/conftest.py's `small_mirror_root`), for no patch, one,
a partial batch and more than one batch; and tasks.lib.scoring.load_scorer uses it for a logged Keras classifier.

The network is params.yaml's default CNN (what is served), untrained from a fixed seed, normalising by BigEarthNet's
published R, G, B statistics; its scores on these patches are spread out, not saturated at 0 or 1 (checked).
"""

from __future__ import annotations

import io
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest

from tasks.lib import bigearthnet as ben
from tasks.lib.bands import BandReader
from tasks.lib.config import load_section
from tasks.lib.errors import DeviceUnavailableError
from tasks.lib.inference import TOLERANCE, compile_scorer, xla_scorer
from tasks.lib.model import ModelParams, build_model
from tasks.lib.tiles import DTYPE, PATCH_SHAPE, RGB_CHANNELS

pytestmark = pytest.mark.slow  # the conversions take a few seconds each; the session's mirror tens of seconds

BATCH = 4  # small, so that 1, 3 and 9 patches are one partial, one partial and more than two batches
NAME = "cloudscreen-inference-test"


def _rgb(bands: dict[str, np.ndarray]) -> np.ndarray:
    return np.stack([bands[band] for band in RGB_CHANNELS], axis=-1).astype(DTYPE)


@pytest.fixture(scope="module")
def real() -> np.ndarray:
    """The 6 real example patches' R, G, B, read from the archive bigearthnet-common ships."""
    import tifffile

    bands: dict[str, dict[str, np.ndarray]] = {}
    with tarfile.open(ben.example_archive(), "r:bz2") as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".tif"):
                continue
            patch_id, name = Path(member.name).parts[-2:]
            band = name.removeprefix(f"{patch_id}_").removesuffix(".tif")
            if band in RGB_CHANNELS:
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                bands.setdefault(patch_id, {})[band] = tifffile.imread(io.BytesIO(data))
    assert len(bands) == 6
    return np.stack([_rgb(bands[patch_id]) for patch_id in sorted(bands)])


@pytest.fixture(scope="module")
def mirror(small_mirror_root) -> np.ndarray:
    """The first 12 synthetic patches of the session's small mirror (the 6 real ones left out), as tiles hold them."""
    with tarfile.open(ben.example_archive()) as tar:
        real_ids = {Path(m).parts[-2] for m in tar.getnames() if m.endswith(".json")}
    folders = sorted(f for f in small_mirror_root.iterdir() if f.is_dir() and f.name not in real_ids)[:12]
    reader = BandReader()
    return np.stack([_rgb({b: reader.read(f / ben.band_file(f.name, b)) for b in RGB_CHANNELS}) for f in folders])


@pytest.fixture(scope="module")
def network():
    import keras

    keras.utils.set_random_seed(3)
    mean = [ben.BAND_MEAN[band] for band in RGB_CHANNELS]
    variance = [ben.BAND_STD[band] ** 2 for band in RGB_CHANNELS]
    return build_model(load_section("model", ModelParams), mean, variance)


@pytest.fixture(scope="module")
def scorer(network):
    return compile_scorer(network, batch_size=BATCH)


@pytest.fixture(scope="module")
def xla(network):
    """The GPU pod's path (XLA-compiled TensorFlow), run on this machine's CPU: the same code but the device."""
    return xla_scorer(network, BATCH, "/physical_device:CPU:0")


def _keras(network, patches: np.ndarray) -> np.ndarray:
    return np.asarray(network(patches.astype(np.float32), training=False), dtype=np.float32).reshape(-1)


@pytest.mark.parametrize("path", ["scorer", "xla"])
@pytest.mark.parametrize("source", ["real", "mirror"])
@pytest.mark.parametrize("n", [0, 1, 3, 9])
def test_compiled_scores_match_keras(source, n, path, network, request):
    patches = request.getfixturevalue(source)
    patches = np.resize(patches, (n, *PATCH_SHAPE))  # 9 mirror patches, or the 6 real ones and 3 again
    scores = request.getfixturevalue(path)(patches)
    assert scores.dtype == np.float32
    assert scores.shape == (n,)
    if n:
        np.testing.assert_allclose(scores, _keras(network, patches), rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("source", ["real", "mirror"])
def test_the_comparison_is_not_vacuous(source, network, request):
    """Scores all saturated at 0 or 1 would match whatever the conversion did."""
    scores = _keras(network, request.getfixturevalue(source))
    assert np.ptp(scores) > 0.01
    assert ((scores > 1e-3) & (scores < 1 - 1e-3)).any()


@pytest.mark.parametrize("path", ["scorer", "xla"])
def test_a_memory_mapped_slice_scores_like_an_array(path, mirror, tmp_path, request):
    score = request.getfixturevalue(path)
    np.save(tmp_path / "shard.npy", mirror)
    mapped = np.load(tmp_path / "shard.npy", mmap_mode="r")[2:9]
    np.testing.assert_array_equal(score(mapped), score(np.array(mirror[2:9])))


@pytest.mark.parametrize("path", ["scorer", "xla"])
def test_wrong_shapes_and_dtypes_are_refused(path, real, request):
    score = request.getfixturevalue(path)
    with pytest.raises(ValueError, match=r"shape \(n, 120, 120, 3\)"):
        score(real[0])
    with pytest.raises(ValueError, match="uint16"):
        score(real.astype(np.float32))
    with pytest.raises(ValueError, match="batch_size 0"):
        compile_scorer(None, batch_size=0)


def test_the_gpu_is_refused_where_there_is_none_and_auto_scores_on_the_cpu(network, real):
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceUnavailableError, match="device gpu: TensorFlow sees no GPU"):
        compile_scorer(network, device="gpu")
    auto = compile_scorer(network, batch_size=BATCH, device="auto")
    np.testing.assert_array_equal(auto(real), compile_scorer(network, batch_size=BATCH, device="cpu")(real))


def test_other_layer_settings_export_exactly(real, mirror):
    """Settings the default CNN does not use (same padding, strides, dilation, biases, BatchNormalization without
    centring, Dropout), with non-trivial BatchNormalization statistics, still score as Keras does."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(4)
    mean = [ben.BAND_MEAN[band] for band in RGB_CHANNELS]
    variance = [ben.BAND_STD[band] ** 2 for band in RGB_CHANNELS]
    inputs = keras.Input(PATCH_SHAPE)
    x = layers.Normalization(mean=mean, variance=variance)(inputs)
    x = layers.Conv2D(6, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.BatchNormalization(center=False)(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
    x = layers.Conv2D(4, 3, dilation_rate=2)(x)
    x = layers.BatchNormalization()(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.5)(x)
    x = layers.Dense(8, activation="relu")(x)
    network = keras.Model(inputs, layers.Dense(1, activation="sigmoid")(x))
    rng = np.random.default_rng(4)
    for layer in network.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.3, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape))
    patches = np.concatenate([real, mirror])
    expected = _keras(network, patches)
    assert np.ptp(expected) > 0.01
    np.testing.assert_allclose(compile_scorer(network, batch_size=5)(patches), expected, rtol=0, atol=TOLERANCE)


def test_a_network_it_cannot_export_is_refused():
    import keras
    from keras import layers

    inputs = keras.Input(PATCH_SHAPE)
    x = layers.Conv2D(2, 3)(inputs)
    x = layers.Add()([x, layers.Conv2D(2, 3)(inputs)])  # a residual branch: not a chain
    network = keras.Model(inputs, layers.Dense(1)(layers.Flatten()(x)))
    with pytest.raises(ValueError, match="not a chain"):
        compile_scorer(network)


def test_load_scorer_compiles_a_logged_keras_classifier(network, real, mirror, tracking_uri):
    import mlflow

    from tasks.lib import serving
    from tasks.lib.scoring import load_scorer, resolve_version
    from tasks.lib.tracking import TAG_OPERATING_THRESHOLD
    from tasks.lib.training_runs import log_pyfunc_model

    with mlflow.start_run(), tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "classifier.keras"
        network.save(saved)
        info = log_pyfunc_model(
            serving.RawPatchClassifier(),
            artifacts={serving.KERAS_ARTIFACT: str(saved)},
            input_example=None,  # MLflow would load and run the model to check it: seconds this test does not need
            pip_requirements=["mlflow"],  # skips requirement inference; nothing is installed from it here
            registered_model_name=NAME,
        )
    mlflow.MlflowClient().set_model_version_tag(NAME, info.registered_model_version, TAG_OPERATING_THRESHOLD, "0.5")
    version = resolve_version(f"models:/{NAME}/{info.registered_model_version}")
    score = load_scorer(version)
    assert score.__module__ == "tasks.lib.inference"  # the compiled path, not the pyfunc fallback
    patches = np.concatenate([real, mirror])
    expected = mlflow.pyfunc.load_model(version.uri).predict(patches)
    np.testing.assert_allclose(score(patches), expected, rtol=0, atol=TOLERANCE)
    assert score(patches[:0]).shape == (0,)
