"""Drift-monitoring benchmark (issue 14): false alarms, detection against magnitude, and cost; one run.

    python -m bench.monitor [--seeds-null 10] [--seeds-shift 5] [--seeds-sweep 3] [--patches 400]
                            [--cost-patches 20000] [--skip-cost | --cost-only]

Every snapshot is a real mirror (tasks.mirror, `mirror.shifts`), extracted and tiled by tasks.tile on one running
Dask cluster, and monitored by tasks.monitor.monitor against one reference (an unshifted mirror of seed 0) with
`model=None`: input and context drift only. `monitor.sample_patches` is set to --patches (both sides are sampled
whole). Each monitoring is an MLflow run in a throwaway SQLite store; this bench's own run there holds the plot.

(a) false alarms: unshifted mirrors of --seeds-null other seeds; the share decided `drift` (target <= 10 %) and the
    columns that raised them.
(b) detection: each shift kind at its default magnitude (docs/steps/mirror.md) over --seeds-shift seeds; the share
    flagged (target: every one), and whether the reasons name the columns the shift moves (offset, gain, haze: band
    features; season: season; region: country; cloud_fraction: cloud) and which columns were flagged most often.
(c) detection rate against magnitude for offset, gain, haze and cloud_fraction over --seeds-sweep seeds; a table,
    and a plot logged to MLflow and saved as .local/bench/monitor/detection.png.
(d) every column's distance is kept, so the false-alarm and detection shares are recomputed at other thresholds
    (what a threshold change would do, measured on the same snapshots).
(e) cost: a mirror of --cost-patches patches tiled by tasks.tile (its own cluster, as the tile step's command line
    does, and on the running cluster), then monitored against the reference; monitoring / tiling (target <= 0.1).
Tiles are cached under .local/bench/monitor/ (keyed by size, seed and shifts); results go to results.jsonl there.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BUILT = REPO / ".local" / "bench" / "monitor"
PARAMS = REPO / "params.yaml"
REFERENCE_SEED = 0
# (kind, the magnitudes swept); each kind's default comes from tasks.mirror.SHIFT_DEFAULTS.
SWEEPS = {
    "offset": ["50", "100", "200", "500", "1000"],
    "gain": ["1.01", "1.03", "1.05", "1.1"],
    "haze": ["0.05", "0.1", "0.2"],
    "cloud_fraction": ["0.35", "0.45", "0.6"],
}
KINDS = ("offset", "gain", "season", "cloud_fraction", "haze", "region")
BANDS = ("B04", "B03", "B02")
NUMERICAL_GRID = (0.06, 0.08, 0.1, 0.15, 0.2, 0.3)
CATEGORICAL_GRID = (0.1, 0.15, 0.2)

log = logging.getLogger("bench.monitor")


def expected(kind: str, column: str) -> bool:
    """Is `column` one a shift of `kind` moves (what its reasons should name)?"""
    if kind in ("offset", "haze"):
        return column.split("_")[0] in BANDS
    if kind == "gain":
        return column.split("_")[0] in BANDS  # the tiles hold only the visible bands, all three gained
    return column == {"season": "season", "region": "country", "cloud_fraction": "cloud"}.get(kind)


def shift_magnitude(kind: str, patches: int) -> str:
    """The shift's default magnitude, except a `region` whose official lists cannot supply a mirror this large: then
    the least common country in the archive that can (Luxembourg holds 137 cloud names, enough for ~450 patches; at
    2,000 patches it is Ireland, 9 % of the archive)."""
    from tasks.lib.config import load_section
    from tasks.mirror import SHIFT_DEFAULTS, MirrorParams, Shift, _name_pools

    default = SHIFT_DEFAULTS[Shift(kind)]
    if kind != Shift.REGION:
        return default
    mirror = load_section("mirror", MirrorParams, PARAMS)
    table, is_cloud, _ = _name_pools()
    clouds = round(mirror.cloud_fraction * patches)
    countries = table["country"].to_numpy()
    share = table["country"].value_counts(normalize=True)
    able = [
        c for c in share.index
        if (is_cloud & (countries == c)).sum() >= clouds and (~is_cloud & (countries == c)).sum() >= patches - clouds
    ]  # fmt: skip
    if default in able:
        return default
    if not able:
        raise SystemExit(f"no country's official lists hold a {patches}-patch mirror ({clouds} cloud patches)")
    return min(able, key=lambda c: share[c])


def build_tiles(patches: int, seed: int, shift: str | None, cluster: str) -> tuple[Path, float]:
    """A tiled mirror (cached): its tiles and the seconds tasks.tile took (0 when cached)."""
    from tasks.lib.config import load_section
    from tasks.lib.tiles import MANIFEST_FILE
    from tasks.mirror import MirrorParams, build_mirror
    from tasks.tile import TileParams, tile

    name = f"{patches}-{seed}" + (f"-{shift.replace('=', '')}" if shift else "")
    tiles = BUILT / "tiles" / name
    if (tiles / MANIFEST_FILE).is_file():
        return tiles, 0.0
    work = Path(tempfile.mkdtemp(prefix=f"m-{name}-", dir=BUILT))
    try:
        overrides = [
            f"mirror.patches={patches}",
            f"mirror.seed={seed}",
            f"mirror.shifts={json.dumps([shift] if shift else [])}",
        ]
        archive = build_mirror(out=work, params=load_section("mirror", MirrorParams, PARAMS, overrides)).archive
        (work / "x").mkdir()
        subprocess.run(["tar", "xzf", str(archive), "-C", str(work / "x")], check=True)
        os.environ["DASK_SCHEDULER_ADDRESS"] = cluster
        started = time.perf_counter()
        tile(patches=next((work / "x").iterdir()), out=tiles, params=load_section("tile", TileParams, PARAMS))
        return tiles, time.perf_counter() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_monitor(tiles: Path, reference: Path, params: Any, out: Path) -> tuple[dict[str, Any], float]:
    from tasks.monitor import monitor

    started = time.perf_counter()
    verdict = monitor(tiles=tiles, reference=reference, out=out, params=params, model=None).verdict
    return verdict, time.perf_counter() - started


def record(verdict: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        **fields,
        "decision": verdict["decision"],
        "drifted": verdict["drifted"],
        "values": {c["column"]: c["value"] for c in verdict["columns"]},
        "kinds": {c["column"]: c["kind"] for c in verdict["columns"]},
        "reasons": verdict["reasons"],
    }


def flagged(row: dict[str, Any], numerical: float, categorical: float) -> list[str]:
    """The columns drifted at these thresholds (distances: at or above)."""
    return [c for c, v in row["values"].items() if v >= (numerical if row["kinds"][c] == "numerical" else categorical)]


def _share(rows: list[dict[str, Any]], numerical: float, categorical: float) -> float:
    return sum(bool(flagged(r, numerical, categorical)) for r in rows) / len(rows) if rows else float("nan")


def _top(rows: list[dict[str, Any]], k: int = 4) -> str:
    counts = Counter(c for r in rows for c in r["drifted"])
    return ", ".join(f"{c} {n}/{len(rows)}" for c, n in counts.most_common(k)) or "-"


def detection_figure(sweep: dict[str, list[tuple[float, float]]]) -> Any:
    from tasks.lib.plots import _figure

    fig = _figure(3.4 * len(sweep), 3.0)
    axes = fig.subplots(1, len(sweep), squeeze=False)[0]
    for ax, (kind, points) in zip(axes, sweep.items(), strict=True):
        ax.plot([m for m, _ in points], [r for _, r in points], marker="o")
        ax.set_xscale("log" if kind == "offset" else "linear")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel(f"{kind} magnitude")
        ax.set_ylabel("detection rate")
        ax.set_title(kind, fontsize=9)
        ax.grid(alpha=0.3)
    return fig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds-null", type=int, default=10, help="unshifted seeds for the false-alarm share")
    p.add_argument("--seeds-shift", type=int, default=5, help="seeds per shift kind at its default magnitude")
    p.add_argument("--seeds-sweep", type=int, default=3, help="seeds per magnitude of the sweeps")
    p.add_argument("--patches", type=int, default=400, help="synthesized patches per mirror")
    p.add_argument("--cost-patches", type=int, default=20_000, help="patches of the cost snapshot")
    p.add_argument("--skip-cost", action="store_true", help="skip (e)")
    p.add_argument("--cost-only", action="store_true", help="only (e)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="shift kinds of (b) and (c)")
    p.add_argument("--report-only", action="store_true", help="print (a)-(d) from results.jsonl, build nothing")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for noisy in ("distributed", "evidently", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    BUILT.mkdir(parents=True, exist_ok=True)
    store = Path(tempfile.mkdtemp(prefix="bench-monitor-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"  # before mlflow is imported
    os.chdir(store)  # the SQLite store keeps artifacts under ./mlruns
    from distributed import LocalCluster

    from tasks.lib.config import load_section
    from tasks.mirror import SHIFT_DEFAULTS, Shift
    from tasks.monitor import MonitorParams
    from tasks.tile import TileParams

    params = load_section("monitor", MonitorParams, PARAMS, [f"monitor.sample_patches={args.patches}"])
    results = BUILT / "results.jsonl"
    rows: list[dict[str, Any]] = []
    if args.report_only:
        report(*_grouped(results, args.patches, args.kinds), params, store, print)
        return

    def say(text: str) -> None:
        print(text, flush=True)

    say(
        f"drift-monitoring benchmark: mirrors of {args.patches} patches (+ the real ones), reference seed "
        f"{REFERENCE_SEED}; thresholds numerical {params.numerical.method} {params.numerical.threshold:g}, "
        f"categorical {params.categorical.method} {params.categorical.threshold:g}, sample {params.sample_patches}; "
        f"{os.cpu_count()} cores, 1-min load {os.getloadavg()[0]:.1f}"
    )
    workers = load_section("tile", TileParams, PARAMS).workers
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        if args.cost_only:
            say(f"(e) cost at {args.cost_patches} patches")
            cost(args.cost_patches, address, say)
            return
        started = time.perf_counter()
        reference, _ = build_tiles(args.patches, REFERENCE_SEED, None, address)
        say(f"  reference ready ({time.perf_counter() - started:.0f} s)")

        def measure(part: str, kind: str, magnitude: str, seed: int) -> dict[str, Any]:
            t0 = time.perf_counter()
            shift = f"{kind}={magnitude}" if kind != "none" else None
            tiles, _ = build_tiles(args.patches, seed, shift, address)
            built = time.perf_counter() - t0
            verdict, seconds = run_monitor(tiles, reference, params, store / "out" / f"{part}-{tiles.name}")
            row = record(
                verdict, part=part, kind=kind, magnitude=magnitude, seed=seed, patches=args.patches,
                monitor_seconds=seconds,
            )  # fmt: skip
            rows.append(row)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            say(
                f"  [{part}] {kind}={magnitude} seed {seed}: {row['decision']:5s} "
                f"drifted {', '.join(row['drifted'][:5]) or '-'}{' ...' if len(row['drifted']) > 5 else ''} "
                f"(build+tile {built:.0f} s, monitor {seconds:.1f} s)"
            )
            return row

        null = [measure("null", "none", "-", seed) for seed in range(1, args.seeds_null + 1)]
        seeds = range(1, args.seeds_shift + 1)
        shifted = {
            kind: [measure("shift", kind, shift_magnitude(kind, args.patches), seed) for seed in seeds]
            for kind in args.kinds
        }
        sweep_rows: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for kind, magnitudes in ((k, m) for k, m in SWEEPS.items() if k in args.kinds and args.seeds_sweep):
            sweep_rows[kind] = {}
            for magnitude in magnitudes:
                if magnitude == SHIFT_DEFAULTS[Shift(kind)]:
                    sweep_rows[kind][magnitude] = shifted[kind][: args.seeds_sweep]
                else:
                    sweep_rows[kind][magnitude] = [
                        measure("sweep", kind, magnitude, seed) for seed in range(1, args.seeds_sweep + 1)
                    ]

        report(null, shifted, sweep_rows, params, store, say)

        if not args.skip_cost:
            say("")
            say(f"(e) cost at {args.cost_patches} patches")
            cost(args.cost_patches, address, say)
    print(f"results: {results}", flush=True)


def _grouped(results: Path, patches: int, kinds: list[str]) -> tuple[list, dict, dict]:
    """results.jsonl's rows of mirrors of `patches` patches as (null, shifted by kind, sweep by kind and magnitude),
    the defaults in the sweeps."""
    from tasks.mirror import SHIFT_DEFAULTS, Shift

    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("patches", 400) == patches]  # the first rows were all of 400
    # A snapshot measured again (a later run over the cached tiles) counts once: its latest row.
    rows = list({(r["part"], r["kind"], r["magnitude"], r["seed"]): r for r in rows}.values())
    null = [r for r in rows if r["part"] == "null"]
    shifted = {k: [r for r in rows if r["part"] == "shift" and r["kind"] == k] for k in kinds}
    shifted = {k: v for k, v in shifted.items() if v}
    sweep_rows: dict[str, dict[str, list]] = {}
    for kind, magnitudes in ((k, m) for k, m in SWEEPS.items() if k in kinds):
        for magnitude in magnitudes:
            part = "shift" if magnitude == SHIFT_DEFAULTS[Shift(kind)] else "sweep"
            found = [r for r in rows if r["part"] == part and r["kind"] == kind and r["magnitude"] == magnitude]
            if found:
                sweep_rows.setdefault(kind, {})[magnitude] = found
    return null, shifted, sweep_rows


def report(null: list, shifted: dict, sweep_rows: dict, params: Any, store: Path, say: Any) -> None:
    """Print (a)-(d) and log the detection plot to the MLflow store."""
    seeds_shift = max((len(r) for r in shifted.values()), default=0)
    seeds_sweep = max((len(r) for m in sweep_rows.values() for r in m.values()), default=0)
    n_t, c_t = params.numerical.threshold, params.categorical.threshold
    say("")
    say(f"(a) false alarms: {len(null)} unshifted seeds against the reference")
    say(f"  share decided drift   {_share(null, n_t, c_t):6.0%}   target <= 10 %")
    say(f"  columns that raised them: {_top(null)}")
    largest = {c: max(r["values"][c] for r in null) for c in null[0]["values"]} if null else {}
    worst = sorted(largest.items(), key=lambda kv: kv[1] / (n_t if null[0]["kinds"][kv[0]] == "numerical" else c_t))
    say("  largest distance on unshifted seeds: " + ", ".join(f"{c} {v:.3f}" for c, v in reversed(worst[-6:])))

    say("")
    say(f"(b) detection at the default magnitude, {seeds_shift} seeds each")
    say(f"  {'kind':15s} {'magnitude':>10s} {'flagged':>8s} {'reasons name it':>16s}  most often flagged")
    for kind, kind_rows in shifted.items():
        named = sum(any(expected(kind, c) for c in r["drifted"]) for r in kind_rows)
        say(
            f"  {kind:15s} {'/'.join(sorted({r['magnitude'] for r in kind_rows})):>10s} "
            f"{sum(r['decision'] == 'drift' for r in kind_rows):>4d}/{len(kind_rows):<3d} "
            f"{named:>12d}/{len(kind_rows):<3d}  {_top(kind_rows)}"
        )
    say("  target: every seed flagged, with the affected columns named")

    say("")
    say(f"(c) detection rate against magnitude ({seeds_sweep} seeds per magnitude, at most)")
    curve: dict[str, list[tuple[float, float]]] = {}
    for kind, by_magnitude in sweep_rows.items():
        cells = []
        curve[kind] = []
        for magnitude, mrows in by_magnitude.items():
            rate = sum(r["decision"] == "drift" for r in mrows) / len(mrows)
            named = sum(any(expected(kind, c) for c in r["drifted"]) for r in mrows)
            top = max(
                (max((v for c, v in r["values"].items() if expected(kind, c)), default=0.0) for r in mrows),
                default=0.0,
            )
            cells.append(f"{magnitude}: {rate:.0%} (named {named}/{len(mrows)}, max {top:.2f})")
            curve[kind].append((float(magnitude), rate))
        say(f"  {kind:15s} " + " | ".join(cells))

    say("")
    say("(d) the same snapshots at other thresholds: false-alarm share / seeds of every default shift flagged")
    say(f"  {'numerical':>9s} {'categorical':>11s} {'false alarms':>13s}  detection by kind")
    for num in NUMERICAL_GRID:
        for cat in CATEGORICAL_GRID:
            detection = " ".join(
                f"{k}:{sum(bool(flagged(r, num, cat)) for r in rs)}/{len(rs)}" for k, rs in shifted.items()
            )
            mark = "  <- params.yaml" if (num, cat) == (n_t, c_t) else ""
            say(f"  {num:9.2f} {cat:11.2f} {_share(null, num, cat):13.0%}  {detection}{mark}")

    import mlflow

    from tasks.lib import plots

    fig = detection_figure(curve) if curve else None  # no sweep measured: no curve to draw
    if fig is not None:
        plots.save(fig, BUILT / "detection.png")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    experiment = mlflow.MlflowClient().create_experiment("cloudscreen-bench-monitor")
    with mlflow.start_run(experiment_id=experiment, run_name="bench.monitor") as run:
        if fig is not None:
            mlflow.log_figure(fig, "detection_rate.png")
        mlflow.log_metric("false_alarm_share", _share(null, n_t, c_t))
        for kind, points in curve.items():
            for magnitude, rate in points:
                mlflow.log_metric(f"detection_{kind}_{magnitude:g}", rate)
    say(f"  plot: {BUILT / 'detection.png'}; MLflow run {run.info.run_id} in {store}/mlflow.db")


def cost(patches: int, address: str, say: Any) -> None:
    from tasks.lib.config import load_section
    from tasks.mirror import MirrorParams, build_mirror
    from tasks.monitor import MonitorParams
    from tasks.tile import TileParams, tile

    params = load_section("monitor", MonitorParams, PARAMS)  # the production sample size
    tile_params = load_section("tile", TileParams, PARAMS)
    mirror_params = load_section("mirror", MirrorParams, PARAMS, [f"mirror.patches={patches}", "mirror.seed=3"])
    archive = build_mirror(out=BUILT / "cost", params=mirror_params).archive
    root_parent = BUILT / "cost" / f"x{patches}"
    if not root_parent.is_dir():
        root_parent.mkdir()
        subprocess.run(["tar", "xzf", str(archive), "-C", str(root_parent)], check=True)
    root = next(root_parent.iterdir())
    n = sum(1 for _ in root.iterdir())
    os.environ.pop("DASK_SCHEDULER_ADDRESS", None)
    cold_out, warm_out = BUILT / "cost" / "tiles-cold", BUILT / "cost" / "tiles-warm"
    for out in (cold_out, warm_out):
        shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    tile(patches=root, out=cold_out, params=tile_params)  # its own LocalCluster, as `python -m tasks.tile`
    cold = time.perf_counter() - started
    os.environ["DASK_SCHEDULER_ADDRESS"] = address
    started = time.perf_counter()
    tile(patches=root, out=warm_out, params=tile_params)  # on the running cluster, as the pipeline tiles
    warm = time.perf_counter() - started
    times, rendered = [], []
    always = params.model_copy(update={"report": "always"})
    for i in range(2):  # against the same patches tiled again: a reference as large as the sample, as in production
        _, seconds = run_monitor(cold_out, warm_out, params, BUILT / "cost" / f"monitor-{i}-{time.time_ns()}")
        times.append(seconds)
        _, seconds = run_monitor(cold_out, warm_out, always, BUILT / "cost" / f"report-{i}-{time.time_ns()}")
        rendered.append(seconds)
    mon, with_report = min(times), min(rendered)
    say(f"  tasks.tile, own cluster (the step's command line)   {cold:7.1f} s  ({n / cold:.0f} patches/s)")
    say(f"  tasks.tile, on a running cluster                      {warm:7.1f} s  ({n / warm:.0f} patches/s)")
    say(f"  tasks.monitor, sample {params.sample_patches}, no model, verdict ok (best of 2: "
        f"{', '.join(f'{t:.1f}' for t in times)})  {mon:7.1f} s")  # fmt: skip
    say(f"  the same with Evidently's HTML report (as on drift or decay; best of 2: "
        f"{', '.join(f'{t:.1f}' for t in rendered)})  {with_report:7.1f} s")  # fmt: skip
    say(f"  monitor with report / tile (own cluster)  {with_report / cold:6.2f}")
    say(f"  monitor / tile (own cluster)      {mon / cold:6.2f}   target <= 0.1")
    say(f"  monitor / tile (running cluster)  {mon / warm:6.2f}")


if __name__ == "__main__":
    sys.exit(main())
