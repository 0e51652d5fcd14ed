"""Keep the step pages (docs/steps/<step>.md) in step with the steps' command lines.

    python -m ops.docs           rewrite every stale help block; print the pages it changed
    python -m ops.docs --check   change nothing; exit 1 naming every stale or missing page

A step page is written by hand except for its help blocks: a fenced block between `<!-- help:start -->` and
`<!-- help:end -->` holding exactly what `python -m tasks.<step> --help` prints. A marker may name a subcommand
(`<!-- help:start push -->` holds `python -m tasks.versioning push --help`). Only those blocks are rewritten.

Every module tasks/<step>.py is a step and needs a page with at least the plain block; a page whose step does not
exist is reported too. The commands run with COLUMNS fixed, so argparse wraps the same on every machine;
tests/unit/test_docs.py checks the pages the same way.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tasks.lib.files import atomic_path

REPO = Path(__file__).resolve().parents[1]
STEPS_DIR = Path("docs") / "steps"
HELP_COLUMNS = 100  # the terminal width argparse wraps help text to, here and in the test
FENCE = "```"
# One help block: the marker (with the subcommand words, if any), then anything up to the end marker.
BLOCK = re.compile(
    r"<!-- help:start(?P<args>(?: [a-z][a-z0-9_-]*)*) -->\n(?P<body>.*?)<!-- help:end -->",
    re.DOTALL,
)

Command = tuple[str, ...]  # (step, *subcommand words)


def steps(repo: Path = REPO) -> list[str]:
    """The pipeline steps: every module directly in tasks/ (shared code lives in tasks/lib/)."""
    return sorted(p.stem for p in (repo / "tasks").glob("*.py") if p.stem != "__init__")


def help_environment() -> dict[str, str]:
    """This process's environment with the terminal width fixed (LINES would not change argparse; dropped anyway)."""
    env = {k: v for k, v in os.environ.items() if k not in {"COLUMNS", "LINES"}}
    env["COLUMNS"] = str(HELP_COLUMNS)
    return env


def normalise(text: str) -> str:
    """Help text as a page holds it: no trailing blanks on a line, one final newline."""
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()) + "\n"


def help_text(command: Command, repo: Path = REPO) -> str:
    """What `python -m tasks.<step> [subcommand] --help` prints, normalised.

    Raises:
        RuntimeError: the command failed; the message holds the end of its stderr.
    """
    step, *words = command
    run = subprocess.run(
        [sys.executable, "-m", f"tasks.{step}", *words, "--help"],
        cwd=repo,
        env=help_environment(),
        capture_output=True,
        text=True,
        check=False,
    )
    if run.returncode != 0:
        tail = "\n".join(run.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"{display(command)} exited {run.returncode}: {tail}")
    return normalise(run.stdout)


def display(command: Command) -> str:
    step, *words = command
    return " ".join(["python -m", f"tasks.{step}", *words, "--help"])


def render(text: str) -> str:
    """The body of a help block holding `text`."""
    return f"{FENCE}text\n{text}{FENCE}\n"


def commands(step: str, page: str) -> list[Command]:
    """The commands whose help a page's blocks hold, in page order."""
    return [(step, *match["args"].split()) for match in BLOCK.finditer(page)]


def refresh(step: str, page: str, helps: Mapping[Command, str]) -> str:
    """`page` with every help block holding the help text of its command; everything else unchanged."""

    def block(match: re.Match[str]) -> str:
        command = (step, *match["args"].split())
        return f"<!-- help:start{match['args']} -->\n{render(helps[command])}<!-- help:end -->"

    return BLOCK.sub(block, page)


@dataclass
class Report:
    changed: dict[Path, str] = field(default_factory=dict)  # page → its refreshed text
    problems: list[str] = field(default_factory=list)  # what no refresh can fix: a missing page, a failing command


def survey(repo: Path = REPO) -> Report:
    """Compare every step page's help blocks with the live help; nothing is written."""
    report = Report()
    pages_dir = repo / STEPS_DIR
    names = steps(repo)
    pages: dict[str, str] = {}
    for name in names:
        path = pages_dir / f"{name}.md"
        if not path.is_file():
            report.problems.append(f"{path.relative_to(repo)}: missing: the step tasks.{name} has no page")
            continue
        pages[name] = path.read_text()
        if (name,) not in commands(name, pages[name]):
            report.problems.append(
                f"{path.relative_to(repo)}: no help block (<!-- help:start --> ... <!-- help:end -->)"
            )
    for path in sorted(pages_dir.glob("*.md")):
        if path.stem not in names:
            report.problems.append(f"{path.relative_to(repo)}: no step tasks.{path.stem} (page of a removed step?)")

    wanted = sorted({command for name, page in pages.items() for command in commands(name, page)})
    helps: dict[Command, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, min(len(wanted), os.cpu_count() or 1))) as pool:
        futures = {command: pool.submit(help_text, command, repo) for command in wanted}
        for command, future in futures.items():
            try:
                helps[command] = future.result()
            except RuntimeError as exc:
                report.problems.append(str(exc))

    for name, page in pages.items():
        if any(command not in helps for command in commands(name, page)):
            continue  # its command failed: reported above
        fresh = refresh(name, page, helps)
        if fresh != page:
            report.changed[pages_dir / f"{name}.md"] = fresh
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Refresh the --help blocks of the step pages under docs/steps/.")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 when a page is stale or missing")
    args = p.parse_args(argv)
    report = survey()
    for path, text in sorted(report.changed.items()):
        where = path.relative_to(REPO)
        if args.check:
            print(f"{where}: stale help block (run `python -m ops.docs`)", file=sys.stderr)
        else:
            with atomic_path(path) as tmp:
                tmp.write_text(text)
            print(f"updated {where}")
    for problem in report.problems:
        print(problem, file=sys.stderr)
    return 1 if report.problems or (args.check and report.changed) else 0


if __name__ == "__main__":
    sys.exit(main())
