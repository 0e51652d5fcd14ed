"""Compiled inference for the classifier: the Keras network exported once to ONNX and run by ONNX Runtime.

Chosen by measurement (bench/inference.py: the default CNN on this project's 2 shared cores, every option side by
side in one run): ONNX Runtime scored raw patches 2.6-2.7x as fast as plain Keras `predict` at batch 64 and 256,
where a `tf.function` gained 1.2-1.3x and XLA (`jit_compile`) 1.5x. Keras on the JAX backend came close (2.5-3.6x
with a jitted call, in one noisier run) but Keras picks its backend when it is first imported, which an Airflow task
or a test process that already imported keras with TensorFlow cannot undo. The export here runs in-process whatever
backend Keras has, needs no network, and its scores are checked against the Keras model before it is used.

The ONNX graph takes the raw uint16 patches itself (its first node casts them to float32) and has a dynamic batch
dimension, so a last partial batch runs as it is: no padding, nothing recompiled per shape.

On a GPU (the screening pod) the network runs in TensorFlow instead, XLA-compiled on the device: the trainer image's
TensorFlow is the CUDA build its GPU pool is chosen for, whereas onnxruntime-gpu on PyPI is built for CUDA 13, which
no longer supports the V100s the pool has (compute capability 7.0). `device` says which: `cpu`, `gpu` (refused
without one) or `auto` (the GPU when TensorFlow sees one).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from tasks.lib.errors import DeviceUnavailableError
from tasks.lib.tiles import DTYPE, PATCH_SHAPE

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 64  # as fast as 256 or faster in bench/inference.py; a quarter of 256's activation memory
OPSET = 17
TOLERANCE = 1e-4  # the largest |compiled - Keras| accepted on the check at compile time
_CHECK_PATCHES = 4  # patches in that check: enough to exercise every layer, cheap to run twice
_INPUT_NAME = "rgb"

Scorer = Callable[[np.ndarray], np.ndarray]  # raw uint16 (n, *PATCH_SHAPE) patches → float32 (n,) P(cloud)
Device = Literal["auto", "cpu", "gpu"]


def to_onnx(keras_model: Any) -> bytes:
    """The Keras network as a serialised ONNX model: uint16 (n, *PATCH_SHAPE) in, (n, 1) P(cloud) out.

    Written layer by layer from the network's weights (`keras.ops.convert_to_numpy`, so any Keras backend will do),
    for the layers tasks.lib.model's `cnn` architecture is made of: a chain of Normalization, Conv2D,
    BatchNormalization, MaxPooling2D, Flatten, Dense and Dropout, with relu, sigmoid or no activation. Not tf2onnx
    (nor Keras' `model.export(format="onnx")`, which uses it): its wheel installs a top-level `tests` package into
    site-packages, which shadows this project's tests.

    Raises:
        ValueError: the network holds a layer, a setting or a topology this exporter does not write (for example the
            mobilenet_v2 and resnet50_v2 backbones, nested models).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[Any] = []
    weights: list[Any] = []
    counter = iter(range(1_000_000))

    def const(name: str, value: np.ndarray) -> str:
        weights.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name=name))
        return name

    def node(op: str, inputs: list[str], **attributes: Any) -> str:
        out = f"{op.lower()}_{next(counter)}"
        nodes.append(helper.make_node(op, inputs, [out], **attributes))
        return out

    x = node("Cast", [_INPUT_NAME], to=TensorProto.FLOAT)
    channels_first = False  # the graph runs convolutions in ONNX's NCHW; Keras' layout is NHWC
    previous = None
    for layer in keras_model.layers:
        kind, config = type(layer).__name__, layer.get_config()
        if kind == "InputLayer":
            previous = layer
            continue
        if previous is None or layer.input is not previous.output:
            raise ValueError(f"layer {layer.name!r}: the network is not a chain of layers from its input")
        previous = layer
        if config.get("data_format", "channels_last") != "channels_last" or _dtype(config) != "float32":
            raise ValueError(f"layer {layer.name!r}: only float32, channels_last layers are exported")
        if kind == "Normalization":
            if config["invert"] or tuple(config["axis"]) not in ((-1,), (3,)):
                raise ValueError(f"layer {layer.name!r}: only a per-channel, non-inverted Normalization is exported")
            mean, variance = (_numpy(layer.mean), _numpy(layer.variance))
            if channels_first:
                raise ValueError(f"layer {layer.name!r}: Normalization after a convolution is not exported")
            x = node("Sub", [x, const(f"{layer.name}/mean", mean)])
            x = node("Div", [x, const(f"{layer.name}/std", np.maximum(np.sqrt(variance), _EPSILON))])
        elif kind == "Conv2D":
            if config["groups"] != 1:
                raise ValueError(f"layer {layer.name!r}: grouped convolutions are not exported")
            if not channels_first:
                x, channels_first = node("Transpose", [x], perm=[0, 3, 1, 2]), True
            kernel = _numpy(layer.kernel).transpose(3, 2, 0, 1)  # (h, w, in, out) → (out, in, h, w)
            inputs = [x, const(f"{layer.name}/kernel", kernel)]
            if config["use_bias"]:
                inputs.append(const(f"{layer.name}/bias", _numpy(layer.bias)))
            x = node(
                "Conv",
                inputs,
                kernel_shape=list(kernel.shape[2:]),
                strides=list(config["strides"]),
                dilations=list(config["dilation_rate"]),
                auto_pad=_PADDING[_setting(layer, config, "padding", _PADDING)],
            )
            x = _activation(node, x, layer, config)
        elif kind == "MaxPooling2D":
            if not channels_first:
                x, channels_first = node("Transpose", [x], perm=[0, 3, 1, 2]), True
            x = node(
                "MaxPool",
                [x],
                kernel_shape=list(config["pool_size"]),
                strides=list(config["strides"] or config["pool_size"]),
                auto_pad=_PADDING[_setting(layer, config, "padding", _PADDING)],
            )
        elif kind == "BatchNormalization":
            if tuple(np.atleast_1d(config["axis"])) not in ((-1,), (len(layer.input.shape) - 1,)):
                raise ValueError(f"layer {layer.name!r}: only a BatchNormalization over the channels is exported")
            size = layer.moving_mean.shape[0]
            scale = _numpy(layer.gamma) if config["scale"] else np.ones(size)
            offset = _numpy(layer.beta) if config["center"] else np.zeros(size)
            moments = [_numpy(layer.moving_mean), _numpy(layer.moving_variance)]
            names = ("scale", "offset", "mean", "variance")
            inputs = [const(f"{layer.name}/{n}", v) for n, v in zip(names, [scale, offset, *moments], strict=True)]
            x = node("BatchNormalization", [x, *inputs], epsilon=float(config["epsilon"]))
        elif kind == "Flatten":
            if channels_first:  # Keras flattens in NHWC order: the Dense weights after it expect that order
                x, channels_first = node("Transpose", [x], perm=[0, 2, 3, 1]), False
            x = node("Flatten", [x], axis=1)
        elif kind == "Dense":
            if len(layer.input.shape) != 2:
                raise ValueError(f"layer {layer.name!r}: only a Dense on flat inputs is exported")
            x = node("MatMul", [x, const(f"{layer.name}/kernel", _numpy(layer.kernel))])
            if config["use_bias"]:
                x = node("Add", [x, const(f"{layer.name}/bias", _numpy(layer.bias))])
            x = _activation(node, x, layer, config)
        elif kind != "Dropout":  # Dropout: the identity at inference
            raise ValueError(f"layer {layer.name!r}: a {kind} layer is not exported")
    if channels_first:
        raise ValueError("the network does not end flat: its output is not one score per patch")
    nodes[-1].output[0] = "cloud"
    graph = helper.make_graph(
        nodes,
        "cloudscreen",
        [helper.make_tensor_value_info(_INPUT_NAME, TensorProto.UINT16, ["n", *PATCH_SHAPE])],
        [helper.make_tensor_value_info("cloud", TensorProto.FLOAT, ["n", 1])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="cloudscreen")
    model.ir_version = _IR_VERSION
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ValueError(f"the exported ONNX model is not valid: {exc}") from exc
    return model.SerializeToString()


_EPSILON = 1e-7  # keras.backend.epsilon(): Normalization divides by max(sqrt(variance), epsilon)
_IR_VERSION = 8  # the ONNX IR version of opset 17
_PADDING = {"valid": "VALID", "same": "SAME_UPPER"}  # TensorFlow's "same" pads the extra pixel at the end
_ACTIVATIONS = {"linear": None, "relu": "Relu", "sigmoid": "Sigmoid"}


def _numpy(variable: Any) -> np.ndarray:
    import keras

    return np.asarray(keras.ops.convert_to_numpy(variable), dtype=np.float32)


def _dtype(config: dict[str, Any]) -> str:
    policy = config.get("dtype")
    if isinstance(policy, dict):
        return str(policy.get("config", {}).get("name", "float32"))
    return str(policy or "float32")


def _setting(layer: Any, config: dict[str, Any], key: str, allowed: dict[str, Any]) -> str:
    value = config[key]
    if value not in allowed:
        raise ValueError(f"layer {layer.name!r}: {key}={value!r} is not exported (only {', '.join(allowed)})")
    return value


def _activation(node: Callable[..., str], x: str, layer: Any, config: dict[str, Any]) -> str:
    op = _ACTIVATIONS[_setting(layer, config, "activation", _ACTIVATIONS)]
    return node(op, [x]) if op else x


def compile_scorer(keras_model: Any, *, batch_size: int = DEFAULT_BATCH_SIZE, device: Device = "auto") -> Scorer:
    """`keras_model` (raw float reflectance → (n, 1) P(cloud)) as a compiled scorer of raw patches: ONNX Runtime on
    the CPU, or XLA on the GPU (`device`: see the module's docstring).

    The scorer takes uint16 (n, *PATCH_SHAPE) patches in R, G, B order, any n including 0 (a NumPy array or a
    memory-mapped slice), runs them in batches of `batch_size` and returns float32 (n,). Before it is returned it is
    checked against `keras_model(x, training=False)` on a few patches.

    Raises:
        DeviceUnavailableError: `device` is "gpu" and TensorFlow sees none.
        ImportError: onnx or onnxruntime is not installed (CPU).
        ValueError: a batch size below 1, a network `to_onnx` does not export, or compiled scores that differ from
            the Keras model's by more than TOLERANCE.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: must be at least 1")
    gpus = _visible_gpus() if device != "cpu" else []
    if device == "gpu" and not gpus:
        raise DeviceUnavailableError(
            "device gpu: TensorFlow sees no GPU here (on Kubernetes: a node of the GPU pool, the nvidia.com/gpu limit "
            "and the trainer image); use screen.device=auto or cpu to score on the CPU"
        )
    if gpus:
        return xla_scorer(keras_model, batch_size, gpus[0])
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no per-session notes on the console
    session = ort.InferenceSession(to_onnx(keras_model), options, providers=["CPUExecutionProvider"])
    (feed,) = (i.name for i in session.get_inputs())

    def score(patches: np.ndarray) -> np.ndarray:
        _check_patches(patches)
        out = np.empty(len(patches), np.float32)
        for start in range(0, len(patches), batch_size):
            batch = np.ascontiguousarray(patches[start : start + batch_size])
            out[start : start + len(batch)] = session.run(None, {feed: batch})[0].reshape(-1)
        return out

    _check(score, keras_model)
    log.info("compiled scorer: ONNX Runtime %s on the CPU, batch %d", ort.__version__, batch_size)
    return score


def _visible_gpus() -> list[str]:
    """TensorFlow's names of the GPUs it can use here ("/physical_device:GPU:0", ...); none with tensorflow-cpu."""
    import tensorflow as tf

    return [gpu.name for gpu in tf.config.list_physical_devices("GPU")]


def xla_scorer(keras_model: Any, batch_size: int, device: str) -> Scorer:
    """The network XLA-compiled on `device` (a TensorFlow device name: compile_scorer gives it a GPU; the tests a CPU),
    fed raw uint16 batches that are cast there. Every batch is padded to `batch_size`, so one shape is compiled once,
    whatever the last batch holds. Checked against the network as compile_scorer's ONNX path is."""
    import tensorflow as tf

    # Full float32 on GPUs that would otherwise run matrix products in TF32 (Ampere and later): 10-bit mantissas can
    # move a score by more than TOLERANCE, and the check below would refuse the scorer. For this process, as a pod is.
    tf.config.experimental.enable_tensor_float_32_execution(False)
    placement = device.replace("physical_device:", "")

    @tf.function(jit_compile=True)
    def forward(batch: Any) -> Any:
        return tf.reshape(keras_model(tf.cast(batch, tf.float32), training=False), [-1])

    def score(patches: np.ndarray) -> np.ndarray:
        _check_patches(patches)
        out = np.empty(len(patches), np.float32)
        padded = np.zeros((batch_size, *PATCH_SHAPE), DTYPE)
        with tf.device(placement):
            for start in range(0, len(patches), batch_size):
                rows = min(batch_size, len(patches) - start)
                padded[:rows] = patches[start : start + rows]
                out[start : start + rows] = forward(padded).numpy()[:rows]
        return out

    _check(score, keras_model)
    log.info("compiled scorer: TensorFlow %s with XLA on %s, batch %d", tf.__version__, placement, batch_size)
    return score


def _check_patches(patches: np.ndarray) -> None:
    if patches.ndim != 4 or patches.shape[1:] != PATCH_SHAPE or patches.dtype != DTYPE:
        shape = ", ".join(map(str, PATCH_SHAPE))
        raise ValueError(f"expected raw {DTYPE} patches of shape (n, {shape}), got {patches.dtype} {patches.shape}")


def _check(score: Scorer, keras_model: Any) -> None:
    """Refuse a conversion whose scores differ from the Keras model's on patches of plausible reflectance."""
    probe = np.random.default_rng(0).integers(0, 4000, (_CHECK_PATCHES, *PATCH_SHAPE)).astype(DTYPE)
    expected = np.asarray(keras_model(probe.astype(np.float32), training=False), dtype=np.float32).reshape(-1)
    worst = float(np.max(np.abs(score(probe) - expected)))
    if not worst <= TOLERANCE:
        raise ValueError(f"the ONNX conversion scores differ from the Keras model's by {worst:.2e} > {TOLERANCE}")
