"""Inference benchmark: ways to run the classifier on raw patches, each over plain Keras `predict`, in one run.

    python -m bench.inference [--rounds 5] [--images 512] [--batch-sizes 64 256]

The network is params.yaml's default (tasks.lib.model.build_model), untrained, its weights from a fixed seed and its
normalisation BigEarthNet's published R, G, B statistics; the patches are the 6 real example patches shipped by
bigearthnet-common, repeated to --images (the work per patch does not depend on the pixel values). Every option
scores the same raw uint16 patches (its cast to float32 included) at each batch size:

  in this process (TensorFlow backend):
    Keras predict              model.predict(x, batch_size=B): the baseline of every ratio
    Keras call, eager          model(batch, training=False) per batch (what tasks.lib.serving did)
    tf.function                one traced function on a fixed (B, 120, 120, 3) signature
    tf.function, XLA           the same with jit_compile=True
    ONNX Runtime               tasks.lib.inference.compile_scorer (exported to ONNX, run by ONNX Runtime)
  each in a process of its own (thread pools and the Keras backend are fixed when a process starts):
    tf.function, 1 inter-op thread      TensorFlow's intra-op pool at 2 threads, inter-op at 1
    Keras on JAX, predict / jit call    KERAS_BACKEND=jax: model.predict, and a jax.jit of model.stateless_call

Measurements alternate over the options in rounds, after one warm-up of each; each option's rate is the median of
its rounds and its ratio the median of its per-round ratios to Keras predict at the same batch size (back to back,
so a busy spell of the shared machine hits both sides). Each option's largest |score - model(x)| is printed too.
The model is saved once as a .keras file, which the other processes load (so JAX runs the very same weights).
Options whose packages are not installed are reported as such. JAX is not a dependency: to measure it, install it
outside the project's environment (`uv pip install --python .venv/bin/python --target DIR --no-deps jax jaxlib`)
and run with PYTHONPATH=DIR.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tasks.lib import bigearthnet as ben
from tasks.lib.config import load_section
from tasks.lib.model import ModelParams, build_model
from tasks.lib.tiles import DTYPE, PATCH_SHAPE

SEED = 7
BASELINE = "Keras predict"
Option = Callable[[np.ndarray, int], np.ndarray]  # (uint16 patches, batch size) → float32 (n,) scores


def real_patches(count: int) -> np.ndarray:
    """The 6 real example patches' R, G, B (B04, B03, B02) as uint16 (6, *PATCH_SHAPE), repeated to `count`."""
    import tifffile

    bands: dict[str, dict[str, np.ndarray]] = {}
    with tarfile.open(ben.example_archive(), "r:bz2") as tar:
        for member in tar:
            patch_id, name = Path(member.name).parts[-2:] if member.isfile() else ("", "")
            band = name.removeprefix(f"{patch_id}_").removesuffix(".tif")
            if band in ben.RGB_BANDS:
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                bands.setdefault(patch_id, {})[band] = tifffile.imread(io.BytesIO(data))
    patches = np.stack([np.stack([b[band] for band in ben.RGB_BANDS], axis=-1) for _, b in sorted(bands.items())])
    return np.resize(patches.astype(DTYPE), (count, *PATCH_SHAPE))


def default_model() -> Any:
    """params.yaml's default network, untrained (weights from SEED), normalising by BigEarthNet's R, G, B stats."""
    import keras

    keras.utils.set_random_seed(SEED)
    mean = [ben.BAND_MEAN[b] for b in ben.RGB_BANDS]
    variance = [ben.BAND_STD[b] ** 2 for b in ben.RGB_BANDS]
    return build_model(load_section("model", ModelParams), mean, variance)


def _batches(patches: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [patches[i : i + batch_size].astype(np.float32) for i in range(0, len(patches), batch_size)]


def _tf_options(model: Any) -> dict[str, Option]:
    import tensorflow as tf

    functions: dict[tuple[int, bool], Any] = {}

    def traced(batch_size: int, jit: bool) -> Any:
        if (batch_size, jit) not in functions:
            spec = tf.TensorSpec((batch_size, *PATCH_SHAPE), tf.float32)
            fn = tf.function(lambda x: model(x, training=False), input_signature=[spec], jit_compile=jit)
            functions[batch_size, jit] = fn
        return functions[batch_size, jit]

    def function(jit: bool) -> Option:
        def run(patches: np.ndarray, batch_size: int) -> np.ndarray:
            fn = traced(batch_size, jit)
            out = []
            for batch in _batches(patches, batch_size):
                n = len(batch)
                padded = np.pad(batch, ((0, batch_size - n), (0, 0), (0, 0), (0, 0))) if n < batch_size else batch
                out.append(np.asarray(fn(padded))[:n])
            return np.concatenate(out).reshape(-1)

        return run

    return {
        BASELINE: lambda x, b: model.predict(x.astype(np.float32), batch_size=b, verbose=0).reshape(-1),
        "Keras call, eager": lambda x, b: np.concatenate(
            [np.asarray(model(batch, training=False)) for batch in _batches(x, b)]
        ).reshape(-1),
        "tf.function": function(jit=False),
        "tf.function, XLA": function(jit=True),
    }


def _onnx_option(model: Any, batch_sizes: list[int]) -> tuple[dict[str, Option], str]:
    """ONNX Runtime through tasks.lib.inference, compiled once per batch size; (options, note on conversion)."""
    try:
        from tasks.lib.inference import compile_scorer

        started = time.perf_counter()
        scorers = {b: compile_scorer(model, batch_size=b) for b in batch_sizes}
        seconds = (time.perf_counter() - started) / len(batch_sizes)
    except ImportError as exc:
        return {}, f"ONNX Runtime: not measured ({exc})"
    import onnxruntime

    note = f"ONNX Runtime {onnxruntime.__version__}: export, session and check {seconds:.1f} s per scorer"
    return {"ONNX Runtime": lambda x, b: scorers[b](x)}, note


# Options measured in processes of their own: name → (environment, kind).
WORKERS: dict[str, tuple[dict[str, str], str]] = {
    "tf.function, 1 inter-op thread": ({"KERAS_BACKEND": "tensorflow"}, "tf_threads"),
    "Keras on JAX, predict": ({"KERAS_BACKEND": "jax"}, "jax_predict"),
    "Keras on JAX, jit call": ({"KERAS_BACKEND": "jax"}, "jax_jit"),
}


def _worker(kind: str, model_path: Path, data: Path, batch_sizes: list[int]) -> None:
    """One option's process: loads the saved model, prints readiness, then times one pass per `run` line on stdin."""
    import keras

    if kind == "tf_threads":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(2)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    model = keras.saving.load_model(model_path, compile=False)
    held = np.load(data)
    patches, reference = held["patches"], held["reference"]
    if kind == "tf_threads":
        run = _tf_options(model)["tf.function"]
    elif kind == "jax_predict":
        run = _tf_options_free_predict(model)
    else:
        run = _jax_jit(model)
    worst = {}
    for b in batch_sizes:  # warm-up: tracing and compilation at each batch size
        worst[b] = float(np.max(np.abs(run(patches, b) - reference)))
    print(json.dumps({"ready": max(worst.values()), "backend": keras.backend.backend()}), flush=True)
    for _ in sys.stdin:
        rates = {}
        for b in batch_sizes:
            started = time.perf_counter()
            run(patches, b)
            rates[b] = len(patches) / (time.perf_counter() - started)
        print(json.dumps(rates), flush=True)


def _tf_options_free_predict(model: Any) -> Option:
    return lambda x, b: np.asarray(model.predict(x.astype(np.float32), batch_size=b, verbose=0)).reshape(-1)


def _jax_jit(model: Any) -> Option:
    import jax

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    call = jax.jit(lambda t, n, x: model.stateless_call(t, n, x, training=False)[0])

    def run(patches: np.ndarray, batch_size: int) -> np.ndarray:
        out = []
        for batch in _batches(patches, batch_size):
            n = len(batch)
            padded = np.pad(batch, ((0, batch_size - n), (0, 0), (0, 0), (0, 0))) if n < batch_size else batch
            out.append(np.asarray(call(trainable, non_trainable, padded))[:n])
        return np.concatenate(out).reshape(-1)

    return run


def _start_workers(model_path: Path, data: Path, batch_sizes: list[int]) -> tuple[dict[str, Any], list[str]]:
    workers, notes = {}, []
    for name, (env, kind) in WORKERS.items():
        command = [sys.executable, "-m", "bench.inference", "--worker", kind, "--model-path", str(model_path)]
        command += ["--data", str(data), "--batch-sizes", *map(str, batch_sizes)]
        proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ | env | {"TF_CPP_MIN_LOG_LEVEL": "2"},
        )
        first = proc.stdout.readline()  # type: ignore[union-attr]  # one at a time: start-ups never overlap
        if not first:
            error = proc.stderr.read().strip().splitlines()  # type: ignore[union-attr]
            notes.append(f"{name}: not measured ({error[-1] if error else f'exit {proc.wait()}'})")
            continue
        ready = json.loads(first)
        workers[name] = (proc, ready["ready"])
    return workers, notes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--images", type=int, default=512, help="patches scored per measurement")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model-path", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.worker:
        _worker(args.worker, args.model_path, args.data, args.batch_sizes)
        return
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    patches = real_patches(args.images)
    model = default_model()
    reference = np.asarray(model(patches.astype(np.float32), training=False)).reshape(-1)
    options = _tf_options(model)
    onnx, onnx_note = _onnx_option(model, args.batch_sizes)
    options |= onnx
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        model_path, data = Path(tmp) / "model.keras", Path(tmp) / "data.npz"
        model.save(model_path)
        np.savez(data, patches=patches, reference=reference)
        workers, notes = _start_workers(model_path, data, args.batch_sizes)
        worst = {name: 0.0 for name in options}
        for name, run in options.items():  # warm-up: tracing, compilation, first allocations
            for b in args.batch_sizes:
                worst[name] = max(worst[name], float(np.max(np.abs(run(patches, b) - reference))))
        rates: dict[str, dict[int, list[float]]] = {n: {b: [] for b in args.batch_sizes} for n in [*options, *workers]}
        load = []
        for _ in range(args.rounds):
            load.append(os.getloadavg()[0])
            for name, run in options.items():
                for b in args.batch_sizes:
                    started = time.perf_counter()
                    run(patches, b)
                    rates[name][b].append(len(patches) / (time.perf_counter() - started))
            for name, (proc, _) in workers.items():
                proc.stdin.write("run\n")
                proc.stdin.flush()
                for b, rate in json.loads(proc.stdout.readline()).items():
                    rates[name][int(b)].append(rate)
        for proc, _ in workers.values():
            proc.stdin.close()
            proc.wait()
    worst |= {name: w for name, (_, w) in workers.items()}
    print(
        f"inference benchmark: {args.images} patches (the 6 real example patches repeated), "
        f"{model.name} ({model.count_params():,} parameters, untrained, seed {SEED}), Keras {keras.__version__}, "
        f"{os.cpu_count()} cores, median of {args.rounds} alternating rounds; 1-min load "
        f"{min(load):.1f} .. {max(load):.1f}"
    )
    header = "".join(f"{f'batch {b} img/s':>16} {'ratio':>6} " for b in args.batch_sizes)
    print(f"  {'option':<32}{header} max |score - Keras|")
    for name, by_batch in rates.items():
        cells = ""
        for b, values in by_batch.items():
            ratio = statistics.median(v / base for v, base in zip(values, rates[BASELINE][b], strict=True))
            cells += f"{statistics.median(values):16.1f} {ratio:5.2f}x "
        print(f"  {name:<32}{cells} {worst[name]:.1e}")
    for note in [onnx_note, *notes]:
        print(f"  {note}")


if __name__ == "__main__":
    main()
