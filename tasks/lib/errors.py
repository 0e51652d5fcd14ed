"""Every error cloudscreen raises on purpose, in one place, each saying whether trying again can help.

A *permanent* error is a fault that will recur on every attempt: bad data, bad params, a rejected archive, a
snapshot that does not exist. A *transient* one may pass by itself: a network that dropped, a server that is busy or
not up yet, a trainer whose machine went away. Each CLI turns any of them into a one-line message and exit code 2;
the DAGs fail a task at once on a permanent error (`fail_fast`) and keep their retries and backoff for transient
ones and for anything unexpected.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ClassVar, ParamSpec, TypeVar


class CloudscreenError(Exception):
    """A failure caused by input or environment, reported to the user without a stack trace."""

    transient: ClassVar[bool] = False  # whether an identical attempt later may succeed


# --- configuration and orchestration --------------------------------------------------------------------------------


class ConfigError(CloudscreenError):
    """params.yaml or a --set override is missing, malformed or out of range."""


class PipelineError(CloudscreenError):
    """A snapshot or a training input the pipeline cannot find or use."""


class TrainingBackendError(CloudscreenError):
    """The trainer could not be started, or it failed (the message carries the end of its log). Transient: a
    trainer killed with its machine resumes from its checkpoint when started again."""

    transient = True


# --- data: download, validate, tile, sample, version ---------------------------------------------------------------


class DownloadError(CloudscreenError):
    """The archive cannot be had as asked: a malformed or unsupported URL, a missing object or file, an HTTP error
    that will not change (404, 403), a bad checksum file, or an archive holding no patch folders."""


class SourceUnavailableError(DownloadError):
    """The source did not answer well (network error, timeout, HTTP 5xx or 429) on every attempt; later it may."""

    transient = True


class ChecksumMismatchError(DownloadError):
    """The fetched bytes do not match the expected checksum: the archive is rejected."""


class UnsafeArchiveError(CloudscreenError):
    """An archive member would write outside the destination or is not a plain file or directory."""


class ValidationFailedError(CloudscreenError):
    """Too many patches were quarantined or a dataset-level expectation failed."""


class TilingError(CloudscreenError):
    """The patches or the validation report cannot be tiled as asked."""


class SampleError(CloudscreenError):
    """The tiles cannot yield the requested sets: a missing input or column, or too few patches of a class."""


class InputError(CloudscreenError):
    """A manifest or the tiles it points at cannot feed training."""


class VersioningError(CloudscreenError):
    """A snapshot cannot be versioned or restored: missing inputs, an unusable remote, an unknown version."""


class UnknownVersionError(VersioningError):
    """The remote holds no directory with this hash."""


# --- models: evaluate, gate -------------------------------------------------------------------------------------------


class EvaluationError(CloudscreenError):
    """A model cannot be evaluated: missing or unusable evaluation data, an unknown model or run, or predictions that
    break the model contract."""


class GateError(CloudscreenError):
    """The gate cannot reach a verdict: an unknown run or model, a run never evaluated, or a registry state a
    promotion or rollback cannot proceed from. A rejected challenger is a verdict, never this error."""


class ModelVersionError(CloudscreenError):
    """A model cannot screen or serve patches: the URI names no registered version, the version has no operating
    threshold recorded (never screened at a default 0.5), or it cannot be loaded."""


class DeviceUnavailableError(CloudscreenError):
    """Scoring was asked to run on a device (a GPU) that this process cannot use."""


class ScreeningError(CloudscreenError):
    """A snapshot cannot be screened: its tiles are missing or unreadable, or an earlier screening output is in the
    way."""


class MonitoringError(CloudscreenError):
    """A snapshot cannot be monitored: its tiles, its reference or a scores file is missing or unreadable, or no
    reference can be found."""


class RequestError(CloudscreenError):
    """A request to tasks.serve that the server refuses with a 4xx: its status and what is wrong with it."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# --- operations tooling (ops/, demo/) ------------------------------------------------------------------------------


class ImageError(CloudscreenError):
    """The trainer image cannot be built, pushed or recorded: bad paths or names, a failed build or push, a missing
    or stale record."""


class DockerUnavailableError(ImageError):
    """No Docker engine answers where the client looked."""

    transient = True


class TrackingServerError(CloudscreenError):
    """The MLflow server was misconfigured, could not bind its port, exited, or did not become ready in time."""


class StackError(CloudscreenError):
    """Airflow could not start (port taken, exited, not healthy in time) or answered a request with an error."""


def is_permanent(exc: BaseException) -> bool:
    """Whether `exc` will recur on retry: a CloudscreenError that is not transient. Anything else (an OSError, a
    client library's error) is unknown, so retrying stays allowed."""
    return isinstance(exc, CloudscreenError) and not exc.transient


_P = ParamSpec("_P")
_R = TypeVar("_R")


def fail_fast(fail: Callable[[str], BaseException]) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """A decorator for orchestrator task bodies: a permanent error is raised again as `fail(message)` (the DAGs pass
    Airflow's AirflowFailException: fail now, no retries); every other exception propagates unchanged, so the task's
    retries and backoff apply. The orchestrator's class is a parameter because tasks/ never imports Airflow."""

    def decorate(body: Callable[_P, _R]) -> Callable[_P, _R]:
        # The body's name, doc and signature (through __wrapped__), not its annotations: Airflow would try to resolve
        # the return type in this module and guess multiple_outputs from it. One XCom per task, the return value.
        @functools.wraps(body, assigned=("__module__", "__name__", "__qualname__", "__doc__"))
        def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return body(*args, **kwargs)
            except CloudscreenError as exc:
                if not is_permanent(exc):
                    raise
                raise fail(f"{type(exc).__name__} (permanent, not retried): {exc}") from exc

        run.__annotations__ = {}  # neither the body's nor this wrapper's: see above
        return run

    return decorate
