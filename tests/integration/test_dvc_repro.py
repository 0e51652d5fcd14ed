"""dvc.yaml: the house rules for its stages, and `dvc repro` in a git copy of the repo (tiny mirror), run twice."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.lib.config import load_section
from tasks.versioning import VersioningParams, restore
from tests.conftest import REPO

pytestmark = pytest.mark.integration

STAGES = ["mirror", "download", "validate", "tile", "sample", "train", "evaluate"]
DATA = Path(".local/data")


def _dvc_yaml() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def test_every_stage_runs_its_step_with_its_params_section_and_module():
    stages = _dvc_yaml()["stages"]
    assert list(stages) == STAGES
    for name, stage in stages.items():
        cmd = " ".join(stage["cmd"].split())
        assert cmd.startswith(f"python -m tasks.{name} "), cmd
        assert f"tasks/{name}.py" in stage["deps"]
        assert stage["params"][0] == name  # its own section first; train also reads model and cost
        for out in stage.get("outs", []) + stage.get("metrics", []):
            path = out if isinstance(out, str) else next(iter(out))
            # Outputs are the paths the command line is told to write to.
            assert re.search(rf"--(out|dest|xcom-out) {re.escape(path)}(\s|$)", cmd), (name, path)


def _tiny_copy(root: Path) -> None:
    """The repo's pipeline files and .gitignore, with params for a 40-patch mirror."""
    shutil.copy(REPO / "dvc.yaml", root)
    shutil.copy(REPO / ".gitignore", root)
    shutil.copytree(REPO / "tasks", root / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["mirror"]["patches"] = 40
    archive = f"{DATA}/mirror/BigEarthNet-S2-mirror-40-{params['mirror']['seed']}.tar.gz"
    params["download"]["sources"]["embedded"] = {"url": archive, "checksum_url": f"{archive}.sha256"}
    params["validate"]["workers"] = 1
    params["tile"]["workers"] = 1
    params["sample"]["small_per_class"] = 10
    params["train"]["epochs"] = 1
    params["train"]["batch_size"] = 8
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_repro_runs_every_stage_once_and_a_second_repro_does_nothing(tmp_path, gcs_emulator):
    host, bucket = gcs_emulator
    _tiny_copy(tmp_path)
    env = {
        **os.environ,
        # `python` in the stage commands is this environment's interpreter.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_SITE_CACHE_DIR": str(tmp_path / ".site-cache"),
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "NO_GCE_CHECK": "true",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }

    def dvc(*args: str) -> str:
        run = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=240)  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        return run.stdout

    # A git repository with the project's .gitignore, as the real one is: DVC refuses, for example, to write a
    # dvc.lock that git ignores.
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc("init")
    first = dvc("repro")
    assert re.findall(r"Running stage '(\w+)'", first) == STAGES
    for path in (
        "validated/embedded/report.json",
        "tiles/embedded/tiles.json",
        "samples/embedded/small/manifest.parquet",
        "samples/embedded/large/manifest.parquet",
        "models/embedded/train.json",
        "evaluations/embedded/metrics.json",
    ):
        assert (tmp_path / DATA / path).is_file(), path
    lock = (tmp_path / "dvc.lock").read_text()
    assert list(yaml.safe_load(lock)["stages"]) == STAGES

    second = dvc("repro")
    assert "Running stage" not in second
    assert "Data and pipelines are up to date." in second
    assert (tmp_path / "dvc.lock").read_text() == lock
    assert "Data and pipelines are up to date." in dvc("status")

    # `dvc push` from this workspace fills the same remote tasks.versioning uses, so dvc.lock's hash of the tiles
    # restores them.
    dvc("remote", "add", "-d", "store", f"gs://{bucket}/dvc")
    dvc("remote", "modify", "store", "endpointurl", host)
    dvc("remote", "modify", "store", "allow_anonymous_login", "true")
    dvc("push")
    (tiles_out,) = [o for o in yaml.safe_load(lock)["stages"]["tile"]["outs"]]
    params = load_section("versioning", VersioningParams, overrides=[f"versioning.remote=gs://{bucket}/dvc"])
    restored = restore(version=tiles_out["md5"], dest=tmp_path / "restored", params=params)
    tiles = tmp_path / DATA / "tiles" / "embedded"
    assert restored.files == tiles_out["nfiles"]
    for path in tiles.rglob("*"):
        if path.is_file():
            assert (restored.dest / path.relative_to(tiles)).read_bytes() == path.read_bytes()
