"""Training input benchmark: the tf.data pipeline's throughput over the training step's, measured in one run.

    python -m bench.train_input [--rounds 7] [--steps 8] [--passes 3]

(a) input alone: iterate tasks.lib.inputs.dataset over the train split exactly as tasks.train configures it (shuffled,
    augmented, batch size of params.yaml's train section), --passes epochs, consuming every batch, no model: images/s.
(b) training step alone: one epoch of model.fit of params.yaml's default network (tasks.lib.model.build_model, compiled
    as tasks.train compiles it) over --steps augmented batches already in memory, so no input work is in it: images/s.
(a)/(b) is how many times faster the input can feed than the model can eat (target >= 3: the input must never be the
bottleneck). (c) end to end: one epoch of model.fit of the same model on the real pipeline over the same --steps
batches' patches; (c)/(b) near 1 means the pipeline, sharing the CPU with the training step, costs the step nothing.
Each epoch of (c) runs its pipeline to the end, as training does (freeing a tf.data iterator stopped mid-epoch takes
about 0.3 s here, which training never pays), and its time includes freeing the iterator, which model.fit does once
per epoch: with tf.data's autotuning on, that waited for the autotuning thread's next wake-up (tasks/lib/inputs.py).
Measurements alternate (a, b, c, a, b, c, ...) after one warm-up of each, and the median of each is reported, with
(c)/(b) taken per round (back to back, so a busy spell of a shared machine hits both sides). The process CPU time
per image of (a), (b) and (c) is printed too: it does not depend on what else the machine runs, and on 2 cores the
input's CPU time is taken from the training step.

(d) the trainer's throughput options, each in a process of its own (thread settings and oneDNN are fixed when
TensorFlow starts): TensorFlow's intra/inter-op thread pools, oneDNN off, XLA (`jit_compile`), batch size 32/64/128,
each timing one epoch of model.fit over the same --option-images augmented patches held in memory (as (b)), the
processes measured one after another in alternating rounds; each option's rate is reported over the default's of its
own round. Then (e): the default and the fastest option each train a fresh model from the same seed for
--quality-epochs epochs on the real pipeline and report val metrics, to check the option leaves results equal. Keras
on the JAX backend is one more option with `--jax DIR`, a directory JAX is installed in (JAX is not a dependency:
`uv pip install --target DIR --no-deps jax jaxlib` beside this venv's numpy, ml_dtypes, scipy and opt_einsum); its
process gets KERAS_BACKEND=jax, DIR on PYTHONPATH and Keras' jit-compiled training step.
Beside the options, other networks (the seed CNN on 2×2 block means, or with a stride-2 first convolution; the
keras.applications backbones mobilenet_v2 and resnet50_v2 from scratch: other models, so their quality is
bench.quality's to measure, never (e)'s) and a slower machine of this kind emulated here
(oneDNN held to AVX2 kernels, the process held to one core), alone and with the strided network: what the demo's
training budget buys where the seed CNN trains at a sixth of this machine's rate.

Data: the demo's tiles and small set when `make demo` has run; otherwise a mirror is built, tiled and sampled with
the project's own steps into .local/bench/train_input/ (kept for the next run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tasks.lib import inputs
from tasks.lib.config import load_section
from tasks.lib.model import NARROW_STRIDED_CNN, STRIDED_CNN, ModelParams, build_model, compile_for_training
from tasks.lib.pipeline import recorded_data
from tasks.lib.training_runs import read_splits
from tasks.sample import MANIFEST_FILE
from tasks.train import TrainParams

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / ".local" / "data"
BUILT = REPO / ".local" / "bench" / "train_input"


def _data() -> tuple[Path, Path]:
    """(tiles, manifest): the demo's when present, else built once into BUILT with the project's steps."""
    demo = recorded_data(DATA, "demo")
    if demo:
        return demo
    manifest = BUILT / "samples" / "small" / MANIFEST_FILE
    if not manifest.is_file():
        from tasks.mirror import MirrorParams, build_mirror
        from tasks.sample import SampleParams, sample
        from tasks.tile import TileParams, tile

        # 3,000 patches hold ~900 cloud ones: 800 per class gives 1,280 train patches (10 batches of 128).
        mirror = build_mirror(
            out=BUILT / "mirror",
            params=load_section("mirror", MirrorParams, overrides=["mirror.patches=3000", "mirror.seed=1"]),
        )
        extracted = BUILT / "extracted"
        extracted.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "xzf", str(mirror.archive), "-C", str(extracted)], check=True)
        tile(patches=next(extracted.iterdir()), out=BUILT / "tiles", params=load_section("tile", TileParams))
        params = load_section("sample", SampleParams, overrides=["sample.small_per_class=800"])
        sample(tiles=BUILT / "tiles", out=BUILT / "samples", dataset="small", params=params)
    return BUILT / "tiles", manifest


def _compiled(
    model_params: ModelParams, params: TrainParams, mean: list[float], variance: list[float], jit_compile: bool = False
) -> Any:
    model = build_model(model_params, mean, variance)
    # as tasks.train compiles it: the metrics are part of every training step
    compile_for_training(model, params.optimizer, params.learning_rate, jit_compile=jit_compile)
    return model


def _consume(data: Any) -> int:
    images_seen = 0
    for images, _ in data:
        images_seen += int(images.shape[0])
        float(images[-1, -1, -1, -1])  # the batch is really there
    return images_seen


def _timed(fn: Any) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


# A variant of session 12's demo network (the strided network on block means), tried for a slow machine's budget.
STRIDED_CNN_3X3 = STRIDED_CNN.replace("{filters: 32, kernel: 5, pool: 2}", "{filters: 32, kernel: 3, pool: 2}")

# (d)'s options: name → settings of one worker process. "default" is params.yaml's train section as it is.
OPTIONS: dict[str, dict[str, Any]] = {
    "default": {},
    "threads intra 2, inter 1": {"intra": 2, "inter": 1},
    "threads intra 1, inter 1": {"intra": 1, "inter": 1},
    "oneDNN off": {"onednn": False},
    "XLA (jit_compile)": {"jit_compile": True},
    "batch 32": {"batch_size": 32},
    "batch 128": {"batch_size": 128},
    "XLA, batch 128": {"jit_compile": True, "batch_size": 128},
    "Keras on JAX (jitted)": {"backend": "jax", "jit_compile": True},  # with --jax only
    "block means (input_pooling 2)": {"model": ["model.input_pooling=2"]},
    "strided first convolution": {"model": [STRIDED_CNN]},
    "strided, on block means": {"model": [STRIDED_CNN, "model.input_pooling=2"]},
    "narrow strided, on block means (the demo's since session 13)": {
        "model": [NARROW_STRIDED_CNN, "model.input_pooling=2"]
    },
    "strided, on block means, second convolution 3x3": {"model": [STRIDED_CNN_3X3, "model.input_pooling=2"]},
    "mobilenet_v2 from scratch": {"model": ["model.architecture=mobilenet_v2"]},
    "resnet50_v2 from scratch": {"model": ["model.architecture=resnet50_v2"]},
    "emulated: AVX2 kernels, 1 core": {"env": {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "cores": 1},
    "emulated, strided": {"env": {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "cores": 1, "model": [STRIDED_CNN]},
}
# Options whose results must equal the default's (the others train another network or emulate another machine).
SAME_RESULTS = [name for name, option in OPTIONS.items() if not option.keys() & {"model", "env", "cores"}]


def _option_worker(option: dict[str, Any], images: int) -> None:
    """One option's process: answers `fit` (time one epoch over in-memory batches) and `quality E` on stdin."""
    import keras
    import tensorflow as tf

    if "intra" in option:
        tf.config.threading.set_intra_op_parallelism_threads(option["intra"])
        tf.config.threading.set_inter_op_parallelism_threads(option["inter"])
    overrides = [f"train.batch_size={option['batch_size']}"] if "batch_size" in option else []
    params = load_section("train", TrainParams, overrides=overrides)
    jit = bool(option.get("jit_compile"))
    model_params = load_section("model", ModelParams, overrides=option.get("model", []))
    tiles, manifest = _data()
    source = inputs.open_tiles(tiles)
    splits = read_splits(manifest, params.max_train_patches)
    keras.utils.set_random_seed(params.seed)
    mean, variance = inputs.channel_moments(source, splits["train"])
    subset = splits["train"].sample(n=images, random_state=params.seed)
    settings = inputs.PipelineSettings(params.batch_size, True, params.augment, params.seed, params.shuffle_buffer)
    held = list(inputs.dataset(source, subset, settings))
    data = tf.data.Dataset.from_tensor_slices(
        (tf.concat([x for x, _ in held], 0), tf.concat([y for _, y in held], 0))
    ).batch(params.batch_size)
    data = data.cache()
    model = _compiled(model_params, params, mean, variance, jit)
    model.fit(data, epochs=1, verbose=0)  # warm-up: tracing, XLA compilation
    print(json.dumps({"ready": True, "backend": keras.backend.backend()}), flush=True)
    for command in sys.stdin:
        if command.strip() == "fit":
            wall, cpu = _timed(lambda: model.fit(data, epochs=1, verbose=0))
            print(json.dumps({"rate": images / wall, "cpu_ms": cpu / images * 1000}), flush=True)
        elif command.startswith("quality"):
            epochs = int(command.split()[1])
            keras.utils.set_random_seed(params.seed)
            fresh = _compiled(model_params, params, mean, variance, jit)
            val = inputs.dataset(source, splits["val"], inputs.PipelineSettings(params.batch_size, False, False, 0))
            started = time.perf_counter()
            history = fresh.fit(inputs.dataset(source, splits["train"], settings), validation_data=val,
                                epochs=epochs, verbose=0)  # fmt: skip
            seconds = time.perf_counter() - started
            last = {k: round(float(v[-1]), 4) for k, v in history.history.items() if k.startswith("val_")}
            print(json.dumps(last | {"seconds": round(seconds, 1)}), flush=True)


def _options(rounds: int, images: int, quality_epochs: int, jax: Path | None, chosen: list[str] | None) -> None:
    """(d) and (e): each option in its own process, timed in alternating rounds; the fastest checked for equality."""
    workers: dict[str, subprocess.Popen[str]] = {}
    options = {
        name: option
        for name, option in OPTIONS.items()
        if (jax or option.get("backend") != "jax") and (not chosen or name == "default" or name in chosen)
    }
    for name, option in options.items():
        env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "2"} | option.get("env", {})
        if option.get("backend") == "jax":
            path = os.pathsep.join(filter(None, [str(jax), env.get("PYTHONPATH")]))
            env |= {"KERAS_BACKEND": "jax", "PYTHONPATH": path}
        if option.get("onednn") is False:
            env["TF_ENABLE_ONEDNN_OPTS"] = "0"
        command = [sys.executable, "-m", "bench.train_input", f"--option-images={images}"]
        command += ["--worker", json.dumps(option)]
        if "cores" in option:  # born on those cores, so TensorFlow sizes its thread pools for them
            cores = sorted(os.sched_getaffinity(0))[: option["cores"]]
            command = ["taskset", "--cpu-list", ",".join(map(str, cores)), *command]
        workers[name] = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        # one at a time: start-ups (imports, tracing, XLA compilation) never overlap a measurement
        first = workers[name].stdout.readline()  # type: ignore[union-attr]
        if not first:
            raise SystemExit(f"option {name!r}: its process exited {workers[name].wait()} before it was ready")
        ready = json.loads(first)
        if name == "default":
            backend = ready["backend"]

    def ask(name: str, command: str) -> dict[str, Any]:
        proc = workers[name]
        proc.stdin.write(command + "\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        return json.loads(proc.stdout.readline())  # type: ignore[union-attr]

    measured: dict[str, list[dict[str, Any]]] = {name: [] for name in options}
    for _ in range(rounds):
        for name in options:
            measured[name].append(ask(name, "fit"))
    base = [m["rate"] for m in measured["default"]]
    print(
        f"  (d) throughput options: one epoch of fit over {images} in-memory patches, Keras backend {backend}, "
        f"median of {rounds} alternating rounds"
    )
    print(f"      {'option':<28} {'img/s':>7}   {'over default, per round':<28} CPU ms/image")
    ratios: dict[str, float] = {}
    for name, values in measured.items():
        rates = [m["rate"] for m in values]
        per_round = [r / b for r, b in zip(rates, base, strict=True)]
        ratios[name] = statistics.median(per_round)
        cpu = statistics.median(m["cpu_ms"] for m in values)
        low, high = min(per_round), max(per_round)
        print(
            f"      {name:<28} {statistics.median(rates):7.1f}   {ratios[name]:5.2f} (rounds {low:.2f} .. {high:.2f})"
            f"        {cpu:.1f}"
        )
    fastest = max((name for name in SAME_RESULTS if name in ratios), key=ratios.__getitem__)
    if quality_epochs and fastest != "default":
        print(f"  (e) equal results? a fresh model from the same seed, {quality_epochs} epochs on the real pipeline:")
        for name in ("default", fastest):
            print(f"      {name:<28} {ask(name, f'quality {quality_epochs}')}")
    for proc in workers.values():
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=8, help="training steps (batches) per measurement of (b) and (c)")
    p.add_argument("--passes", type=int, default=3, help="epochs over the train split per measurement of (a)")
    p.add_argument("--part", choices=["input", "options", "all"], default="all", help="(a)-(c), (d)-(e) or both")
    p.add_argument("--option-rounds", type=int, default=3, help="alternating rounds of (d)")
    p.add_argument("--option-images", type=int, default=384, help="patches per epoch of (d): 32, 64, 128 divide it")
    p.add_argument("--quality-epochs", type=int, default=3, help="epochs of (e); 0 skips it")
    p.add_argument("--jax", type=Path, metavar="DIR", help="a directory JAX is installed in: adds Keras on JAX to (d)")
    p.add_argument(
        "--options",
        nargs="+",
        choices=list(OPTIONS),
        metavar="NAME",
        help="measure only these options of (d) beside the default (each process holds a model and its data: all "
        f"{len(OPTIONS)} at once need ~25 GB with the backbones); names: {', '.join(OPTIONS)}",
    )
    p.add_argument("--worker", type=json.loads, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.worker is not None:
        _option_worker(args.worker, args.option_images)
        return
    if args.part != "options":
        _input(args)
    if args.part != "input":
        _options(args.option_rounds, args.option_images, args.quality_epochs, args.jax, args.options)


def _input(args: argparse.Namespace) -> None:
    import keras
    import tensorflow as tf

    tiles, manifest = _data()
    params = load_section("train", TrainParams)
    model_params = load_section("model", ModelParams)
    source = inputs.open_tiles(tiles)
    train = read_splits(manifest, params.max_train_patches)["train"]
    keras.utils.set_random_seed(params.seed)
    mean, variance = inputs.channel_moments(source, train)

    def pipeline(frame: Any) -> Any:  # exactly tasks.train's train-split pipeline
        settings = inputs.PipelineSettings(params.batch_size, True, params.augment, params.seed, params.shuffle_buffer)
        return inputs.dataset(source, frame, settings)

    step_images = args.steps * params.batch_size
    if len(train) < step_images:
        raise SystemExit(f"{manifest}: {len(train)} train patches, fewer than --steps x batch size")
    subset = train.sample(n=step_images, random_state=params.seed)  # an epoch of --steps batches for (b) and (c)
    model = _compiled(model_params, params, mean, variance)
    held = list(pipeline(subset))  # augmented batches, held in memory for (b), with the pipeline's element spec
    in_memory = (
        tf.data.Dataset.from_tensor_slices((tf.concat([x for x, _ in held], 0), tf.concat([y for _, y in held], 0)))
        .batch(params.batch_size)
        .cache()
    )
    no_autotune = tf.data.Options()
    no_autotune.autotune.enabled = False  # as in tasks.lib.inputs: freeing an iterator waits for nothing
    in_memory = in_memory.with_options(no_autotune)

    def fit(data: Any) -> None:
        model.fit(data, epochs=1, shuffle=False, verbose=0)

    def read() -> None:
        for _ in range(args.passes):  # a fresh iterator per pass, as each epoch of model.fit makes one
            _consume(pipeline(train))

    read()  # warm-ups: the page cache, tracing, the first allocations
    fit(in_memory)
    fit(pipeline(subset))
    input_images = args.passes * len(train)
    reads, steps, fits = [], [], []
    for _ in range(args.rounds):
        reads.append(_timed(read))
        steps.append(_timed(lambda: fit(in_memory)))
        fits.append(_timed(lambda: fit(pipeline(subset))))

    def rates(measured: list[tuple[float, float]], images: int) -> list[float]:
        return [images / wall for wall, _ in measured]

    def cpu_ms(measured: list[tuple[float, float]], images: int) -> str:
        return f"{statistics.median(cpu for _, cpu in measured) / images * 1000:.3f} CPU ms/image"

    def spread(values: list[float], digits: int) -> str:
        low, mid, high = min(values), statistics.median(values), max(values)
        return f"{mid:8.{digits}f}   (rounds {low:.{digits}f} .. {high:.{digits}f})"

    a, b, c = rates(reads, input_images), rates(steps, step_images), rates(fits, step_images)
    # (c) over the (b) of its own round: the two ran back to back, so a slow spell of a shared machine hits both.
    paired = [fit / step for fit, step in zip(c, b, strict=True)]
    med = statistics.median
    print(
        f"training input benchmark: {len(train)} train patches of {manifest.parent.name} ({tiles}), "
        f"batch {params.batch_size}, augment {params.augment}, {model_params.architecture} "
        f"({model.count_params():,} parameters), {os.cpu_count()} cores, median of {args.rounds} alternating rounds"
    )
    print(f"  (a) input pipeline alone, images/s           {spread(a, 0)}   {cpu_ms(reads, input_images)}")
    print(f"  (b) training step, in-memory batches, img/s  {spread(b, 1)}   {cpu_ms(steps, step_images)}")
    print(f"      ratio (a)/(b)                            {med(a) / med(b):8.1f}   target >= 3")
    print(f"  (c) fit on the real pipeline, images/s       {spread(c, 1)}   {cpu_ms(fits, step_images)}")
    print(f"      ratio (c)/(b), per round                 {spread(paired, 2)}   target ~ 1: input not the bottleneck")


if __name__ == "__main__":
    main()
