"""Model quality on the embedded default: the seed CNN and the SGD baseline on a held-out mirror, in one run.

    python -m bench.quality [--heldout-seed 8] [--retrain] [--set SECTION.KEY=VALUE ...]

Training data is the embedded default: the demo's snapshot (`make demo`: tiles/demo and samples/demo/small); when it
is absent, demo/run.py builds it. The held-out data is a second mirror with the same `mirror` params but another
seed, built, extracted, validated, tiled and sampled (small set) with the project's own steps into
.local/bench/quality/heldout-<seed>/ (reused when complete; every step is idempotent). Names come from the official
BigEarthNet lists, so two mirrors can share patch names: held-out patches whose name is in the training mirror AND
whose pixels are identical there (the real example patches, copied verbatim into every mirror) are removed from the
held-out manifest and natural set before evaluation; names shared with different pixels are different images and stay.

Both models train with params.yaml's defaults (tasks.train.train, tasks.baseline.baseline) into a dedicated MLflow
store, sqlite:///.local/bench/quality/mlflow.db, with artifacts under .local/bench/quality/mlruns. A finished run
for the same params and data is reused (--retrain trains again). Each model is evaluated with tasks.evaluate on (a)
the training mirror's own val/test/natural sets, logged to the model's run, and (b) the held-out small set, logged
to a child run of the model's run (a second evaluation into the same run would overwrite the first's evaluation/
artifacts and metrics). The table (recall at the operating threshold chosen on val for the target recall, precision
there, ROC-AUC, accuracy at 0.5; test and natural) is printed and written to .local/bench/quality/quality.json with
timings and the per-epoch learning curves (quality-<hash>.json when --set is given).

--set tries other params without editing params.yaml: train/model/baseline/evaluate ones change the runs; mirror ones
(e.g. mirror.bright_surface_fraction=0.25) build both the training and the held-out mirror under
.local/bench/quality/ with those params instead of using the demo's snapshot.

Target (issue 5): on the held-out test split the CNN reaches recall >= 0.958 with precision >= 0.91 and beats the
baseline by a wide margin."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.lib import cli
from tasks.lib.cli import configure_logging
from tasks.lib.config import load_section
from tasks.lib.files import file_digest, write_json
from tasks.lib.tiles import INDEX_FILE, load_patches
from tasks.lib.tiles import MANIFEST_FILE as TILES_MANIFEST
from tasks.sample import MANIFEST_FILE, NATURAL_FILE

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / ".local" / "data"
DEMO_TILES = DATA / "tiles" / "demo"
DEMO_MANIFEST = DATA / "samples" / "demo" / "small" / MANIFEST_FILE
WORK = REPO / ".local" / "bench" / "quality"
TRACKING_DB = WORK / "mlflow.db"
RESULT_FILE = WORK / "quality.json"

TARGET = {"test_op_recall": 0.958, "test_op_precision": 0.91}
COLUMNS = {"recall@op": "op_recall", "precision@op": "op_precision", "roc_auc": "roc_auc", "acc@0.5": "t50_accuracy"}
TUNABLE = ("mirror", "model", "train", "baseline", "evaluate")  # sections --set may override
CURVE_METRICS = ("train_loss", "val_loss", "train_auc", "val_auc", "val_accuracy", "learning_rate", "epoch_seconds")

log = logging.getLogger("bench.quality")


# --- data ---------------------------------------------------------------------------------------------------------


def _embedded_default() -> tuple[Path, Path]:
    """(tiles, small manifest) of the demo's snapshot, built by demo/run.py when absent."""
    complete = (DEMO_TILES / TILES_MANIFEST).is_file() and all(
        (DEMO_MANIFEST.parent / name).is_file() for name in (MANIFEST_FILE, NATURAL_FILE)
    )
    if not complete:
        from demo import run as demo

        log.info("no demo snapshot under %s: building it as `make demo` does", DATA)
        demo.main()
    return DEMO_TILES, DEMO_MANIFEST


def _snapshot(params: Any, base: Path) -> tuple[Path, Path]:
    """(tiles, small manifest) of the mirror `params` describes, built under `base` with the project's own steps:
    tasks.mirror, tasks.download (extraction, checksum), tasks.validate, tasks.tile, tasks.sample."""
    from tasks.download import DownloadParams, download, resolve_request
    from tasks.mirror import build_mirror
    from tasks.sample import SampleParams, sample
    from tasks.tile import TileParams, tile
    from tasks.validate import ValidateParams, validate

    # The archive's name holds only the size and seed: a change of the other mirror params must rebuild it.
    record = base / "mirror_params.json"
    if record.is_file() and json.loads(record.read_text()) != params.model_dump():
        log.info("%s: mirror params changed since it was built; rebuilding", base)
        shutil.rmtree(base)
    base.mkdir(parents=True, exist_ok=True)
    mirror = build_mirror(out=base / "mirror", params=params)
    write_json(record, params.model_dump())
    download_params = load_section("download", DownloadParams)
    url, checksum = resolve_request(url=str(mirror.archive), source=None, sha256=mirror.sha256, params=download_params)
    fetched = download(url=url, dest=base / "raw", checksum=checksum, params=download_params)
    validated = validate(patches=fetched.root, out=base / "validated", params=load_section("validate", ValidateParams))
    if not validated.success:
        raise SystemExit(f"mirror {mirror.archive} failed validation: see {validated.report_path}")
    tiles = tile(
        patches=fetched.root,
        out=base / "tiles",
        params=load_section("tile", TileParams),
        report=validated.report_path,
    )
    drawn = sample(tiles=tiles.out, out=base / "samples", dataset="small", params=load_section("sample", SampleParams))
    return tiles.out, drawn.manifest_path


def _overlap(train_tiles: Path, heldout_tiles: Path) -> dict[str, list[str]]:
    """Held-out patch names also in the training mirror, split by whether their RGB pixels are identical there."""
    names = [
        set(pd.read_parquet(t / INDEX_FILE, columns=["patch_id"])["patch_id"]) for t in (train_tiles, heldout_tiles)
    ]
    shared = sorted(names[0] & names[1])
    pairs = zip(load_patches(train_tiles, shared), load_patches(heldout_tiles, shared), strict=True) if shared else []
    same = [bool(np.array_equal(a, b)) for a, b in pairs]
    return {
        "identical": [p for p, s in zip(shared, same, strict=True) if s],
        "different": [p for p, s in zip(shared, same, strict=True) if not s],
    }


def _filtered(manifest: Path, exclude: set[str], out: Path) -> tuple[Path, dict[str, int]]:
    """Copies of a manifest and its natural set without `exclude`; how many rows each lost."""
    out.mkdir(parents=True, exist_ok=True)
    removed = {}
    for name in (MANIFEST_FILE, NATURAL_FILE):
        frame = pd.read_parquet(manifest.parent / name)
        keep = ~frame["patch_id"].isin(exclude)
        removed[name] = int((~keep).sum())
        frame[keep].to_parquet(out / name, index=False)
    return out / MANIFEST_FILE, removed


# --- training -----------------------------------------------------------------------------------------------------


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _train_cnn(tiles: Path, manifest: Path, retrain: bool, overrides: list[str]) -> str:
    from tasks.lib import tracking
    from tasks.lib.model import ModelParams
    from tasks.lib.training_runs import CostParams
    from tasks.train import TrainParams, train

    params = load_section("train", TrainParams, overrides=overrides)
    model_params = load_section("model", ModelParams, overrides=overrides)
    key = _key(params.model_dump(), model_params.model_dump(), file_digest(manifest, "sha256"), str(tiles))
    checkpoint = WORK / "runs" / f"cnn-{key}"
    if retrain:
        shutil.rmtree(checkpoint, ignore_errors=True)
    result = train(
        manifest=manifest,
        tiles=tiles,
        params=params,
        model_params=model_params,
        cost=load_section("cost", CostParams),
        lineage=tracking.Lineage.from_environment(snapshot="demo"),
        checkpoint_dir=checkpoint,
        register=False,
        run_name=" ".join(["quality-cnn", *overrides]),
    )
    log.info("CNN run %s (%s)", result.run_id, "reused" if result.reused else f"{result.epochs} epochs")
    return result.run_id


def _train_baseline(tiles: Path, manifest: Path, retrain: bool, overrides: list[str]) -> str:
    from mlflow import MlflowClient

    from tasks.baseline import BaselineParams, baseline
    from tasks.lib import tracking
    from tasks.lib.training_runs import CostParams
    from tasks.train import TrainParams

    params = load_section("baseline", BaselineParams, overrides=overrides)
    train_params = load_section("train", TrainParams, overrides=overrides)
    key = _key(params.model_dump(), train_params.max_train_patches, file_digest(manifest, "sha256"), str(tiles))
    record = WORK / "runs" / f"baseline-{key}.json"
    if record.is_file() and not retrain:
        run_id = json.loads(record.read_text())["run_id"]
        if MlflowClient().get_run(run_id).info.status == "FINISHED":
            log.info("baseline run %s reused", run_id)
            return run_id
    result = baseline(
        manifest=manifest,
        tiles=tiles,
        params=params,
        train_params=train_params,
        cost=load_section("cost", CostParams),
        lineage=tracking.Lineage.from_environment(snapshot="demo"),
    )
    write_json(record, {"run_id": result.run_id})
    return result.run_id


# --- evaluation and report ----------------------------------------------------------------------------------------


def _evaluate(run_id: str, manifest: Path, tiles: Path, child: str | None, overrides: list[str]) -> dict[str, float]:
    """tasks.evaluate on one set; logged to the model's run, or to a new child run of it named `child`."""
    from mlflow import MlflowClient

    from tasks.evaluate import EvaluateParams, evaluate
    from tasks.lib.tracking import TAG_KIND, run_model_uri

    log_to = run_id
    client = MlflowClient()
    if child:
        parent = client.get_run(run_id)
        tags = {"mlflow.parentRunId": run_id, TAG_KIND: "evaluation"}
        log_to = client.create_run(parent.info.experiment_id, tags=tags, run_name=child).info.run_id
    result = evaluate(
        model_uri=run_model_uri(run_id),
        manifest=manifest,
        tiles=tiles,
        params=load_section("evaluate", EvaluateParams, overrides=overrides),
        log_to_run=log_to,
    )
    if child:
        client.set_terminated(log_to)
    return result.metrics | {"logged_to": log_to}


def _curves(run_id: str) -> dict[str, list[float]]:
    from mlflow import MlflowClient

    client = MlflowClient()
    curves = {}
    for name in CURVE_METRICS:
        history = sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)
        if history:
            curves[name] = [m.value for m in history]
    return curves


def _fmt(value: float | None) -> str:
    return "   n/a" if value is None or not np.isfinite(value) else f"{value:6.3f}"


def _print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'model':<9}{'data':<26}{'set':<8}{'thr':>7}" + "".join(f"{c:>14}" for c in COLUMNS)
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = "".join(f"{_fmt(r[c]):>14}" for c in COLUMNS)
        print(f"{r['model']:<9}{r['data']:<26}{r['set']:<8}{_fmt(r['threshold']):>7}{cells}")


def _print_curves(name: str, curves: dict[str, list[float]]) -> None:
    names = [n for n in CURVE_METRICS if n in curves]
    print(f"\n{name}: per-epoch curves")
    print(f"{'epoch':>5}" + "".join(f"{n:>15}" for n in names))
    for epoch in range(max(len(curves[n]) for n in names)):
        values = [curves[n][epoch] if epoch < len(curves[n]) else None for n in names]
        print(f"{epoch:>5}" + "".join(f"{'' if v is None else f'{v:.4g}':>15}" for v in values))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heldout-seed", type=int, default=8, help="mirror seed of the held-out data (training: params)")
    p.add_argument("--retrain", action="store_true", help="train again even when a finished run can be reused")
    cli.add_overrides(
        p,
        f"override a param of the {', '.join(TUNABLE)} sections for this measurement (repeatable); with a mirror "
        "override both mirrors (training and held-out) are built here instead of using the demo's snapshot",
    )
    args = p.parse_args()
    wrong = [o for o in args.overrides if o.partition(".")[0] not in TUNABLE]
    if wrong:
        p.error(f"--set {wrong[0]}: only the {', '.join(TUNABLE)} sections can be overridden here")
    configure_logging(verbose=False)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    started = time.monotonic()
    WORK.mkdir(parents=True, exist_ok=True)
    # A store of its own (before anything imports mlflow); MLflow puts run artifacts under ./mlruns of the working
    # directory, so work from WORK. Every path below is absolute.
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{TRACKING_DB}"
    if not TRACKING_DB.exists():
        shutil.rmtree(WORK / "runs", ignore_errors=True)  # reuse records point into the store
    os.chdir(WORK)

    from tasks.mirror import MirrorParams

    mirror_overrides = [o for o in args.overrides if o.startswith("mirror.")]
    train_mirror = load_section("mirror", MirrorParams, overrides=mirror_overrides)
    if train_mirror.seed == args.heldout_seed:
        p.error(f"--heldout-seed {args.heldout_seed} is the training mirror's seed: the held-out data must be unseen")
    heldout_mirror = train_mirror.model_copy(update={"seed": args.heldout_seed})
    if mirror_overrides:  # a trial of other mirror params: both mirrors built here, keyed by those params
        variant = f"-{_key(mirror_overrides)}"
        train_tiles, train_manifest = _snapshot(train_mirror, WORK / f"train-{train_mirror.seed}{variant}")
    else:
        variant = ""
        train_tiles, train_manifest = _embedded_default()
    heldout_base = WORK / f"heldout-{args.heldout_seed}{variant}"
    heldout_tiles, heldout_manifest = _snapshot(heldout_mirror, heldout_base)
    data_seconds = time.monotonic() - started
    overlap = _overlap(train_tiles, heldout_tiles)
    heldout_eval, removed = _filtered(heldout_manifest, set(overlap["identical"]), heldout_base / "evaluated-set")
    log.info(
        "held-out names in the training mirror: %d with identical pixels (excluded: %s), %d with different pixels",
        len(overlap["identical"]),
        removed,
        len(overlap["different"]),
    )

    timer = time.monotonic()
    runs = {"cnn": _train_cnn(train_tiles, train_manifest, args.retrain, args.overrides)}
    cnn_seconds = time.monotonic() - timer
    timer = time.monotonic()
    runs["baseline"] = _train_baseline(train_tiles, train_manifest, args.retrain, args.overrides)
    baseline_seconds = time.monotonic() - timer

    timer = time.monotonic()
    heldout = f"held-out (seed {args.heldout_seed})"
    sets = {
        f"training mirror (seed {train_mirror.seed})": (train_manifest, train_tiles, None),
        heldout: (heldout_eval, heldout_tiles, f"heldout-seed{args.heldout_seed}"),
    }
    evaluations = {
        (model, data): _evaluate(run_id, manifest, tiles, child, args.overrides)
        for model, run_id in runs.items()
        for data, (manifest, tiles, child) in sets.items()
    }
    eval_seconds = time.monotonic() - timer

    from mlflow import MlflowClient

    rows = [
        {"model": model, "data": data, "set": split, "threshold": m["operating_threshold"]}
        | {c: m[f"{split}_{metric}"] for c, metric in COLUMNS.items()}
        | {"patches": m[f"{split}_patches"], "positives": m[f"{split}_positives"]}
        for (model, data), m in evaluations.items()
        for split in ("test", "natural")
    ]
    train_runs = {}
    for model, run_id in runs.items():
        run = MlflowClient().get_run(run_id)
        train_runs[model] = {
            "run_id": run_id,
            "epochs_run": run.data.metrics.get("epochs_run"),
            "best_epoch": run.data.metrics.get("best_epoch"),
            "train_seconds": run.data.metrics.get("train_seconds"),
            "curves": _curves(run_id),
        }
    cnn, base = evaluations[("cnn", heldout)], evaluations[("baseline", heldout)]
    verdict = {
        "target": TARGET,
        "cnn_heldout_test_op_recall": cnn["test_op_recall"],
        "cnn_heldout_test_op_precision": cnn["test_op_precision"],
        "met": all(cnn[k] >= v for k, v in TARGET.items()),
        "margin_over_baseline": {
            k: cnn[k] - base[k]
            for k in ("test_op_precision", "test_roc_auc", "natural_op_precision", "test_t50_accuracy")
        },
    }

    trial = f" — TRIAL with {' '.join(args.overrides)}" if args.overrides else ""
    print(f"\nmodel quality on the embedded default{trial} — tracking {os.environ['MLFLOW_TRACKING_URI']}")
    print(f"  training data  {train_manifest} (tiles {train_tiles})")
    print(f"  held-out       {heldout_eval} (tiles {heldout_tiles}), mirror seed {args.heldout_seed}")
    print(f"                 names shared with the training mirror: {len(overlap['identical'])} identical pixels "
          f"(excluded: {removed[MANIFEST_FILE]} manifest rows, {removed[NATURAL_FILE]} natural rows), "
          f"{len(overlap['different'])} different pixels (kept)")  # fmt: skip
    print("  op = operating threshold chosen on each data set's own val split for target recall 0.958\n")
    _print_table(rows)
    for model, info in train_runs.items():
        seconds = info["curves"].get("epoch_seconds", [])
        per_epoch = f", {np.median(seconds):.0f} s per epoch (median)" if seconds else ""
        best = "" if info["best_epoch"] is None else f" (weights of epoch {info['best_epoch']:.0f}, counted from 0)"
        print(f"\n{model}: run {info['run_id']}, {info['epochs_run']:.0f} epochs{best}, "
              f"{info['train_seconds']:.0f} s training{per_epoch}")  # fmt: skip
    for model, info in train_runs.items():
        _print_curves(model, info["curves"])
    m = verdict["margin_over_baseline"]
    print(
        f"\ntarget (issue 5): CNN on held-out test recall >= {TARGET['test_op_recall']} with precision >= "
        f"{TARGET['test_op_precision']}, well above the baseline\n"
        f"  CNN held-out test: recall {cnn['test_op_recall']:.3f}, precision {cnn['test_op_precision']:.3f} -> "
        f"{'MET' if verdict['met'] else 'NOT MET'}\n"
        f"  CNN - baseline (held-out): test precision@op {m['test_op_precision']:+.3f}, test ROC-AUC "
        f"{m['test_roc_auc']:+.3f}, natural precision@op {m['natural_op_precision']:+.3f}, test acc@0.5 "
        f"{m['test_t50_accuracy']:+.3f}"
    )
    total = time.monotonic() - started
    print(f"\ntimings of this invocation (reused data and runs cost ~0): data {data_seconds:.0f} s, "
          f"CNN {cnn_seconds:.0f} s, baseline {baseline_seconds:.0f} s, "
          f"evaluation {eval_seconds:.0f} s, total {total:.0f} s")  # fmt: skip
    result_file = RESULT_FILE.with_stem(f"quality-{_key(args.overrides)}") if args.overrides else RESULT_FILE
    write_json(
        result_file,
        {
            "tracking_uri": os.environ["MLFLOW_TRACKING_URI"],
            "overrides": args.overrides,
            "data": {
                "training": {
                    "manifest": str(train_manifest),
                    "tiles": str(train_tiles),
                    "mirror_params": train_mirror.model_dump(),
                },
                "heldout": {
                    "manifest": str(heldout_eval),
                    "tiles": str(heldout_tiles),
                    "mirror_params": heldout_mirror.model_dump(),
                    "shared_names_identical_pixels": overlap["identical"],
                    "shared_names_different_pixels": len(overlap["different"]),
                    "rows_excluded": removed,
                },
            },
            "rows": [
                {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()} for r in rows
            ],
            "runs": train_runs,
            "verdict": verdict,
            "seconds": {
                "data": data_seconds,
                "cnn": cnn_seconds,
                "baseline": baseline_seconds,
                "evaluation": eval_seconds,
                "total": total,
            },
        },
    )
    print(f"written {result_file}")


if __name__ == "__main__":
    main()
