"""Shared fixtures: small mirrors built once per session with tasks.mirror (never hand-made archives)."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.lib.config import load_section
from tasks.mirror import Fault, MirrorParams, MirrorResult, build_mirror

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    """Airflow reads its configuration once, when first imported: point it at a throwaway home and the project's
    DAGs before any test imports it (tests that run Airflow for real give their subprocesses homes of their own)."""
    import os
    import tempfile

    os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="cloudscreen-airflow-home-"))
    os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(REPO / "dags"))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    # No MLflow usage telemetry from the tests, their servers and subprocesses (MLflow reads it at each event).
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def mirror_params(**changes) -> MirrorParams:
    overrides = [f"mirror.{k}={v}" for k, v in changes.items()]
    return load_section("mirror", MirrorParams, overrides=overrides)


def extract(archive: Path, dest: Path) -> Path:
    """Extract a trusted test archive and return its single top folder."""
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    (top,) = dest.iterdir()
    return top


@pytest.fixture(scope="session")
def small_mirror(tmp_path_factory) -> MirrorResult:
    out = tmp_path_factory.mktemp("small_mirror")
    return build_mirror(out=out, params=mirror_params(patches=40, seed=5), workers=1)


@pytest.fixture(scope="session")
def faulty_mirror(tmp_path_factory) -> MirrorResult:
    """A mirror with every kind of fault injected once."""
    out = tmp_path_factory.mktemp("faulty_mirror")
    return build_mirror(out=out, params=mirror_params(patches=40, seed=6), faults=dict.fromkeys(Fault, 1), workers=1)


@pytest.fixture(scope="session")
def small_mirror_root(small_mirror, tmp_path_factory) -> Path:
    return extract(small_mirror.archive, tmp_path_factory.mktemp("small_mirror_root"))


@pytest.fixture(scope="session")
def faulty_mirror_root(faulty_mirror, tmp_path_factory) -> Path:
    return extract(faulty_mirror.archive, tmp_path_factory.mktemp("faulty_mirror_root"))


@dataclass(frozen=True)
class TrainingData:
    """A tiled and sampled small mirror: what tasks.train, tasks.evaluate and tasks.gate read."""

    tiles: Path
    samples: Path  # holds small/ and large/, each with manifest.parquet and natural.parquet

    def manifest(self, dataset: str = "small") -> Path:
        return self.samples / dataset / "manifest.parquet"


def build_training_data(out: Path, *, patches: int = 240, seed: int = 11, per_class: int = 48) -> TrainingData:
    """Mirror → extract → tile → sample, with the project's own steps (small enough for a CPU test)."""
    from tasks.sample import SampleParams, sample
    from tasks.tile import TileParams, tile

    mirror = build_mirror(out=out / "mirror", params=mirror_params(patches=patches, seed=seed), workers=1)
    root = extract(mirror.archive, out / "extracted")
    tiles = tile(
        patches=root,
        out=out / "tiles",
        params=load_section("tile", TileParams, overrides=["tile.workers=1", "tile.shard_patches=64"]),
    ).out
    sample_params = load_section("sample", SampleParams, overrides=[f"sample.small_per_class={per_class}"])
    for dataset in ("small", "large"):
        sample(tiles=tiles, out=out / "samples", dataset=dataset, params=sample_params)
    return TrainingData(tiles=tiles, samples=out / "samples")


@pytest.fixture(scope="session")
def training_data(tmp_path_factory) -> TrainingData:
    return build_training_data(tmp_path_factory.mktemp("training_data"))


@pytest.fixture(autouse=True)
def _no_mlflow_state_between_tests(monkeypatch):
    """Each test finds MLflow as a fresh process would: no active run, no cached experiment, no tracking URI set in
    code (each test module points MLFLOW_TRACKING_URI at a store of its own)."""
    _reset_mlflow()
    yield
    _reset_mlflow()


def _reset_mlflow() -> None:
    import os
    import sys

    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)  # mlflow.set_experiment exports it for subprocesses
    if "mlflow" not in sys.modules:  # importing MLflow costs seconds: tests that never did need no reset
        return
    import mlflow
    import mlflow.tracking.fluent

    while mlflow.active_run():
        mlflow.end_run()
    mlflow.tracking.fluent._active_experiment_id = None
    # A test that called mlflow.set_tracking_uri would otherwise point every later test (and what it logs for the
    # servers it starts) at its store: the URI set in code wins over MLFLOW_TRACKING_URI.
    from mlflow.tracking._tracking_service import utils as tracking_utils

    tracking_utils._tracking_uri = None
