"""The object-store client: Google Cloud Storage, or its emulator when STORAGE_EMULATOR_HOST is set."""

from __future__ import annotations

import os


def gcs_client():
    """A google-cloud-storage client; honours STORAGE_EMULATOR_HOST (anonymous) and otherwise uses ADC.

    Credentials come from the environment at call time (Workload Identity, ADC), never from files in the image.
    """
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(
            project=os.environ.get("GOOGLE_CLOUD_PROJECT", "cloudscreen-local"),
            credentials=AnonymousCredentials(),
        )
    return storage.Client()


def split_gs_url(url: str) -> tuple[str, str]:
    """`gs://bucket/path/to/blob` → (bucket, path/to/blob)."""
    bucket, _, blob = url.removeprefix("gs://").partition("/")
    if not bucket or not blob:
        raise ValueError(f"{url!r}: expected gs://BUCKET/PATH")
    return bucket, blob
