"""tasks.screen on a tiled mirror snapshot, with registered versions of the brightness stand-in in a real tracking
store: every patch scored at the version's own threshold, the clear list, agreement with the official cloud list,
idempotency, a new champion's output beside the old one, refusals, the MLflow run and the Dask path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.lib.config import load_section
from tasks.lib.errors import ModelVersionError, ScreeningError
from tasks.lib.metrics import binary_metrics
from tasks.lib.tiles import INDEX_FILE, METADATA_FILE, load_patches
from tasks.lib.tracking import CHAMPION, MODEL_ARTIFACT, TAG_KIND, TAG_OPERATING_THRESHOLD, TAG_SNAPSHOT, Lineage
from tasks.screen import (
    AGREEMENT_FILE,
    CLEAR_FILE,
    SCORES_FILE,
    ScreenParams,
    read_scores_metadata,
    screen,
)

BRIGHTNESS_MODEL = Path(__file__).with_name("brightness_model.py")
NAME = "cloudscreen-screen-test"
CHAMPION_URI = f"models:/{NAME}@{CHAMPION}"
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def register(config: dict, threshold: float | None) -> str:
    """Log the brightness stand-in, register it, tag its threshold (as the gate does when it promotes); its version."""
    import mlflow

    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=str(BRIGHTNESS_MODEL),
            model_config=config,
            pip_requirements=["mlflow"],
            registered_model_name=NAME,
        )
    version = str(info.registered_model_version)
    if threshold is not None:
        mlflow.MlflowClient().set_model_version_tag(NAME, version, TAG_OPERATING_THRESHOLD, str(threshold))
    return version


def make_champion(version: str) -> None:
    import mlflow

    mlflow.MlflowClient().set_registered_model_alias(NAME, CHAMPION, version)


def brightness(patches: np.ndarray, centre: float, slope: float = 2.0) -> np.ndarray:
    light = np.log1p(patches.reshape(len(patches), -1).astype(np.float64).mean(axis=1))
    return (1.0 / (1.0 + np.exp(-slope * (light - centre)))).astype(np.float32)


@pytest.fixture(scope="module")
def params() -> ScreenParams:
    return load_section("screen", ScreenParams, overrides=["screen.batch_size=64"])


@pytest.fixture(scope="module")
def first(tracking_uri, training_data, params, tmp_path_factory):
    """Version 1 (centre 7.0, threshold 0.4) is champion; the snapshot is screened once."""
    version = register({"centre": 7.0}, threshold=0.4)
    make_champion(version)
    out = tmp_path_factory.mktemp("screened")
    lineage = Lineage(snapshot="2026-11-30", data_version="abc123")
    result = screen(tiles=training_data.tiles, out=out, params=params, model=CHAMPION_URI, lineage=lineage)
    return result, version, out


def test_every_patch_is_scored_at_the_versions_threshold(first, training_data):
    result, version, out = first
    assert result.out == out / version and not result.skipped
    scores = pd.read_parquet(result.out / SCORES_FILE)
    index = pd.read_parquet(training_data.tiles / INDEX_FILE)
    assert sorted(scores["patch_id"]) == sorted(index["patch_id"])
    expected = brightness(load_patches(training_data.tiles, scores["patch_id"]), centre=7.0)
    np.testing.assert_allclose(scores["cloud_probability"], expected, atol=1e-6)
    assert (scores["is_cloud"] == (scores["cloud_probability"] >= 0.4)).all()
    # The threshold moved decisions: a default 0.5 would have called fewer patches cloud.
    assert ((scores["cloud_probability"] >= 0.4) != (scores["cloud_probability"] >= 0.5)).any()
    clear = pd.read_parquet(result.out / CLEAR_FILE)
    assert set(clear["patch_id"]) == set(scores.loc[~scores["is_cloud"], "patch_id"])
    about = read_scores_metadata(result.out / SCORES_FILE)
    assert about["model"]["name"] == NAME and about["model"]["version"] == version
    assert about["threshold"] == 0.4 and about["data_version"] == "abc123" and about["snapshot"] == "2026-11-30"
    summary = result.summary
    assert summary["patches"] == len(index) and summary["clear"] == len(clear)
    assert summary["cloud_fraction"] == pytest.approx(scores["is_cloud"].mean())
    assert set(summary["cloud_fraction_by"]) == {"season", "country"}


def test_agreement_with_the_official_cloud_list(first, training_data):
    result, _, _ = first
    scores = pd.read_parquet(result.out / SCORES_FILE)
    official = pd.read_parquet(training_data.tiles / METADATA_FILE, columns=["patch_id", "cloud"])
    joined = scores.merge(official, on="patch_id")
    expected = binary_metrics(joined["cloud"].astype(int).to_numpy(), joined["cloud_probability"].to_numpy(), 0.4)
    assert result.summary["agreement"]["precision"] == pytest.approx(expected["precision"])
    assert result.summary["agreement"]["recall"] == pytest.approx(expected["recall"])
    table = pd.read_parquet(result.out / AGREEMENT_FILE)
    assert table.iloc[0][["column", "value"]].tolist() == ["all", "all"]
    by_season = table[table["column"] == "season"]
    assert by_season["patches"].sum() == len(scores)


def test_the_screening_is_an_mlflow_run_in_its_own_experiment(first, params):
    import mlflow

    result, version, _ = first
    run = mlflow.MlflowClient().get_run(result.summary["mlflow_run_id"])
    experiment = mlflow.MlflowClient().get_experiment(run.info.experiment_id)
    assert experiment.name == params.experiment
    assert run.data.tags[TAG_KIND] == "screening" and run.data.tags[TAG_SNAPSHOT] == "2026-11-30"
    assert run.data.params["model_version"] == version
    assert run.data.metrics["cloud_fraction"] == pytest.approx(result.summary["cloud_fraction"])
    assert "agreement_recall" in run.data.metrics
    assert run.info.status == "FINISHED"


def test_the_same_champion_again_does_nothing(first, training_data, params):
    import mlflow

    result, _, out = first
    before = {p.name: p.stat().st_mtime_ns for p in result.out.iterdir()}
    runs_before = len(mlflow.search_runs(search_all_experiments=True))
    again = screen(tiles=training_data.tiles, out=out, params=params, model=CHAMPION_URI)
    assert again.skipped and again.summary == result.summary
    assert {p.name: p.stat().st_mtime_ns for p in result.out.iterdir()} == before
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs_before


def test_a_new_champion_writes_beside_the_old_output(first, training_data, params):
    result, old, out = first
    new = register({"centre": 6.5}, threshold=0.6)
    make_champion(new)
    try:
        before = (result.out / SCORES_FILE).read_bytes()
        fresh = screen(tiles=training_data.tiles, out=out, params=params, model=CHAMPION_URI)
    finally:
        make_champion(old)
    assert fresh.out == out / new and not fresh.skipped
    assert (result.out / SCORES_FILE).read_bytes() == before
    assert read_scores_metadata(fresh.out / SCORES_FILE)["threshold"] == 0.6
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted([old, new])


def test_a_version_without_a_threshold_is_refused(first, training_data, params, tmp_path):
    bare = register({"centre": 7.0}, threshold=None)
    with pytest.raises(ModelVersionError, match=rf"version {bare} .*no operating threshold.*{TAG_OPERATING_THRESHOLD}"):
        screen(tiles=training_data.tiles, out=tmp_path, params=params, model=f"models:/{NAME}/{bare}")
    assert list(tmp_path.iterdir()) == []


def test_only_registered_versions_screen(first, training_data, params, tmp_path):
    import mlflow

    run_id = mlflow.MlflowClient().get_model_version(NAME, first[1]).run_id
    with pytest.raises(ModelVersionError, match="not a registered version"):
        screen(tiles=training_data.tiles, out=tmp_path, params=params, model=f"runs:/{run_id}/{MODEL_ARTIFACT}")


def test_missing_tiles_are_named(first, params, tmp_path):
    with pytest.raises(ScreeningError, match=str(tmp_path / "nothing")):
        screen(tiles=tmp_path / "nothing", out=tmp_path / "out", params=params, model=CHAMPION_URI)


def test_the_cli_prints_the_summary_and_names_faults(first, training_data, tracking_uri, tmp_path):
    result, version, out = first
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    command = [sys.executable, "-m", "tasks.screen", "--params", str(ROOT / "params.yaml")]
    command += ["--set", "screen.batch_size=64"]
    ok = subprocess.run(
        [*command, "--tiles", str(training_data.tiles), "--out", str(out), "--model", f"models:/{NAME}/{version}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["mlflow_run_id"] == result.summary["mlflow_run_id"]  # reused, not redone
    bad = subprocess.run(
        [*command, "--tiles", str(tmp_path), "--out", str(tmp_path / "out"), "--model", CHAMPION_URI],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and str(tmp_path) in bad.stderr and "Traceback" not in bad.stderr


def test_a_dask_cluster_scores_the_same(first, training_data, params, tmp_path, monkeypatch):
    from distributed import LocalCluster

    result, version, _ = first
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", cluster.scheduler_address)
        remote = screen(tiles=training_data.tiles, out=tmp_path, params=params, model=f"models:/{NAME}/{version}")
    assert remote.summary["workers"] == "dask"
    here = pd.read_parquet(result.out / SCORES_FILE)
    there = pd.read_parquet(remote.out / SCORES_FILE)
    pd.testing.assert_frame_equal(here, there)
