"""Errors in one place, each permanent or transient, and fail_fast turning permanent ones into "do not retry"."""

from __future__ import annotations

import inspect

import pytest

from tasks.lib import errors
from tasks.lib.errors import (
    CloudscreenError,
    ConfigError,
    DownloadError,
    SourceUnavailableError,
    TrainingBackendError,
    ValidationFailedError,
    fail_fast,
    is_permanent,
)
from tests.conftest import REPO

TRANSIENT = {"SourceUnavailableError", "TrainingBackendError", "DockerUnavailableError"}


class Fail(Exception):
    """Stands in for Airflow's AirflowFailException: tasks/ never imports Airflow."""


def _error_classes() -> dict[str, type[CloudscreenError]]:
    return {
        name: value
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, CloudscreenError)
    }


def test_every_error_class_lives_in_errors_py():
    """No module of the project declares an exception class of its own outside tasks/lib/errors.py."""
    sources = [*REPO.glob("tasks/**/*.py"), *REPO.glob("ops/*.py"), *REPO.glob("demo/*.py"), *REPO.glob("dags/*.py")]
    outside = [
        f"{path.relative_to(REPO)}: {line.strip()}"
        for path in sources
        if path.name != "errors.py"
        for line in path.read_text().splitlines()
        if line.startswith("class ") and ("Error(" in line or "Exception)" in line)
    ]
    assert outside == []


def test_the_transient_errors_are_the_ones_that_can_pass_by_themselves():
    classes = _error_classes()
    assert {name for name, cls in classes.items() if cls.transient} == TRANSIENT
    assert len(classes) >= 18


@pytest.mark.parametrize(
    ("error", "permanent"),
    [
        (ConfigError("params.yaml: train.epochs: must be >= 1"), True),
        (ValidationFailedError("report.json: 40% quarantined"), True),
        (DownloadError("https://x/a.tar.gz: HTTP 404 Not Found"), True),
        (SourceUnavailableError("https://x/a.tar.gz: failed after 6 attempt(s)"), False),
        (TrainingBackendError("the trainer exited with code -9"), False),
        (OSError("disk full"), False),  # unknown: retrying stays allowed
        (RuntimeError("a client library's own error"), False),
    ],
)
def test_is_permanent(error, permanent):
    assert is_permanent(error) is permanent


def test_fail_fast_turns_a_permanent_error_into_the_orchestrators_failure():
    @fail_fast(Fail)
    def validate(patches: str) -> dict:
        raise ValidationFailedError(f"{patches}/report.json: 3 of 4 patches quarantined")

    with pytest.raises(Fail, match=r"ValidationFailedError \(permanent, not retried\): /p/report.json: 3 of 4") as info:
        validate("/p")
    assert isinstance(info.value.__cause__, ValidationFailedError)


@pytest.mark.parametrize("error", [SourceUnavailableError("busy"), OSError("connection reset"), KeyError("x")])
def test_fail_fast_lets_transient_and_unknown_errors_through_for_retries(error):
    @fail_fast(Fail)
    def download() -> dict:
        raise error

    with pytest.raises(type(error)) as info:
        download()
    assert info.value is error


def test_fail_fast_keeps_what_airflow_reads_from_the_task_function():
    def tile(fetched: dict, validated: dict) -> dict:
        """Tile the valid patches."""
        return {"tiles": fetched["patches"], "report": validated["report"]}

    wrapped = fail_fast(Fail)(tile)
    assert wrapped.__name__ == "tile" and wrapped.__doc__ == "Tile the valid patches."
    assert list(inspect.signature(wrapped).parameters) == ["fetched", "validated"]
    assert "return" not in wrapped.__annotations__  # Airflow would guess multiple_outputs from it
    assert wrapped({"patches": "p"}, validated={"report": "r"}) == {"tiles": "p", "report": "r"}
