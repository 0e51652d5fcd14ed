"""The network params.yaml's `model` section builds: its input contract and what input pooling changes."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.lib.config import load_section
from tasks.lib.errors import ConfigError
from tasks.lib.model import NARROW_STRIDED_CNN, STRIDED_CNN, ModelParams, build_model, describe
from tasks.lib.tiles import PATCH_SHAPE


def _conv_macs(model) -> int:
    """Multiply-accumulates of the convolutions per patch: where the seed CNN spends its compute."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width, filters = layer.output.shape
            kernel_h, kernel_w, channels, _ = layer.kernel.shape
            total += height * width * filters * kernel_h * kernel_w * channels
    return total


def test_input_pooling_shows_the_network_block_means_of_the_whole_patch_for_a_fifth_of_the_compute():
    plain = build_model(load_section("model", ModelParams), [1.0] * 3, [1.0] * 3)
    pooled_params = load_section("model", ModelParams, overrides=["model.input_pooling=2"])
    pooled = build_model(pooled_params, [1.0] * 3, [1.0] * 3)
    assert pooled.input_shape == plain.input_shape == (None, *PATCH_SHAPE)  # served exactly as before
    assert pooled.get_layer("input_pooling").output.shape[1:3] == (60, 60)
    assert 0.15 < _conv_macs(pooled) / _conv_macs(plain) < 0.25
    patches = np.random.default_rng(0).integers(0, 4000, (2, *PATCH_SHAPE)).astype("float32")
    assert pooled.predict(patches, verbose=0).shape == (2, 1)
    assert describe(pooled_params)["input_pooling"] == 2
    assert "input_pooling" not in {layer.name for layer in plain.layers}  # params.yaml's default: none


def test_the_demos_narrow_network_halves_the_strided_networks_convolutions_on_block_means():
    def on_block_means(override: str) -> tuple[ModelParams, object]:
        params = load_section("model", ModelParams, overrides=[override, "model.input_pooling=2"])
        return params, build_model(params, [1.0] * 3, [1.0] * 3)

    _, strided = on_block_means(STRIDED_CNN)
    narrow_params, narrow = on_block_means(NARROW_STRIDED_CNN)
    assert narrow.input_shape == strided.input_shape == (None, *PATCH_SHAPE)
    assert describe(narrow_params)["conv0"] == "16x5x5/stride2/pool2"
    assert 0.45 < _conv_macs(narrow) / _conv_macs(strided) < 0.6  # the second convolution reads half the channels


def test_a_strided_first_convolution_sees_every_pixel_for_a_fraction_of_the_compute():
    plain = build_model(load_section("model", ModelParams), [1.0] * 3, [1.0] * 3)
    strided_params = load_section("model", ModelParams, overrides=[STRIDED_CNN])
    strided = build_model(strided_params, [1.0] * 3, [1.0] * 3)
    assert strided.input_shape == plain.input_shape == (None, *PATCH_SHAPE)
    first = next(layer for layer in strided.layers if layer.name.startswith("conv2d"))
    assert first.strides == (2, 2) and first.output.shape[1:3] == (58, 58)  # windows 2 apart, 5 wide: none skipped
    assert 0.15 < _conv_macs(strided) / _conv_macs(plain) < 0.3
    assert describe(strided_params)["conv0"] == "32x5x5/stride2/pool2"
    assert describe(load_section("model", ModelParams))["conv0"] == "32x5x5/pool2"  # the default's record unchanged
    # A stride of 1 is the default and is not written out, so the seed CNN's training fingerprint is unchanged.
    assert "stride" not in str(load_section("model", ModelParams).model_dump(exclude_defaults=True))


def test_a_stride_wider_than_the_kernel_is_refused():
    with pytest.raises(ConfigError, match="stride 3 is larger than the kernel"):
        load_section(
            "model", ModelParams, overrides=["model.conv_layers=[{filters: 8, kernel: 2, stride: 3, pool: 1}]"]
        )


def test_label_smoothing_trains_towards_softened_targets():
    """train.label_smoothing 0.2: a cloud patch scored 0.9 is already on target (0.9), so its loss is the entropy of
    0.9, not -log 0.9."""
    import keras

    from tasks.lib.model import compile_for_training

    params = load_section("model", ModelParams, overrides=["model.conv_layers=[{filters: 2, kernel: 3, pool: 4}]"])
    for smoothing, expected in ((0.0, -np.log(0.9)), (0.2, -(0.9 * np.log(0.9) + 0.1 * np.log(0.1)))):
        model = build_model(params, [1.0] * 3, [1.0] * 3)
        compile_for_training(model, "adam", 0.001, label_smoothing=smoothing)
        loss = model.loss(np.array([[1.0]], dtype="float32"), np.array([[0.9]], dtype="float32"))
        assert float(keras.ops.convert_to_numpy(loss)) == pytest.approx(expected, rel=1e-4)


def test_a_backbone_from_scratch_keeps_batch_norm_statistics_as_current_as_the_seed_cnn():
    import keras

    params = load_section("model", ModelParams, overrides=["model.architecture=mobilenet_v2"])
    model = build_model(params, [1.0] * 3, [1.0] * 3)
    norms = [
        layer
        for layer in model.get_layer("mobilenetv2_1.00_120").layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert len(norms) > 10
    assert {layer.momentum for layer in norms} == {params.batch_norm_momentum}  # keras.applications' 0.999 replaced
    assert describe(params)["batch_norm_momentum"] == params.batch_norm_momentum
