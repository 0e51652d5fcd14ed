"""The few lines every step's command line shares: params file, --set overrides, logging, error reporting."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from tasks.lib.config import PARAMS_ENV
from tasks.lib.errors import CloudscreenError

log = logging.getLogger(__name__)


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options common to every step."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--params",
        type=Path,
        # The working directory's params.yaml is what a DVC stage runs with.
        default=Path(os.environ.get(PARAMS_ENV) or "params.yaml"),
        help=f"params file (default: ${PARAMS_ENV}, else params.yaml in the working directory)",
    )
    add_overrides(p, "override one parameter for this run; repeatable; VALUE is parsed as YAML")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def add_overrides(p: argparse.ArgumentParser, help_text: str) -> None:
    """The repeatable `--set SECTION.KEY=VALUE` option; its values arrive as `args.overrides`."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help=help_text)


def add_training_inputs(p: argparse.ArgumentParser) -> None:
    """The data and lineage options of every command that trains (tasks.train, tasks.baseline, tasks.search)."""
    p.add_argument("--manifest", type=Path, required=True, help="samples/<snapshot>/<set>/manifest.parquet")
    p.add_argument("--tiles", type=Path, required=True, help="the tile step's output directory")
    p.add_argument("--snapshot", help="lineage: the snapshot trained on (default: $CLOUDSCREEN_SNAPSHOT)")
    p.add_argument("--data-version", help="lineage: the DVC data version (default: $CLOUDSCREEN_DATA_VERSION)")


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Great Expectations logs its internals at INFO; tifffile logs an ERROR for each damaged file that the
    # validation report already names with its reason.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    # The GCS emulator logs a missing object at ERROR; clients probing for existence (MLflow, DVC) expect misses.
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Keep stdout for a step's result: Keras draws its progress bar there and MLflow prints "View run" links."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def run(main: Callable[[], None]) -> None:
    """Run a CLI body; a CloudscreenError becomes a one-line error and exit code 2, not a traceback."""
    try:
        main()
    except CloudscreenError as exc:
        log.error("%s", exc)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
