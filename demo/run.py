"""`make demo`: the whole pipeline on the embedded default data, through the real DAGs, on this machine.

Builds the BigEarthNet-format mirror described by params.yaml (`mirror`) and serves it over HTTP on a random loopback
port the way the official archive is served; starts the GCS emulator (bucket `cloudscreen`, persisted under .local/gcs:
the DVC remote and MLflow's artifact store) and the real MLflow tracking server (SQLite .local/mlflow.db); then runs the
`cloudscreen_refresh` DAG (the archive streamed into validated patches and tiles → sample → version; with `--ingest
extract`, download → validate → tile) for the snapshot `demo`, the `cloudscreen_training` DAG (train on the local
backend → evaluate → gate) and, once there is a champion, the
`cloudscreen_screening` DAG (every patch of `demo` scored, the clear list written) with `dag.test()` against a local
Airflow home (.local/airflow), and prints where everything went. While it runs the terminal shows one line per step and
per DAG task (demo.live); the DAG runs' full output (Airflow's task logs, the trainer's log) and this process's own log
go to files under .local/demo-logs/, whose paths are printed. Re-running is cheap for the data: every refresh step finds
its output for `demo` complete and skips; each training DAG run trains a new challenger, which the gate judges against
the champion.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from demo import airflow_local, live
from ops.gcs_emulator import local_gcs_emulator
from ops.tracking_server import mlflow_server
from tasks.lib.config import load_section
from tasks.lib.model import NARROW_STRIDED_CNN
from tasks.lib.pipeline import INGEST_PATHS
from tasks.mirror import MirrorParams, build_mirror
from tasks.versioning import VersioningParams

REPO = Path(__file__).resolve().parent.parent
LOCAL = REPO / ".local"
SNAPSHOT = "demo"
LOGS = "demo-logs"  # under the local directory: the DAG runs' full output and the demo's own log
TARGET_SECONDS = 600  # `make demo` from a fresh clone, on any machine of this kind
# A real run uses the params.yaml defaults (the seed CNN, up to 50 epochs with early stopping: 9-11 minutes on a fast
# CPU of this kind). The demo must end within 10 minutes on any machine of this kind, where the seed CNN trains at
# ~150 images/s on one and ~25 on another, so it trains a lighter network for a budget: the seed CNN on 2x2 block
# means, with a stride-2 first convolution of 16 filters (a seventeenth of the seed CNN's CPU per training image), on
# a cosine schedule that anneals by the last epoch the 5 minutes allow at the pace so far (30 at most, about a
# minute on the fast machine). Measured in docs/model-quality.md: at 30 epochs 3 of 3 training seeds pass the gate's
# floors, at 20 1 of 3. With the whole demo held to half this machine and the trainer to a sixth (bench.orchestration
# --cpus 1 --trainer-cpus 0.33) it reached its 30 epochs and a champion in 8.8-9.3 minutes (three runs); with 32 filters
# (session 12's network) 25-27 epochs, a champion in three runs of four and one rejected (precision 0.849, floor 0.85).
DEMO_TRAINING = [
    "train.budget_minutes=5",
    "train.epochs=30",
    "train.schedule=cosine",
    "train.learning_rate=0.002",
    "train.warmup_epochs=1",
    NARROW_STRIDED_CNN,
    "model.input_pooling=2",
]
# The refresh streams the archive (tasks.ingest: checksum, validation, Data Docs and tiles in one pass, nothing
# extracted): on a slow machine writing 52,000 band files and reading them back cost ~20 s of the 10 minutes
# (docs/model-quality.md). `python -m demo.run --ingest extract` runs download → validate → tile one by one, the
# refresh DAG's scheduled default, and keeps the extracted patches to look at.
DEMO_INGEST = "stream"
# The summary's run link points at the MLflow UI `make up` serves on the same store.
MLFLOW_UI = "http://127.0.0.1:5000"

log = logging.getLogger("demo")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        log.debug("http: " + format, *args)


def _serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@dataclass(frozen=True)
class DemoOutcome:
    refresh: airflow_local.DagRunOutcome
    training: airflow_local.DagRunOutcome
    screening: airflow_local.DagRunOutcome | None  # None: there is no champion to screen with
    seconds: float  # the whole demo: mirror, servers, the DAG runs
    dag_seconds: float  # the DAG runs, start to end

    @property
    def task_seconds(self) -> float:
        runs = [self.refresh, self.training, *([self.screening] if self.screening else [])]
        return sum(sum(run.task_seconds.values()) for run in runs)

    @property
    def overhead(self) -> float:
        """DAG wall time over the time the tasks themselves took: what orchestration costs."""
        return self.dag_seconds / self.task_seconds


def run_demo(
    local: Path = LOCAL,
    training: list[str] = DEMO_TRAINING,
    console: live.Console | None = None,
    ingest: str = DEMO_INGEST,
) -> DemoOutcome:
    """Mirror → served → refresh DAG → training DAG, with every service the DAGs need; the two DAG runs' outcomes."""
    started = time.monotonic()
    console = console or live.Console()
    logs = local / LOGS
    with console.step("Airflow metadata database"):
        airflow_local.configure(local / "airflow")
    os.environ["CLOUDSCREEN_DATA_ROOT"] = str(local / "data")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow's usage telemetry: mlflow/README.md
    with console.step("BigEarthNet-format mirror"):
        mirror = build_mirror(out=local / "data" / "mirror", params=load_section("mirror", MirrorParams))
    bucket = load_section("versioning", VersioningParams).remote.removeprefix("gs://").split("/")[0]
    server, base = _serve(mirror.archive.parent)
    try:
        with _services(console, local, bucket) as (emulator, tracking_uri):
            os.environ["STORAGE_EMULATOR_HOST"] = emulator
            os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
            dags_started = time.monotonic()
            refresh = live.run_dag(
                console,
                "cloudscreen_refresh",
                home=local / "airflow",
                logs=logs,
                conf={
                    "snapshot": SNAPSHOT,
                    "source": f"{base}/{mirror.archive.name}",
                    "checksum_url": f"{base}/{mirror.archive.name}.sha256",
                    "ingest": ingest,
                },
            )
            _check(refresh, logs)
            trained = live.run_dag(
                console,
                "cloudscreen_training",
                home=local / "airflow",
                logs=logs,
                conf={
                    "snapshot": SNAPSHOT,
                    "backend": "local",
                    "overrides": [*training, f"pipeline.mlflow_ui_url={MLFLOW_UI}"],
                },
            )
            _check(trained, logs)
            screening = None
            if _has_champion():
                screening = live.run_dag(
                    console, "cloudscreen_screening", home=local / "airflow", logs=logs, conf={"snapshot": SNAPSHOT}
                )
                _check(screening, logs)
            else:
                console.print("cloudscreen_screening: not run, there is no champion yet (the gate promoted nothing)")
            dag_seconds = time.monotonic() - dags_started
    finally:
        server.shutdown()
    return DemoOutcome(refresh, trained, screening, time.monotonic() - started, dag_seconds)


def _has_champion() -> bool:
    from tasks.lib.errors import ModelVersionError
    from tasks.lib.scoring import DEFAULT_MODEL, resolve_version

    try:
        resolve_version(DEFAULT_MODEL)
    except ModelVersionError:
        return False
    return True


@contextlib.contextmanager
def _services(console: live.Console, local: Path, bucket: str) -> Iterator[tuple[str, str]]:
    """The GCS emulator (bucket persisted under local/gcs) and the MLflow server: (emulator URL, tracking URI)."""
    with contextlib.ExitStack() as stack:
        with console.step("GCS emulator, MLflow server"):
            emulator = stack.enter_context(local_gcs_emulator(bucket, data_dir=local / "gcs"))
            tracking_uri = stack.enter_context(
                mlflow_server(
                    backend_uri=f"sqlite:///{local / 'mlflow.db'}",
                    artifacts_destination=f"gs://{bucket}/mlflow",
                    env={"STORAGE_EMULATOR_HOST": emulator},
                )
            )
        yield emulator, tracking_uri


def _check(outcome: airflow_local.DagRunOutcome, logs: Path) -> None:
    if outcome.state != "success":
        failed = [task for task, state in outcome.task_states.items() if state not in ("success", "skipped")]
        raise SystemExit(
            f"{outcome.dag_id} run {outcome.run_id} {outcome.state}: tasks {failed} "
            f"(see {_short(str(logs / outcome.dag_id))}.log)"
        )


def _short(path: str) -> str:
    """A path relative to the working directory when it lies below it (the summary fits a terminal)."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def _fetched(fetched: dict | None) -> str:
    if fetched is None:
        return "streamed    into validated/ and tiles/ (pipeline.ingest: stream), nothing extracted"
    return f"downloaded  {_short(fetched['patches'])}{'  (already there)' if fetched['skipped'] else ''}"


def describe(outcome: DemoOutcome) -> str:
    results = outcome.refresh.results
    # pipeline.ingest: extract (download → validate → tile) or stream (ingest: validated and tiled, nothing extracted)
    fetched = results.get("download")
    validated = results.get("validate") or results["ingest"]
    tiled = results["tiles"]
    sampled = outcome.refresh.results["sample"]
    record = outcome.refresh.results["version"]
    summary = outcome.training.results["summary"]
    sets = "\n".join(
        f"  {name:<11} {s['patches']} patches; natural set {s['natural_patches']} at prevalence "
        f"{s['natural_prevalence']:.4f}\n              {_short(s['manifest'])}"
        for name, s in sampled["sets"].items()
    )
    training = "\n".join(f"  {line}" for line in summary["text"].splitlines())
    timing = f"{outcome.seconds:.0f} s (DAG runs {outcome.dag_seconds:.0f} s, their tasks {outcome.task_seconds:.0f} s)"
    return f"""
cloudscreen demo — {timing}
  refresh     cloudscreen_refresh run {outcome.refresh.run_id}: {outcome.refresh.state}, snapshot {record["snapshot"]!r}
  served at   {validated.get("url") or fetched["url"]}
  {_fetched(fetched)}
  validated   {validated["checked"]} checked, {validated["valid"]} valid, {validated["quarantined"]} quarantined
  Data Docs   file://{validated["data_docs"]}
  tiles       {_short(tiled["tiles"])}  ({tiled["patches"]} patches in {tiled["shards"]} shards)
{sets}
  data version {record["data_version"]}  (in {record["remote"]}, on the local GCS emulator)
              restore: python -m tasks.versioning restore --version {record["data_version"]} --dest DIR
  training    cloudscreen_training run {outcome.training.run_id}: {outcome.training.state}
{training}
{_screening(outcome.screening)}
  look        make up  → Airflow UI http://127.0.0.1:8080 (both DAGs, this run's tasks and logs)
                         MLflow UI  http://127.0.0.1:5000 (runs, plots, registry)
"""


def _screening(outcome: airflow_local.DagRunOutcome | None) -> str:
    if outcome is None:
        return "  screening   not run: no champion yet"
    lines = "\n".join(f"  {line}" for line in outcome.results["summary"]["text"].splitlines())
    return f"  screening   cloudscreen_screening run {outcome.run_id}: {outcome.state}\n{lines}"


def configure_file_logging(path: Path) -> None:
    """This process's log (mirror build, servers) into `path`, not onto the terminal the person reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", filename=path, filemode="w"
    )
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # misses are expected (MLflow, DVC probe)


def wall_time(seconds: float) -> str:
    """The demo's wall time against its target, for the last line of `make demo` and bench.orchestration."""
    verdict = "met" if seconds < TARGET_SECONDS else "MISSED"
    minutes = TARGET_SECONDS // 60
    return f"demo wall time {seconds / 60:.1f} min ({seconds:.0f} s); target under {minutes} min: {verdict}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--ingest",
        choices=INGEST_PATHS,
        default=DEMO_INGEST,
        help="the refresh's path from archive to tiles: stream (one pass, the demo's) or extract (download → "
        "validate → tile, the extracted patches kept)",
    )
    args = p.parse_args()
    demo_log = LOCAL / LOGS / "demo.log"
    configure_file_logging(demo_log)
    console = live.Console()
    console.print(f"cloudscreen demo: full logs in {_short(str(LOCAL / LOGS))}/ (this process: {demo_log.name})")
    outcome = run_demo(console=console, ingest=args.ingest)
    print(describe(outcome))
    # From this process's start: its imports too, which run_demo's own clock misses.
    print(wall_time(time.time() - psutil.Process().create_time()), flush=True)


if __name__ == "__main__":
    main()
