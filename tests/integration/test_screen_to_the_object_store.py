"""Screening as the kubernetes backend's pod runs it, against the GCS emulator: the real `python -m tasks.screen` with
`--restore-data` (the snapshot's data version from the DVC remote in the bucket), `--out gs://...` and `--xcom-out`.
The bucket receives the same bytes a local screening writes, summary.json last; a second run does nothing; and the
DAG's pipeline function fetches the pod's screening into the data root, where the monitoring reads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ops.gcs_emulator import local_gcs_emulator
from tasks.lib.config import load_section
from tasks.lib.errors import PipelineError
from tasks.lib.gcs import gcs_client
from tasks.lib.pipeline import Run, pull_screening, screening_results
from tasks.lib.tracking import CHAMPION, MODEL_ARTIFACT, TAG_OPERATING_THRESHOLD
from tasks.screen import AGREEMENT_FILE, CLEAR_FILE, OUTPUT_FILES, SCORES_FILE, SUMMARY_FILE, read_scores_metadata
from tasks.versioning import VersioningParams, push
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BUCKET = "cloudscreen"
NAME = "cloudscreen-pod-screen-test"
SNAPSHOT = "2026-11-16"
BRIGHTNESS_MODEL = REPO / "tests" / "model" / "brightness_model.py"
THRESHOLD = 0.4


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One emulator bucket (the DVC remote and the screenings) and one SQLite tracking store for the module."""
    root = tmp_path_factory.mktemp("pod_screen")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    with local_gcs_emulator(BUCKET) as emulator, pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", emulator)
        mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        mp.setenv("GIT_PYTHON_REFRESH", "quiet")
        mp.chdir(root)  # the SQLite store keeps artifacts under ./mlruns
        yield {**os.environ, "root": str(root)}


@pytest.fixture(scope="module")
def model(env) -> str:
    """The brightness stand-in, registered with an operating threshold (as the gate tags a champion); its URI."""
    import mlflow

    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=str(BRIGHTNESS_MODEL),
            model_config={"centre": 7.0},
            pip_requirements=["mlflow"],
            registered_model_name=NAME,
        )
    client = mlflow.MlflowClient()
    version = str(info.registered_model_version)
    client.set_model_version_tag(NAME, version, TAG_OPERATING_THRESHOLD, str(THRESHOLD))
    client.set_registered_model_alias(NAME, CHAMPION, version)
    return f"models:/{NAME}/{version}"


@pytest.fixture(scope="module")
def data_version(env, training_data, tmp_path_factory) -> str:
    """The snapshot pushed to the DVC remote in the emulator bucket, as the refresh's version step does."""
    params = load_section("versioning", VersioningParams, overrides=[f"versioning.remote=gs://{BUCKET}/dvc"])
    out = tmp_path_factory.mktemp("version_record")
    return push(snapshot=SNAPSHOT, tiles=training_data.tiles, samples=training_data.samples, out=out,
                params=params).data.version  # fmt: skip


def screen_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tasks.screen", "--params", str(REPO / "params.yaml"), *args]
    command += ["--set", "screen.batch_size=64", "--set", f"versioning.remote=gs://{BUCKET}/dvc"]
    return subprocess.run(command, cwd=env["root"], env=env, capture_output=True, text=True, timeout=600)


def blobs(prefix: str) -> dict[str, object]:
    return {b.name.removeprefix(prefix + "/"): b for b in gcs_client().bucket(BUCKET).list_blobs(prefix=prefix + "/")}


@pytest.fixture(scope="module")
def pod(env, model, data_version, tmp_path_factory):
    """The pod's command, once: its result file, the bucket prefix, its stdout and stderr."""
    scratch = tmp_path_factory.mktemp("pod")
    (scratch / "data").mkdir()  # the pod's emptyDir
    xcom = scratch / "return.json"
    url = f"gs://{BUCKET}/screened/{SNAPSHOT}"
    run = screen_cli(
        env,
        "--snapshot", SNAPSHOT, "--data-version", data_version, "--restore-data", str(scratch / "data"),
        "--tiles", "tiles", "--model", model, "--out", url, "--xcom-out", str(xcom),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-5000:]
    return {"xcom": json.loads(xcom.read_text()), "url": url, "stdout": run.stdout, "stderr": run.stderr}


@pytest.fixture(scope="module")
def local(env, model, data_version, training_data, tmp_path_factory) -> Path:
    """The same snapshot screened on local disk, as the local backend does: OUT/<version>."""
    out = tmp_path_factory.mktemp("local")
    run = screen_cli(
        env, "--snapshot", SNAPSHOT, "--data-version", data_version, "--tiles", str(training_data.tiles),
        "--model", model, "--out", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-5000:]
    return out / json.loads(run.stdout)["model"]["version"]


def test_the_pod_writes_the_local_screenings_bytes_to_the_bucket_summary_last(pod, local, data_version):
    result = pod["xcom"]
    version = result["version"]
    prefix = f"screened/{SNAPSHOT}/{version}"
    assert result["out"] == f"gs://{BUCKET}/{prefix}"
    assert result["snapshot"] == SNAPSHOT and result["data_version"] == data_version and not result["skipped"]
    stored = blobs(prefix)
    assert set(stored) == {*OUTPUT_FILES, SUMMARY_FILE}
    # The commit marker went up after everything it describes (the emulator's generations are upload times in ns).
    uploaded = sorted(stored, key=lambda name: int(stored[name].generation))
    assert uploaded[-1] == SUMMARY_FILE, uploaded
    for name in (SCORES_FILE, CLEAR_FILE, AGREEMENT_FILE):
        assert stored[name].download_as_bytes() == (local / name).read_bytes(), name
    summary = json.loads(stored[SUMMARY_FILE].download_as_bytes())
    assert summary == json.loads(pod["stdout"])
    assert summary["input"] == json.loads((local / SUMMARY_FILE).read_text())["input"]  # one fingerprint, both ways
    assert summary["tiles"].endswith("data/tiles")  # restored from the DVC remote into the pod's emptyDir
    assert result["patches"] == summary["patches"] and result["clear"] == summary["clear"]
    assert result["mlflow_run_id"] == summary["mlflow_run_id"]


def test_a_second_pod_run_finds_the_screening_in_the_bucket_and_does_nothing(pod, env, model, data_version, tmp_path):
    import mlflow

    prefix = pod["url"].removeprefix(f"gs://{BUCKET}/") + "/" + pod["xcom"]["version"]
    before = {name: blob.generation for name, blob in blobs(prefix).items()}
    runs_before = len(mlflow.search_runs(search_all_experiments=True))
    xcom = tmp_path / "return.json"
    again = screen_cli(
        env, "--snapshot", SNAPSHOT, "--data-version", data_version, "--restore-data", str(tmp_path),
        "--tiles", "tiles", "--model", model, "--out", pod["url"], "--xcom-out", str(xcom),
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-5000:]
    assert "not doing it again" in again.stderr
    result = json.loads(xcom.read_text())
    assert result["skipped"] and result["mlflow_run_id"] == pod["xcom"]["mlflow_run_id"]
    assert {name: blob.generation for name, blob in blobs(prefix).items()} == before  # nothing rewritten
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs_before


def test_the_pipeline_fetches_the_pods_screening_into_the_data_root(pod, tmp_path):
    run = Run(snapshot="manual__1", data_root=tmp_path / "data")
    (screened,) = screening_results(run, results=[None, pod["xcom"]])  # the local screen was skipped
    target = tmp_path / "data" / "screened" / SNAPSHOT / pod["xcom"]["version"]
    assert screened == {**pod["xcom"], "out": str(target), "url": pod["xcom"]["out"]}
    prefix = pod["xcom"]["out"].removeprefix(f"gs://{BUCKET}/")
    for name, blob in blobs(prefix).items():
        assert (target / name).read_bytes() == blob.download_as_bytes(), name
    assert read_scores_metadata(target / SCORES_FILE)["snapshot"] == SNAPSHOT
    # Fetched once: the same screening already in the data root is left alone.
    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    assert pull_screening(run, screened=pod["xcom"])["out"] == str(target)
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before
    # A local screening's result passes through untouched.
    local_result = {**pod["xcom"], "out": str(target)}
    assert screening_results(run, results=[local_result, None]) == [local_result]


def test_a_screening_without_its_summary_is_not_complete(pod, env, model, training_data, tmp_path):
    """A pod killed mid-upload leaves files but no summary.json: the DAG refuses to fetch them, and the next run
    screens again and commits."""
    version = pod["xcom"]["version"]
    url = f"gs://{BUCKET}/screened/killed"
    gcs_client().bucket(BUCKET).blob(f"screened/killed/{version}/{SCORES_FILE}").upload_from_string(b"half")
    run = Run(snapshot="manual__1", data_root=tmp_path / "data")
    with pytest.raises(PipelineError, match=rf"{url}/{version}: no summary.json"):
        pull_screening(run, screened={**pod["xcom"], "snapshot": "killed", "out": f"{url}/{version}"})
    assert not (tmp_path / "data" / "screened" / "killed").exists()

    again = screen_cli(env, "--tiles", str(training_data.tiles), "--model", model, "--out", url)
    assert again.returncode == 0, again.stderr[-5000:]
    assert json.loads(again.stdout)["mlflow_run_id"] != pod["xcom"]["mlflow_run_id"]  # screened, not reused
    stored = blobs(f"screened/killed/{version}")
    assert set(stored) == {*OUTPUT_FILES, SUMMARY_FILE}
    assert stored[SCORES_FILE].download_as_bytes() != b"half"
