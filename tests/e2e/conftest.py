"""The end-to-end stack: a GCS emulator holding one small mirror per refresh interval, and `airflow standalone`.

One stack per test session (it takes about a minute to start): the scheduler tests and the UI tests share it. The
refresh DAG downloads `gs://cloudscreen/archives/mirror-{snapshot}.tar.gz`, so each backfilled interval gets an
archive of its own (different seeds: different data, different data versions), and pushes its data version to the
DVC remote in the same emulator bucket.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from demo.stack import AirflowStack, airflow_standalone
from tasks.lib.config import REPO_PARAMS, apply_overrides, load_section, read_params_file
from tasks.mirror import MirrorParams, MirrorResult, build_mirror

BUCKET = "cloudscreen"
REFRESH = "cloudscreen_refresh"
TRAINING = "cloudscreen_training"
# The first three intervals of params.yaml's `@weekly` refresh schedule after its start_date (2026-01-01, a
# Thursday): weekly runs trigger at midnight on Sundays, and a run's logical date is its snapshot key.
INTERVALS = ("2026-01-04", "2026-01-11", "2026-01-18")
MIRROR_PATCHES = 160
ARCHIVE = "archives/mirror-{snapshot}.tar.gz"
# A retry is a failure here: nothing should fail in a clean run, and compute tasks wait 5 minutes to retry.
FAILED_STATES = ("failed", "upstream_failed", "up_for_retry")
LOG_LINES = 40  # of each failed task's log, in a failure message
SCHEDULER_LINES = 30
LINE_CHARS = 300


@dataclass(frozen=True)
class E2EStack:
    airflow: AirflowStack
    params: Path  # the params file every task reads (CLOUDSCREEN_PARAMS)
    data_root: Path
    emulator: str  # STORAGE_EMULATOR_HOST
    mirrors: dict[str, MirrorResult]  # snapshot (interval) → the mirror served for it

    def explain(self, dag_id: str, what: str) -> str:
        """A failure message: `what`, then the logs of the DAG's failed tasks and the end of Airflow's output."""
        try:
            logs = self.airflow.task_logs(dag_id, states=FAILED_STATES)
        except Exception as exc:  # the API itself may be what broke
            logs = {"(could not list the failed tasks)": repr(exc)}
        parts = [what]
        for path, text in logs.items():
            parts.append(f"--- task log {path} (last {LOG_LINES} lines) ---\n{readable_log(text, LOG_LINES)}")
        if not logs:
            parts.append("(no failed task logs)")
        parts.append(f"--- the scheduler's last lines (all output: {self.airflow.output}) ---")
        lines = self.airflow.component_output("scheduler", SCHEDULER_LINES).splitlines()
        parts.extend(line[:LINE_CHARS] for line in lines)
        return "\n".join(parts)

    def wait_for(self, dag_id: str, done: Any, what: str, timeout: float, poll: float = 3.0) -> Any:
        """Poll `done()` until it returns a true value (returned); fail with the task logs when a task instance of
        the DAG failed or the timeout passed."""
        deadline = time.monotonic() + timeout
        while True:
            result = done()
            if result:
                return result
            failed = [
                (run["dag_run_id"], ti["task_id"], ti["state"])
                for run in self.airflow.client.dag_runs(dag_id)
                for ti in self.airflow.client.task_instances(dag_id, run["dag_run_id"])
                if ti["state"] in FAILED_STATES
            ]
            if failed:
                pytest.fail(self.explain(dag_id, f"{what}: task instances failed: {failed}"), pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(self.explain(dag_id, f"{what}: not done within {timeout:.0f} s"), pytrace=False)
            time.sleep(poll)


def readable_log(text: str, lines: int) -> str:
    """The last lines of an Airflow 3 task log (JSON lines) as `time level logger: event`, exceptions included."""
    out = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            out.append(line)
            continue
        out.append(f"{entry.get('timestamp', '')[11:19]} {entry.get('level', '')} {entry.get('logger', '')}: "
                   f"{entry.get('event', '')}")  # fmt: skip
        for error in entry.get("error_detail") or []:
            frames = error.get("frames") or [{}]
            where = f"{frames[-1].get('filename')}:{frames[-1].get('lineno')}"
            out.append(f"    {error.get('exc_type')}: {error.get('exc_value')} (at {where})")
    return "\n".join(out[-lines:])


def write_params(path: Path, *, data_root: Path, extra: Iterable[str] = ()) -> Path:
    """The repo's params.yaml, pointed at `data_root` and the emulator's archives, sized for 2 cores; `extra`
    overrides on top."""
    url = f"gs://{BUCKET}/{ARCHIVE}"
    overrides = [
        f"pipeline.data_root={data_root}",
        f"pipeline.source={url}",
        f"pipeline.checksum_url={url}.sha256",
        "pipeline.retries=0",
        "sample.small_per_class=24",
        "tile.workers=1",
        "tile.shard_patches=64",
        "validate.workers=1",
        "train.epochs=1",
        "train.batch_size=16",
        *extra,
    ]
    path.write_text(yaml.safe_dump(apply_overrides(read_params_file(REPO_PARAMS), overrides), sort_keys=False))
    return path


def build_mirrors(out: Path, snapshots: Iterable[str]) -> dict[str, MirrorResult]:
    mirrors = {}
    for seed, snapshot in enumerate(snapshots, start=21):
        params = load_section(
            "mirror", MirrorParams, overrides=[f"mirror.patches={MIRROR_PATCHES}", f"mirror.seed={seed}"]
        )
        mirrors[snapshot] = build_mirror(out=out / snapshot, params=params, workers=1)
    return mirrors


def upload(mirrors: dict[str, MirrorResult], emulator: str) -> None:
    """Each mirror's archive and .sha256 to the bucket, under the name its interval downloads."""
    from tasks.lib.gcs import gcs_client

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", emulator)
        bucket = gcs_client().bucket(BUCKET)
        for snapshot, mirror in mirrors.items():
            name = ARCHIVE.format(snapshot=snapshot)
            bucket.blob(name).upload_from_filename(str(mirror.archive))
            bucket.blob(name + ".sha256").upload_from_filename(str(mirror.archive) + ".sha256")


# The stack lives from the first test that uses it to the teardown of the last one, not to the end of the session:
# the tests collected after these would otherwise share the 2 cores with an idle scheduler, DAG processor and API
# server. `pytest_runtest_teardown` closes it after the last user; the fixture's own teardown is the fallback.
_LIFETIME = contextlib.ExitStack()
_LAST_USER: list[str] = []


@pytest.hookimpl(trylast=True)  # after deselection (-k, -m, --lf)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    users = [item.nodeid for item in items if "e2e_stack" in getattr(item, "fixturenames", ())]
    _LAST_USER[:] = users[-1:]


@pytest.hookimpl(trylast=True)  # after the item's own fixtures (a module's browser, say) are torn down
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if _LAST_USER and item.nodeid == _LAST_USER[0]:
        _LIFETIME.close()


@pytest.fixture(scope="session")
def e2e_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2EStack]:
    """Mirrors in the emulator bucket, a params file, and `airflow standalone` with both DAGs parsed and paused.

    The scheduler creates no runs from the DAGs' own schedules ([scheduler] use_job_schedule = False: the refresh
    DAG's latest weekly interval and the training DAG's Asset schedule would otherwise start runs nobody asked for;
    it also turns off runs started by Asset events, which test_workflow_drift_to_training.py tests on a stack of its
    own); backfills and triggered runs run normally once their DAG is unpaused.
    """
    try:
        yield _LIFETIME.enter_context(start_stack(tmp_path_factory.mktemp("e2e")))
    finally:
        _LIFETIME.close()


@contextlib.contextmanager
def start_stack(
    base: Path, *, snapshots: Iterable[str] = INTERVALS, params: Iterable[str] = (), job_schedule: bool = False
) -> Iterator[E2EStack]:
    """A stack as `e2e_stack` describes, with a mirror for each of `snapshots`, `params` overrides on top of
    write_params' and, with `job_schedule`, a scheduler that also creates runs from schedules and Asset events."""
    from ops.gcs_emulator import local_gcs_emulator
    from tasks.lib.pipeline import PipelineParams

    data_root = base / "data"
    params_file = write_params(base / "params.yaml", data_root=data_root, extra=params)
    pipeline = load_section("pipeline", PipelineParams, params_file)
    mirrors = build_mirrors(base / "mirrors", snapshots)
    work = base / "work"  # every Airflow process's cwd (a SQLite MLflow store writes ./mlruns there)
    work.mkdir()
    with local_gcs_emulator(BUCKET) as emulator:
        upload(mirrors, emulator)
        env = {
            "CLOUDSCREEN_PARAMS": str(params_file),
            "CLOUDSCREEN_DATA_ROOT": str(data_root),
            "STORAGE_EMULATOR_HOST": emulator,
            "MLFLOW_TRACKING_URI": f"sqlite:///{base / 'mlflow.db'}",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": str(job_schedule),
            "AIRFLOW__CORE__PARALLELISM": "4",
        }
        with airflow_standalone(
            base / "airflow",
            env=env,
            cwd=work,
            pools={pipeline.gpu_pool: pipeline.gpu_pool_slots},
            dags=(REFRESH, TRAINING),
        ) as stack:
            yield E2EStack(airflow=stack, params=params_file, data_root=data_root, emulator=emulator, mirrors=mirrors)


def utc_midnight(day: str) -> str:
    """`2026-01-04` → `2026-01-04T00:00:00Z`, as the REST API takes and returns logical dates."""
    return dt.datetime.combine(dt.date.fromisoformat(day), dt.time(), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
