"""A step's output directory kept in the object store (`gs://BUCKET/PREFIX/`): uploaded with its record last, found
complete by the record's fingerprint, fetched back whole.

tasks.lib.outputs' rule, in a bucket: the small JSON record a step writes last (a summary, a report) is the commit.
An upload first deletes the record an earlier run left, then uploads the other files, then the record; so a reader
that finds the record finds the files it describes, and a kill mid-upload leaves no record (the next run does the work
again). Each object is replaced atomically by the store. Google Cloud Storage through tasks.lib.gcs: the emulator
when STORAGE_EMULATOR_HOST is set, else the environment's credentials (Workload Identity, ADC).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

from tasks.lib.files import atomic_dir
from tasks.lib.gcs import gcs_client, split_gs_url
from tasks.lib.outputs import FINGERPRINT_AT

log = logging.getLogger(__name__)

URL_PREFIX = "gs://"


def is_remote(location: str | Path) -> bool:
    """Whether an output location is in the object store (a `gs://` URL) rather than a local path."""
    return isinstance(location, str) and location.startswith(URL_PREFIX)


class RemoteOutput:
    """One output directory at `gs://BUCKET/PREFIX` (no trailing slash needed)."""

    def __init__(self, url: str) -> None:
        bucket, prefix = split_gs_url(url.rstrip("/"))
        self.url = url.rstrip("/")
        self._bucket = gcs_client().bucket(bucket)
        self._prefix = prefix + "/"

    def _blob(self, name: str):
        return self._bucket.blob(self._prefix + name)

    def read_record(self, name: str) -> dict[str, Any] | None:
        """The JSON record `name`, or None when there is none (or it is not a JSON object)."""
        from google.api_core.exceptions import NotFound

        try:
            data = json.loads(self._blob(name).download_as_bytes())
        except NotFound:
            return None
        except ValueError as exc:
            log.warning("%s/%s is not JSON (%s): treated as absent", self.url, name, exc)
            return None
        return data if isinstance(data, dict) else None

    def completed(
        self,
        record: str,
        fingerprint: str,
        *,
        requires: Iterable[str] = (),
        at: Sequence[str] = FINGERPRINT_AT,
        what: str = "output",
    ) -> dict[str, Any] | None:
        """The record of an earlier run with the same `fingerprint` whose `requires` objects all exist, else None
        (tasks.lib.outputs.completed, in the bucket)."""
        data = self.read_record(record)
        found: Any = data
        for key in at:
            found = found.get(key) if isinstance(found, dict) else None
        if data is None or found != fingerprint:
            return None
        missing = [name for name in requires if not self._blob(name).exists()]
        if missing:
            log.info("%s/%s: recorded as complete but %s is gone: doing the work again", self.url, record,
                     ", ".join(missing))  # fmt: skip
            return None
        log.info("%s is complete for these inputs and params (%s/%s): not doing it again", what, self.url, record)
        return data

    def upload(self, directory: Path, *, record: str) -> None:
        """Upload every file of `directory` (not recursive), `record` last; an earlier record is deleted first."""
        from google.api_core.exceptions import NotFound
        from google.cloud.storage.retry import DEFAULT_RETRY

        if not (directory / record).is_file():
            raise FileNotFoundError(f"{directory / record}: the record to upload last is missing")
        with suppress(NotFound):
            self._blob(record).delete()
        files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != record)
        # Whole objects from files: retrying an upload is safe.
        for path in files:
            self._blob(path.name).upload_from_filename(str(path), retry=DEFAULT_RETRY)
        self._blob(record).upload_from_filename(
            str(directory / record), content_type="application/json", retry=DEFAULT_RETRY
        )
        log.info("uploaded %s to %s (%d files, %s last)", directory, self.url, len(files) + 1, record)

    def download(self, dest: Path, names: Iterable[str]) -> Path:
        """Fetch the objects `names` into `dest`, which is replaced whole (tasks.lib.files.atomic_dir).

        Raises:
            FileNotFoundError: an object is missing (`dest` is left as it was).
        """
        from google.api_core.exceptions import NotFound

        names = list(names)
        with atomic_dir(dest) as tmp:
            for name in names:
                try:
                    self._blob(name).download_to_filename(str(tmp / name))
                except NotFound as exc:
                    raise FileNotFoundError(f"{self.url}/{name}: no such object") from exc
        log.info("fetched %s into %s (%s)", self.url, dest, ", ".join(names))
        return dest
