"""`make up`: the local stack in the foreground until Ctrl-C — GCS emulator, MLflow server and UI, Airflow UI + API.

    python -m demo.up [--airflow-port 8080] [--mlflow-port 5000]

Starts, in this order, and stops in reverse on Ctrl-C or SIGTERM (nothing survives: each server runs in a session
or process group of its own that is terminated as a whole):
- gcp-storage-emulator with the bucket `cloudscreen` persisted under .local/gcs (the DVC remote, MLflow's artifacts);
- the MLflow tracking server (SQLite .local/mlflow.db, artifacts proxied to gs://cloudscreen/mlflow) on :5000;
- `airflow standalone` with AIRFLOW_HOME=.local/airflow, the UI and REST API on :8080, with STORAGE_EMULATOR_HOST and
  MLFLOW_TRACKING_URI pointing its tasks at the two servers above, and the training pool (`pipeline.gpu_pool`).

The first start of a home leaves `cloudscreen_refresh` unpaused (weekly, no catchup: the scheduler runs its latest
interval; older ones are backfilled on purpose), `cloudscreen_screening` unpaused (it screens each new snapshot
and each new champion; before the first champion it skips) and `cloudscreen_training` paused: unpaused, its monthly
schedule would train at once, before any snapshot exists, and it retrains on every refresh at the full params.yaml
settings (long on a CPU). Later starts keep whatever was chosen in the UI. The refresh DAG downloads `pipeline.source`
(the embedded mirror, built here when missing). Prints the UI addresses, the admin password and how to trigger and
backfill.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from pathlib import Path

from demo.stack import AirflowStack, airflow_standalone, interruptible, wait_for_interrupt
from tasks.lib.config import load_section
from tasks.lib.pipeline import PipelineParams
from tasks.versioning import VersioningParams

REPO = Path(__file__).resolve().parent.parent
LOCAL = REPO / ".local"
REFRESH = "cloudscreen_refresh"
TRAINING = "cloudscreen_training"
SCREENING = "cloudscreen_screening"
ROLLBACK = "cloudscreen_rollback"  # manual only: unpaused so that a trigger from the UI runs
# Written into the Airflow home once the first start has set the DAGs' pause states; later starts keep the UI's.
INITIALISED = ".cloudscreen-up"
INITIAL_PAUSED = {REFRESH: False, TRAINING: True, SCREENING: False, ROLLBACK: False}
MLFLOW_ARTIFACTS = "gs://cloudscreen/mlflow"

log = logging.getLogger("demo.up")


def _ensure_source(pipeline: PipelineParams) -> str:
    """The embedded mirror the refresh DAG downloads by default: built when missing (about 30 s), as `make demo`
    does. A URL source is the user's business."""
    from tasks.download import DownloadParams
    from tasks.mirror import MirrorParams, build_mirror

    sources = load_section("download", DownloadParams).sources
    if pipeline.source != "embedded" or "embedded" not in sources:
        return pipeline.source
    url = sources["embedded"].url
    if not (REPO / url).exists():
        log.info("building the embedded mirror %s (the refresh DAG's default source)", url)
        build_mirror(out=(REPO / url).parent, params=load_section("mirror", MirrorParams))
    return url


def _first_start(stack: AirflowStack) -> None:
    marker = stack.home / INITIALISED
    if marker.exists():
        return
    for dag_id, paused in INITIAL_PAUSED.items():
        stack.client.set_paused(dag_id, paused)
    marker.write_text("the DAGs' initial pause states were set by `make up`; later starts keep the UI's choices\n")


def _banner(stack: AirflowStack, mlflow: str, emulator: str, state: Path, source: str, seconds: float) -> str:
    client = stack.client
    states = {d: "paused" if client.dag(d)["is_paused"] else "unpaused" for d in INITIAL_PAUSED}
    api = f"{stack.url}/api/v2"
    token = (
        f"TOKEN=$(curl -s -X POST {stack.url}/auth/token -H 'Content-Type: application/json' "
        f"""-d '{{"username": "{stack.username}", "password": "{stack.password}"}}' """
        """| python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])')"""
    )
    auth = """-H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json'"""
    home, gcs = (p.relative_to(REPO) if p.is_relative_to(REPO) else p for p in (stack.home, state / "gcs"))
    return f"""
cloudscreen stack up in {seconds:.0f} s — Ctrl-C stops everything
  Airflow UI    {stack.url}   user {stack.username}, password {stack.password}
                REST API {api} (docs {stack.url}/docs); home {home}, output {home}/{stack.output.name}
  MLflow UI     {mlflow}
  GCS emulator  {emulator}  bucket cloudscreen, persisted under {gcs}
  DAGs          {REFRESH} {states[REFRESH]}, {TRAINING} {states[TRAINING]} (toggle on each DAG's page)
  source        {source}

  trigger       UI: a DAG's page → Trigger (the form offers the run's params). REST:
                {token}
                curl -X POST {api}/dags/{REFRESH}/dagRuns {auth} -d '{{"logical_date": null}}'
  backfill      UI: {REFRESH}'s page → Trigger → Backfill (a date range; one snapshot per week). REST:
                curl -X POST {api}/backfills {auth} \\
                  -d '{{"dag_id": "{REFRESH}", "from_date": "2026-01-01T00:00:00Z", "to_date": "2026-01-31T00:00:00Z"}}'
"""


def main() -> None:
    from ops.gcs_emulator import local_gcs_emulator
    from ops.tracking_server import mlflow_server
    from tasks.lib.cli import configure_logging

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--airflow-port", type=int, default=8080, help="Airflow UI and REST API")
    p.add_argument("--mlflow-port", type=int, default=5000, help="MLflow UI and tracking API")
    p.add_argument("--host", default="127.0.0.1", help="interface both servers bind (0.0.0.0: every interface)")
    p.add_argument(
        "--state",
        type=Path,
        default=LOCAL,
        metavar="DIR",
        help="where the Airflow home (DIR/airflow), the emulator's bucket (DIR/gcs) and the MLflow store "
        "(DIR/mlflow.db) live",
    )
    args = p.parse_args()
    state = args.state.resolve()
    configure_logging(verbose=False)
    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)  # one line per request otherwise
    interruptible()
    started = time.monotonic()
    pipeline = load_section("pipeline", PipelineParams)
    bucket = load_section("versioning", VersioningParams).remote.removeprefix("gs://").split("/")[0]
    try:
        with contextlib.ExitStack() as stack:
            source = _ensure_source(pipeline)
            (state / "gcs").mkdir(parents=True, exist_ok=True)
            emulator = stack.enter_context(local_gcs_emulator(bucket, data_dir=state / "gcs"))
            mlflow = stack.enter_context(
                mlflow_server(
                    backend_uri=f"sqlite:///{state / 'mlflow.db'}",
                    artifacts_destination=MLFLOW_ARTIFACTS,
                    host=args.host,
                    port=args.mlflow_port,
                    env={"STORAGE_EMULATOR_HOST": emulator},
                )
            )
            airflow = stack.enter_context(
                airflow_standalone(
                    state / "airflow",
                    port=args.airflow_port,
                    host=args.host,
                    env={"STORAGE_EMULATOR_HOST": emulator, "MLFLOW_TRACKING_URI": mlflow},
                    cwd=REPO,  # the embedded source and data root are relative to the checkout
                    pools={pipeline.gpu_pool: pipeline.gpu_pool_slots},
                    dags=tuple(INITIAL_PAUSED),
                )
            )
            _first_start(airflow)
            print(_banner(airflow, mlflow, emulator, state, source, time.monotonic() - started), flush=True)
            wait_for_interrupt()
            log.info("stopping Airflow, MLflow and the GCS emulator")
    except KeyboardInterrupt:
        log.info("interrupted while starting; everything started so far is stopped")


if __name__ == "__main__":
    from tasks.lib import cli

    cli.run(main)
