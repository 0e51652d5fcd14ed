"""A SQLite tracking store of its own for each test module: runs, registry and artifacts in a temporary directory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("GIT_PYTHON_REFRESH", "quiet")
        mp.chdir(root)  # the SQLite store keeps artifacts under ./mlruns
        yield uri
