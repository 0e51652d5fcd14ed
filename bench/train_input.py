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

Data: the demo's tiles and small set when `make demo` has run; otherwise a mirror is built, tiled and sampled with
the project's own steps into .local/bench/train_input/ (kept for the next run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from tasks.lib import inputs
from tasks.lib.config import load_section
from tasks.lib.model import ModelParams, build_model, compile_for_training
from tasks.lib.tiles import MANIFEST_FILE as TILES_MANIFEST
from tasks.lib.training_runs import read_splits
from tasks.sample import MANIFEST_FILE
from tasks.train import TrainParams

REPO = Path(__file__).resolve().parent.parent
DEMO_TILES = REPO / ".local" / "data" / "tiles" / "demo"
DEMO_MANIFEST = REPO / ".local" / "data" / "samples" / "demo" / "small" / MANIFEST_FILE
BUILT = REPO / ".local" / "bench" / "train_input"


def _data() -> tuple[Path, Path]:
    """(tiles, manifest): the demo's when present, else built once into BUILT with the project's steps."""
    if (DEMO_TILES / TILES_MANIFEST).is_file() and DEMO_MANIFEST.is_file():
        return DEMO_TILES, DEMO_MANIFEST
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


def _compiled(model_params: ModelParams, params: TrainParams, mean: list[float], variance: list[float]) -> Any:
    model = build_model(model_params, mean, variance)
    # as tasks.train compiles it: the metrics are part of every training step
    compile_for_training(model, params.optimizer, params.learning_rate)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=8, help="training steps (batches) per measurement of (b) and (c)")
    p.add_argument("--passes", type=int, default=3, help="epochs over the train split per measurement of (a)")
    args = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
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
