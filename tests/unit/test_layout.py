"""House rules that keep tasks/ usable from Airflow, DVC and a Kubernetes pod alike."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

TASK_MODULES = sorted(p.stem for p in (REPO / "tasks").glob("*.py") if p.stem != "__init__")
STEP_MODULES = [m for m in TASK_MODULES if "def main(" in (REPO / "tasks" / f"{m}.py").read_text()]


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", TASK_MODULES)
def test_tasks_never_import_airflow(module):
    imported = _imported_modules(REPO / "tasks" / f"{module}.py")
    assert not {name for name in imported if name.split(".")[0] == "airflow"}


def test_importing_tasks_has_no_side_effects(tmp_path):
    code = "import os, sys; before = dict(os.environ); " + "; ".join(f"import tasks.{m}" for m in TASK_MODULES)
    code += "; assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())"
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
    assert list(tmp_path.iterdir()) == [], "importing tasks created files in the working directory"


def test_the_steps_are_the_ones_the_design_names():
    assert {
        "mirror",
        "download",
        "validate",
        "tile",
        "sample",
        "versioning",
        "train",
        "baseline",
        "evaluate",
        "gate",
    } <= set(STEP_MODULES)


@pytest.mark.parametrize("module", STEP_MODULES)
def test_every_step_has_a_cli_with_help(module):
    run = subprocess.run([sys.executable, "-m", f"tasks.{module}", "--help"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "--params" in run.stdout and "--set" in run.stdout
