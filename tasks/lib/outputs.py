"""Is a step's output for these inputs already complete? One answer for every step, so re-runs are cheap and safe.

A step that finishes writes a small JSON record last (a report, a summary, a manifest or a state file) holding the
fingerprint of everything its output depends on: its inputs and its params. A later run with the same fingerprint,
whose other output files are all still in place, does nothing and returns the record. A crash before the record is
written leaves no record, and a run with other inputs or params finds another fingerprint: both do the work again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Where a record keeps its fingerprint unless a step says otherwise: {"input": {"fingerprint": ...}, ...}.
FINGERPRINT_AT: tuple[str, ...] = ("input", "fingerprint")


def fingerprint(*parts: bytes | str) -> str:
    """SHA-256 over `parts`, each hashed on its own first, so ("ab", "c") and ("a", "bc") differ."""
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part.encode() if isinstance(part, str) else part).digest())
    return h.hexdigest()


def completed(
    record: Path,
    fingerprint: str,
    *,
    requires: Iterable[Path] = (),
    at: Sequence[str] = FINGERPRINT_AT,
    what: str = "output",
) -> dict[str, Any] | None:
    """The record of an earlier run with the same `fingerprint` whose `requires` paths all exist, else None.

    Args:
        record: the JSON file the step writes last.
        fingerprint: of this run's inputs and params.
        requires: the step's other outputs (files or directories) that must still be there.
        at: the keys leading to the fingerprint inside the record.
        what: the step's output, for the log line ("tiles", "validation report").
    """
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    found: Any = data
    for key in at:
        found = found.get(key) if isinstance(found, dict) else None
    if found != fingerprint or not isinstance(data, dict):
        return None
    missing = [str(p) for p in requires if not p.exists()]
    if missing:
        log.info("%s: recorded as complete but %s is gone: doing the work again", record, ", ".join(missing))
        return None
    log.info("%s is complete for these inputs and params (%s): not doing it again", what, record)
    return data
