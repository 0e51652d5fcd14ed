"""Errors the pipeline steps raise for bad input; each CLI turns them into a one-line message and exit code 2."""

from __future__ import annotations


class CloudscreenError(Exception):
    """A failure caused by input or environment, reported to the user without a stack trace."""


class ConfigError(CloudscreenError):
    """params.yaml or a --set override is missing, malformed or out of range."""


class DownloadError(CloudscreenError):
    """The archive could not be fetched (after retries) or the source does not exist."""


class ChecksumMismatchError(DownloadError):
    """The fetched bytes do not match the expected checksum."""


class UnsafeArchiveError(CloudscreenError):
    """An archive member would write outside the destination or is not a plain file or directory."""


class ValidationFailedError(CloudscreenError):
    """Too many patches were quarantined or a dataset-level expectation failed."""


class EvaluationError(CloudscreenError):
    """A model cannot be evaluated: missing or unusable evaluation data, an unknown model or run, or predictions that
    break the model contract."""


class GateError(CloudscreenError):
    """The gate cannot reach a verdict: an unknown run or model, a run never evaluated, or a registry state a
    promotion or rollback cannot proceed from. A rejected challenger is a verdict, never this error."""
