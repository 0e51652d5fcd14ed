"""House rules that keep tasks/ usable from Airflow, DVC and a Kubernetes pod alike."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

# tasks/<step>.py: the pipeline steps, one per DAG task and dvc.yaml stage, each with a CLI.
STEP_MODULES = sorted(p.stem for p in (REPO / "tasks").glob("*.py") if p.stem != "__init__")
# tasks/lib/: what the steps share; no CLI.
LIB_MODULES = sorted(f"lib.{p.stem}" for p in (REPO / "tasks" / "lib").glob("*.py") if p.stem != "__init__")
TASK_MODULES = [*STEP_MODULES, *LIB_MODULES]
# The one library that calls into the steps: what each DAG task does.
ORCHESTRATION = "lib.pipeline"


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _path(module: str) -> Path:
    return REPO / "tasks" / f"{module.replace('.', '/')}.py"


@pytest.mark.parametrize("module", TASK_MODULES)
def test_tasks_never_import_airflow(module):
    imported = _imported_modules(_path(module))
    assert not {name for name in imported if name.split(".")[0] == "airflow"}


@pytest.mark.parametrize("module", TASK_MODULES)
def test_tasks_never_import_the_tooling_around_them(module):
    imported = _imported_modules(_path(module))
    assert not {name for name in imported if name.split(".")[0] in ("ops", "demo", "bench", "tests", "dags")}


def test_every_module_in_tasks_is_a_step_with_a_cli_and_no_library_has_one():
    for step in STEP_MODULES:
        assert "def main(" in _path(step).read_text(), f"tasks/{step}.py has no CLI: a library belongs in tasks/lib/"
    for lib in LIB_MODULES:
        text = _path(lib).read_text()
        assert "def main(" not in text and "__main__" not in text, f"tasks/{lib}.py has a CLI: a step belongs in tasks/"


@pytest.mark.parametrize("module", [m for m in LIB_MODULES if m != ORCHESTRATION])
def test_libraries_never_import_a_step(module):
    """Dependencies point from steps to libraries; only tasks.lib.pipeline (the DAG tasks' side) calls the steps."""
    steps = {f"tasks.{step}" for step in STEP_MODULES}
    imported = _imported_modules(_path(module))
    assert not imported & steps, f"tasks/{module}.py imports a step: {sorted(imported & steps)}"


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
