"""The trainer's resumable state: a checkpoint directory on local disk, mirrored to the object store when asked.

A checkpoint is `run.json` (tasks.train's state: which MLflow run, epochs done, wall time spent, ...) and the files it
names in its `files` mapping (name → MD5), each written under a name of its own (the epoch it holds) before run.json
names it. run.json is written last, so it is the commit: a kill at any moment leaves the previous commit whole, and a
reader trusts only files run.json names whose MD5 matches.

In the object store (`gs://BUCKET/PREFIX`, on machines that can vanish: spot GPUs, a pod rescheduled elsewhere with an
empty disk) the same rule holds: the named files are uploaded first, run.json (one object, replaced atomically) last,
then objects no commit names any more are deleted. A trainer started anywhere pulls the last commit into its local
directory and resumes from it.
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import suppress
from pathlib import Path
from typing import Any

from tasks.lib.files import file_digest
from tasks.lib.gcs import gcs_client, split_gs_url

log = logging.getLogger(__name__)

STATE_FILE = "run.json"


def file_md5(path: Path) -> str:
    """The digest run.json records for each file it names."""
    return file_digest(path, "md5")


def read_local(directory: Path) -> dict[str, Any] | None:
    """The committed state in `directory`, or None when there is none or it names a missing or damaged file."""
    path = directory / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as exc:  # run.json is replaced atomically: this is damage, not a kill mid-write
        log.warning("%s is not JSON (%s): not resuming from it", path, exc)
        return None
    for name, md5 in (state.get("files") or {}).items():
        if not (directory / name).is_file() or file_md5(directory / name) != md5:
            log.warning("%s names %s, missing or damaged: not resuming from it", path, name)
            return None
    return state


def prune_local(directory: Path, state: dict[str, Any]) -> None:
    """Delete the files of earlier commits (anything but run.json and the files it names)."""
    keep = {STATE_FILE, *(state.get("files") or {})}
    for path in directory.iterdir():
        if path.is_file() and path.name not in keep and not path.name.startswith("."):
            path.unlink(missing_ok=True)


class RemoteCheckpoint:
    """A checkpoint directory mirrored to `gs://BUCKET/PREFIX/` (google-cloud-storage; the emulator when
    STORAGE_EMULATOR_HOST is set)."""

    def __init__(self, url: str) -> None:
        bucket, prefix = split_gs_url(url.rstrip("/"))
        self.url = url.rstrip("/")
        self._bucket = gcs_client().bucket(bucket)
        self._prefix = prefix + "/"
        self._uploaded: dict[str, str] = {}  # name → MD5 of what the bucket holds

    def pull(self, directory: Path) -> None:
        """Make `directory` hold the bucket's last commit, or nothing when there is none (or it cannot be trusted)."""
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        state_blob = self._bucket.blob(self._prefix + STATE_FILE)
        if not state_blob.exists():
            log.info("%s holds no checkpoint: training from the start", self.url)
            return
        state_blob.download_to_filename(str(directory / STATE_FILE))
        state = json.loads((directory / STATE_FILE).read_text())
        for name in state.get("files") or {}:
            blob = self._bucket.blob(self._prefix + name)
            if not blob.exists():
                break
            blob.download_to_filename(str(directory / name))
        if read_local(directory) is None:
            log.warning("%s: its run.json names a missing or damaged file: training from the start", self.url)
            shutil.rmtree(directory)
            directory.mkdir(parents=True)
            return
        self._uploaded = dict(state.get("files") or {})
        log.info("pulled %s (epoch %s of run %s)", self.url, state.get("epochs"), state.get("run_id"))

    def push(self, directory: Path) -> None:
        """Upload `directory`'s commit: the files run.json names that the bucket lacks, then run.json; then delete
        what no commit names any more."""
        from google.api_core.exceptions import NotFound
        from google.cloud.storage.retry import DEFAULT_RETRY

        state = json.loads((directory / STATE_FILE).read_text())
        files: dict[str, str] = state.get("files") or {}
        for name, md5 in files.items():
            if self._uploaded.get(name) != md5:
                # Immutable contents under each name: retrying an upload is safe.
                self._bucket.blob(self._prefix + name).upload_from_filename(str(directory / name), retry=DEFAULT_RETRY)
                self._uploaded[name] = md5
        self._bucket.blob(self._prefix + STATE_FILE).upload_from_filename(
            str(directory / STATE_FILE), content_type="application/json", retry=DEFAULT_RETRY
        )
        for name in [n for n in self._uploaded if n not in files]:
            with suppress(NotFound):
                self._bucket.blob(self._prefix + name).delete()
            del self._uploaded[name]
