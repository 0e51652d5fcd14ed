"""Screening benchmark: the compiled scorer, tasks.screen end to end, its memory, the full-scale projection; one run.

    python -m bench.screen [--patches 20000] [--small 2000] [--screen-patches 6000] [--compare 1024] [--gpu-tflops 2]

One model and one set of patches throughout: params.yaml's default network (bench.inference.default_model: untrained,
fixed seed, BigEarthNet's R, G, B statistics), logged as tasks.train logs it (tasks.lib.serving.RawPatchClassifier)
and registered with an operating threshold in a throwaway SQLite tracking store; tiles directories of --patches,
--small and --screen-patches patches written in the tile format (tasks.lib.tiles) by repeating a pool of 512
patches (the demo's tiles when `make demo` has run, else the 6 real example patches under the 8 symmetries), named
and labelled as the first BigEarthNet patches of the official name table; kept in .local/bench/screen/ for next time.

(a) the scorer tasks.lib.scoring.load_scorer gives (compiled: tasks.lib.inference) against plain Keras
    `model.predict` of the same network (batch 64, the compiled scorer's, and 256, screen's) on --compare patches in
    memory, alternating over --rounds: images/s and the ratio per round (target >= 2).
(b) tasks.screen.screen over the --screen-patches tiles directory in this process, end to end (resolving the
    version, loading and compiling the model, the MLflow run, every output written), against that same scorer over
    the same patches already in memory, timed just before and just after the screening (their mean): patches/s and
    the ratio (target >= 0.9); the fixed cost of a screening is the difference of the two times.
(c) the peak resident memory of `python -m tasks.screen` (the whole process tree) screening --small and --patches
    patches, each in a process of its own: the ratio (target <= 1.2: memory flat in the number of patches).
(d) the time to screen all 590,326 BigEarthNet patches: on this machine at (b)'s end-to-end rate, and on one GPU pod
    at an ASSUMED rate (nothing here has a GPU): the network's floating-point work per patch (counted from its layers)
    over --gpu-tflops of sustained fp32 throughput (2 TFLOP/s: about a quarter of a T4's 8.1 peak), with the read rate
    that would need from storage.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.inference import default_model, real_patches
from bench.measure import run_measured
from tasks.lib import bigearthnet as ben
from tasks.lib.pipeline import recorded_data
from tasks.lib.tiles import (
    DTYPE,
    INDEX_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    PATCH_SHAPE,
    RGB_CHANNELS,
    create_shard,
    load_patches,
    patch_bytes,
    shard_name,
)

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / ".local" / "data"
BUILT = REPO / ".local" / "bench" / "screen"
BIGEARTHNET_PATCHES = 590_326
NAME = "cloudscreen-bench-screen"
THRESHOLD = 0.5
SHARD_PATCHES = 512  # the tile step's default shard size
POOL = 512


def _pool() -> tuple[np.ndarray, str]:
    """Patches to repeat into the tiles directories, and where they come from."""
    demo = recorded_data(DATA, "demo")
    if demo and (demo[0] / INDEX_FILE).is_file():
        ids = pd.read_parquet(demo[0] / INDEX_FILE)["patch_id"].head(POOL).tolist()
        return load_patches(demo[0], ids), f"{len(ids)} patches of the demo's tiles ({demo[0]})"
    real = real_patches(6)
    symmetries = [np.rot90(p, k) for p in (real, real[:, ::-1]) for k in range(4)]
    return np.resize(np.concatenate(symmetries, axis=0), (POOL, *PATCH_SHAPE)), "the 6 real patches, 8 symmetries"


def build_tiles(out: Path, patches: int, pool: np.ndarray) -> Path:
    """A tiles directory of `patches` patches repeating `pool`, under the first BigEarthNet names (kept if present)."""
    if (out / MANIFEST_FILE).is_file() and json.loads((out / MANIFEST_FILE).read_text())["patches"] == patches:
        return out
    (out / "shards").mkdir(parents=True, exist_ok=True)
    names = ben.name_table().head(patches)
    shards, rows = [], []
    for number, start in enumerate(range(0, patches, SHARD_PATCHES)):
        n = min(SHARD_PATCHES, patches - start)
        shard = create_shard(out / shard_name(number), n, len(RGB_CHANNELS))
        shard[:] = np.take(pool, np.arange(start, start + n) % len(pool), axis=0)
        shard.flush()
        del shard
        shards.append(shard_name(number))
        rows += [(shard_name(number), offset) for offset in range(n)]
    index = pd.DataFrame(rows, columns=["shard", "offset"]).assign(patch_id=names.index.to_numpy())
    index[["patch_id", "shard", "offset"]].to_parquet(out / INDEX_FILE, index=False)
    clouds, snow = ben.cloud_and_shadow_patches(), ben.seasonal_snow_patches()
    metadata = names.reset_index()[["patch_id", "season", "country"]]
    metadata = metadata.assign(cloud=metadata["patch_id"].isin(clouds), snow=metadata["patch_id"].isin(snow))
    metadata.to_parquet(out / METADATA_FILE, index=False)
    manifest = {
        "patches": patches,
        "channels": list(RGB_CHANNELS),
        "dtype": DTYPE,
        "shape_per_patch": list(PATCH_SHAPE),
        "shards": shards,
        "note": "bench.screen: a pool of patches repeated, not a tiled archive",
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))  # last: its presence means the directory is whole
    return out


def register(model: Any, tmp: Path) -> str:
    """Log `model` as tasks.train logs it, register it with an operating threshold; its models:/ URI."""
    import mlflow

    from tasks.lib import serving
    from tasks.lib.tracking import TAG_OPERATING_THRESHOLD
    from tasks.lib.training_runs import log_pyfunc_model

    saved = tmp / "classifier.keras"
    model.save(saved)
    with mlflow.start_run():
        info = log_pyfunc_model(
            serving.RawPatchClassifier(),
            artifacts={serving.KERAS_ARTIFACT: str(saved)},
            input_example=np.zeros((1, *PATCH_SHAPE), DTYPE),
            pip_requirements=["mlflow"],  # nothing is installed from it here
            registered_model_name=NAME,
        )
    version = str(info.registered_model_version)
    mlflow.MlflowClient().set_model_version_tag(NAME, version, TAG_OPERATING_THRESHOLD, str(THRESHOLD))
    return f"models:/{NAME}/{version}"


def flops_per_patch(model: Any) -> float:
    """Multiply-adds x 2 of the network's Conv2D and Dense layers for one patch (the rest is negligible)."""
    total = 0.0
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "Conv2D":
            kh, kw, cin, cout = layer.kernel.shape
            _, h, w, _ = layer.output.shape
            total += 2.0 * h * w * cout * kh * kw * cin
        elif kind == "Dense":
            cin, cout = layer.kernel.shape
            total += 2.0 * cin * cout
    return total


def _rate(fn: Any, n: int) -> tuple[float, float]:
    started = time.perf_counter()
    fn()
    seconds = time.perf_counter() - started
    return n / seconds, seconds


def _hours(patches_per_second: float) -> str:
    hours = BIGEARTHNET_PATCHES / patches_per_second / 3600
    return f"{hours:.1f} h" if hours >= 1 else f"{hours * 60:.0f} min"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patches", type=int, default=20_000, help="patches of the large run of (c)")
    p.add_argument("--screen-patches", type=int, default=6_000, help="patches of (b)")
    p.add_argument("--small", type=int, default=2_000, help="patches of the small run of (c)")
    p.add_argument("--compare", type=int, default=1_024, help="in-memory patches of (a)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of (a)")
    p.add_argument("--gpu-tflops", type=float, default=2.0, help="(d)'s ASSUMED sustained fp32 TFLOP/s of one GPU")
    args = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    from tasks import screen as screening
    from tasks.lib.config import load_section
    from tasks.lib.scoring import load_scorer, resolve_version

    pool, pool_source = _pool()
    large = build_tiles(BUILT / f"tiles-{args.patches}", args.patches, pool)
    small = build_tiles(BUILT / f"tiles-{args.small}", args.small, pool)
    model = default_model()
    with tempfile.TemporaryDirectory(prefix="bench-screen-") as name:
        tmp = Path(name)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        os.chdir(tmp)  # the SQLite store keeps artifacts under ./mlruns
        uri = register(model, tmp)
        version = resolve_version(uri)
        scorer = load_scorer(version)
        path = "compiled" if scorer.__module__ == "tasks.lib.inference" else "pyfunc predict (NOT compiled)"
        screen_params = load_section("screen", screening.ScreenParams)
        print(
            f"screening benchmark: {model.name} ({model.count_params():,} parameters, untrained), scorer: {path}; "
            f"tiles of {pool_source} repeated; {os.cpu_count()} cores, 1-min load {os.getloadavg()[0]:.1f}"
        )

        # (a) the compiled scorer against plain Keras predict, alternating
        held = np.resize(pool, (args.compare, *PATCH_SHAPE))
        ways = {
            "Keras predict, batch 64": lambda: model.predict(held.astype(np.float32), batch_size=64, verbose=0),
            "Keras predict, batch 256": lambda: model.predict(held.astype(np.float32), batch_size=256, verbose=0),
            "load_scorer's scorer": lambda: scorer(held),
        }
        for way in ways.values():  # warm-up
            way()
        rates: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, way in ways.items():
                rates[name].append(_rate(way, args.compare)[0])
        best_plain = [max(a, b) for a, b in zip(*(rates[n] for n in list(ways)[:2]), strict=True)]
        print(f"  (a) {args.compare} patches in memory, median of {args.rounds} alternating rounds")
        for name, values in rates.items():
            ratio = statistics.median(v / b for v, b in zip(values, best_plain, strict=True))
            print(f"      {name:<28} {statistics.median(values):8.1f} patches/s   {ratio:5.2f}x the faster predict")
        print("      target: compiled >= 2x plain Keras predict")

        # (b) tasks.screen end to end against the same scorer on the same patches in memory, timed just before and
        # just after it (their mean is the bare rate: a busy spell of the shared machine over the screening hits both)
        tiles_b = build_tiles(BUILT / f"tiles-{args.screen_patches}", args.screen_patches, pool)
        in_memory = load_patches(tiles_b, pd.read_parquet(tiles_b / INDEX_FILE)["patch_id"].tolist())
        scorer(in_memory[: len(pool)])  # warm-up
        before = _rate(lambda: scorer(in_memory), args.screen_patches)[0]
        started = time.perf_counter()
        result = screening.screen(tiles=tiles_b, out=tmp / "screened", params=screen_params, model=uri)
        wall = time.perf_counter() - started
        after = _rate(lambda: scorer(in_memory), args.screen_patches)[0]
        bare, end_to_end = (before + after) / 2, args.screen_patches / wall
        print(f"  (b) {args.screen_patches} patches, screen batch {screen_params.batch_size}")
        print(
            f"      bare scorer, patches in memory      {bare:8.1f} patches/s   "
            f"(before {before:.1f}, after {after:.1f})"
        )
        print(
            f"      tasks.screen end to end             {end_to_end:8.1f} patches/s   ({wall:.1f} s; its summary says "
            f"{result.summary['patches_per_second']:.1f}/s over its scoring loop)"
        )
        print(f"      ratio                                  {end_to_end / bare:5.2f}    target >= 0.9")
        print(f"      fixed cost of a screening (end to end - in memory): {wall - args.screen_patches / bare:.1f} s")

        # (c) peak memory of the CLI, small and large, each in a process of its own
        peaks = {}
        for tiles, n in ((small, args.small), (large, args.patches)):
            command = [sys.executable, "-m", "tasks.screen", "--tiles", str(tiles), "--out", str(tmp / f"cli-{n}")]
            command += ["--model", uri, "--params", str(REPO / "params.yaml")]
            peaks[n] = run_measured(command, cwd=tmp, env=os.environ | {"PYTHONPATH": str(REPO)})
        print("  (c) peak RSS of `python -m tasks.screen` (process tree), each in a process of its own")
        for n, measured in peaks.items():
            print(f"      {n:>7} patches   {measured.peak_rss_bytes / 2**20:8.0f} MiB   ({measured.seconds:.1f} s)")
        ratio = peaks[args.patches].peak_rss_bytes / peaks[args.small].peak_rss_bytes
        print(f"      ratio {args.patches} / {args.small}       {ratio:5.2f}    target <= 1.2")

    # (d) the full snapshot
    flops = flops_per_patch(model)
    gpu = args.gpu_tflops * 1e12 / flops
    print(f"  (d) all {BIGEARTHNET_PATCHES:,} BigEarthNet patches")
    print(f"      this machine, at (b)'s end-to-end rate {end_to_end:.0f}/s   {_hours(end_to_end)}")
    print(
        f"      one GPU pod, ASSUMED {gpu:,.0f}/s                  {_hours(gpu)}   (assumption, not measured: "
        f"{flops / 1e9:.2f} GFLOP per patch counted from the layers, at {args.gpu_tflops:g} TFLOP/s sustained fp32; "
        f"it needs the shards read at {gpu * patch_bytes(len(RGB_CHANNELS)) / 1e6:,.0f} MB/s)"
    )


if __name__ == "__main__":
    main()
