"""The classifier network, built from params.yaml's `model` section.

The network starts with a Normalization layer holding the train split's per-channel mean and variance, so the
saved model takes raw reflectance: the normalisation is packaged with the weights and cannot drift between training
and serving (the seed project's server normalised differently from its training code).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from tasks.lib.config import StepParams
from tasks.lib.errors import ConfigError
from tasks.lib.tiles import PATCH_SHAPE

_BACKBONES = {"mobilenet_v2": "MobileNetV2", "resnet50_v2": "ResNet50V2"}
# The seed CNN with a stride of 2 on its first convolution, as a params override: a fifth of the convolutions' work,
# for short budgets on slow CPUs (the demo trains it; docs/model-quality.md measures it).
STRIDED_CNN = (
    "model.conv_layers=[{filters: 32, kernel: 5, pool: 2, stride: 2}, {filters: 32, kernel: 5, pool: 2}, "
    "{filters: 64, kernel: 3, pool: 1}]"
)
# The same with 16 filters in its first convolution: on 2x2 block means (model.input_pooling=2) it costs two thirds
# of the strided network's CPU time per training image and keeps its quality at 30 epochs (the demo trains it).
NARROW_STRIDED_CNN = (
    "model.conv_layers=[{filters: 16, kernel: 5, pool: 2, stride: 2}, {filters: 32, kernel: 5, pool: 2}, "
    "{filters: 64, kernel: 3, pool: 1}]"
)


class ConvLayer(StepParams):
    filters: int = Field(gt=0)
    kernel: int = Field(gt=0)
    pool: int = Field(ge=1)
    stride: int = Field(default=1, ge=1)  # > 1: a learned downsampling, every pixel still seen (kernel >= stride)

    @field_validator("stride")
    @classmethod
    def _sees_every_pixel(cls, value: int, info: Any) -> int:
        if value > info.data.get("kernel", value):
            raise ValueError(f"stride {value} is larger than the kernel: pixels between the windows would be skipped")
        return value


class ModelParams(StepParams):
    architecture: Literal["cnn", "mobilenet_v2", "resnet50_v2"]
    input_pooling: int = Field(default=1, ge=1)  # 1: none (checkpoints from before this option stay valid)
    conv_layers: list[ConvLayer] = Field(min_length=1)
    dense_units: int = Field(gt=0)
    initializer: str
    batch_norm_momentum: float = Field(gt=0, lt=1)
    weights: Path | None
    freeze_backbone: bool

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value}: weights file not found (weights are never downloaded; give a local file)")
        return value


def describe(params: ModelParams) -> dict[str, Any]:
    """The architecture as flat MLflow params."""
    flat: dict[str, Any] = {
        "architecture": params.architecture,
        "input_pooling": params.input_pooling,
        "batch_norm_momentum": params.batch_norm_momentum,
    }
    if params.architecture == "cnn":
        for i, layer in enumerate(params.conv_layers):
            stride = f"/stride{layer.stride}" if layer.stride > 1 else ""
            flat[f"conv{i}"] = f"{layer.filters}x{layer.kernel}x{layer.kernel}{stride}/pool{layer.pool}"
        flat["dense_units"] = params.dense_units
        flat["initializer"] = params.initializer
    else:
        flat["weights"] = str(params.weights) if params.weights else "scratch"
        flat["freeze_backbone"] = params.freeze_backbone
    return flat


def build_model(params: ModelParams, mean: list[float], variance: list[float]) -> Any:
    """A Keras model from raw (n, *PATCH_SHAPE) float reflectance to the probability of cloud (n, 1)."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=PATCH_SHAPE, name="rgb")
    x = layers.Normalization(mean=mean, variance=variance, name="train_split_normalisation")(inputs)
    if params.input_pooling > 1:  # the network sees block means: a fraction of the compute (the patch's size stays)
        x = layers.AveragePooling2D(params.input_pooling, name="input_pooling")(x)
    if params.architecture == "cnn":
        for layer in params.conv_layers:
            x = layers.Conv2D(
                layer.filters,
                layer.kernel,
                strides=layer.stride,
                use_bias=False,
                kernel_initializer=params.initializer,
                activation="relu",
            )(x)
            x = layers.BatchNormalization(momentum=params.batch_norm_momentum)(x)
            if layer.pool > 1:
                x = layers.MaxPooling2D(layer.pool)(x)
        x = layers.Flatten()(x)
        x = layers.Dense(params.dense_units, use_bias=False, kernel_initializer=params.initializer, activation="relu")(
            x
        )
        x = layers.BatchNormalization(momentum=params.batch_norm_momentum)(x)
    else:
        x = _backbone(params)(x)
    outputs = layers.Dense(1, activation="sigmoid", name="cloud")(x)
    return keras.Model(inputs, outputs, name=f"cloudscreen_{params.architecture}")


def compile_for_training(
    model: Any,
    optimizer: str,
    learning_rate: float,
    *,
    ema_momentum: float | None = None,
    label_smoothing: float = 0.0,
    jit_compile: bool = False,
) -> None:
    """Binary cross-entropy with the metrics every run logs per epoch (accuracy, precision, recall, ROC AUC, PR AUC).

    Args:
        ema_momentum: keep an exponential moving average of the weights in the optimizer, updated every step
            (Keras' `use_ema`); tasks.train validates and keeps those averaged weights. None: no average.
        label_smoothing: train towards 1 - s/2 and s/2 instead of 1 and 0 (the reported loss is the smoothed one).
        jit_compile: compile the training step with XLA (Keras' "auto" leaves it off on CPU-only machines).
    """
    import keras

    config: dict[str, Any] = {"learning_rate": learning_rate}
    if ema_momentum is not None:
        config |= {"use_ema": True, "ema_momentum": ema_momentum}
    model.compile(
        jit_compile=jit_compile,
        optimizer=keras.optimizers.get({"class_name": optimizer, "config": config}),
        loss=keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing),
        metrics=[
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
            keras.metrics.AUC(name="auc"),
            keras.metrics.AUC(curve="PR", name="pr_auc"),
        ],
    )


def _backbone(params: ModelParams) -> Any:
    import keras

    factory = getattr(keras.applications, _BACKBONES[params.architecture])
    # weights=None never downloads; a local file is loaded by keras itself (it must match the no-top variant).
    try:
        backbone = factory(
            include_top=False,
            weights=str(params.weights) if params.weights else None,
            input_shape=PATCH_SHAPE,
            pooling="avg",
        )
    except ValueError as exc:
        raise ConfigError(f"model.weights {params.weights}: not usable for {params.architecture}: {exc}") from exc
    backbone.trainable = not (params.weights and params.freeze_backbone)
    # keras.applications build their BatchNormalization with momentum 0.99-0.999, too slow for the small set's 30 steps
    # an epoch (the seed CNN's lesson, see params.yaml): the moving statistics would lag the weights for many epochs.
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = params.batch_norm_momentum
    return backbone
