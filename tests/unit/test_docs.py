"""The step pages (docs/steps/<step>.md) exist for every step and show the command line each step has today."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from ops import docs
from tests.conftest import REPO

PAGES = REPO / "docs" / "steps"
STEPS = sorted(p.stem for p in (REPO / "tasks").glob("*.py") if p.stem != "__init__")
COLUMNS = "100"  # argparse wraps help text to the terminal width; fixed so the pages read the same everywhere
BLOCK = re.compile(r"<!-- help:start((?: [a-z][a-z0-9_-]*)*) -->\n```text\n(.*?)```\n<!-- help:end -->", re.DOTALL)


def _blocks(step: str) -> dict[tuple[str, ...], str]:
    """A page's help blocks: (step, *subcommand) → the text inside the fence."""
    page = PAGES / f"{step}.md"
    if not page.is_file():
        return {}
    return {(step, *words.split()): body for words, body in BLOCK.findall(page.read_text())}


def _live_help(command: tuple[str, ...]) -> str:
    step, *words = command
    env = {k: v for k, v in os.environ.items() if k not in {"COLUMNS", "LINES"}} | {"COLUMNS": COLUMNS}
    run = subprocess.run(
        [sys.executable, "-m", f"tasks.{step}", *words, "--help"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, f"python -m tasks.{' '.join(command)} --help failed:\n{run.stderr}"
    # Pages hold no trailing blanks (editors strip them) and end the block with one newline.
    return "\n".join(line.rstrip() for line in run.stdout.strip("\n").splitlines()) + "\n"


@pytest.fixture(scope="module")
def live_help() -> dict[tuple[str, ...], str]:
    """Every command the pages show, run once, side by side (each start imports the step's heavy libraries)."""
    commands = sorted({command for step in STEPS for command in _blocks(step)})
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return dict(zip(commands, pool.map(_live_help, commands), strict=True))


@pytest.mark.parametrize("step", STEPS)
def test_every_step_has_a_page_with_its_help(step):
    assert (PAGES / f"{step}.md").is_file(), f"tasks.{step} has no page docs/steps/{step}.md"
    assert (step,) in _blocks(step), f"docs/steps/{step}.md has no <!-- help:start --> block"


def test_every_page_is_a_step():
    orphans = sorted(p.name for p in PAGES.glob("*.md") if p.stem not in STEPS)
    assert not orphans, f"docs/steps/ has pages of no step in tasks/: {orphans}"


def test_the_index_links_every_step_page():
    index = (REPO / "docs" / "README.md").read_text()
    missing = [step for step in STEPS if f"(steps/{step}.md)" not in index]
    assert not missing, f"docs/README.md links no page for {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("step", STEPS)
def test_help_blocks_match_the_live_help(step, live_help):
    blocks = _blocks(step)
    assert blocks, f"docs/steps/{step}.md: no help block"
    for command, shown in blocks.items():
        assert shown == live_help[command], (
            f"docs/steps/{step}.md: the block of `python -m tasks.{' '.join(command)} --help` is stale; "
            "run `python -m ops.docs`"
        )


def test_the_generator_rewrites_only_help_blocks():
    page = (
        "# tasks.x\n\nHand-written.\n\n<!-- help:start -->\n```text\nold\n```\n<!-- help:end -->\n\nMore.\n\n"
        "<!-- help:start push -->\n<!-- help:end -->\n"
    )
    helps = {("x",): "usage: x.py [-h]\n", ("x", "push"): "usage: x.py push [-h]\n"}
    fresh = docs.refresh("x", page, helps)
    assert fresh == (
        "# tasks.x\n\nHand-written.\n\n<!-- help:start -->\n```text\nusage: x.py [-h]\n```\n<!-- help:end -->\n\n"
        "More.\n\n<!-- help:start push -->\n```text\nusage: x.py push [-h]\n```\n<!-- help:end -->\n"
    )
    assert docs.refresh("x", fresh, helps) == fresh
    assert docs.commands("x", fresh) == [("x",), ("x", "push")]


def test_the_generator_fixes_the_width_the_test_uses():
    assert str(docs.HELP_COLUMNS) == COLUMNS
    assert docs.help_environment()["COLUMNS"] == COLUMNS
