"""tasks.download against real servers on loopback: HTTP (resume, retries, Range quirks) and the GCS emulator."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.download import EXTRACTED_DIR, MANIFEST_NAME, DownloadParams, download, resolve_request
from tasks.lib.bigearthnet import EXAMPLE_TOP_FOLDER, example_archive
from tasks.lib.checksums import Checksum
from tasks.lib.config import load_section
from tasks.lib.errors import ChecksumMismatchError, DownloadError, SourceUnavailableError, is_permanent
from tasks.lib.transports import PART_SUFFIX, SIDECAR_SUFFIX

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ARCHIVE = example_archive()
NAME = ARCHIVE.name
SHA256 = hashlib.sha256(ARCHIVE.read_bytes()).hexdigest()
MD5 = hashlib.md5(ARCHIVE.read_bytes()).hexdigest()
# Small chunks so an interrupted transfer leaves most of what arrived in the part file.
PARAMS = load_section("download", DownloadParams).model_copy(
    update={"retries": 0, "backoff_seconds": 0.0, "timeout_seconds": 10.0, "chunk_bytes": 16384}
)
DROP_AFTER = 300_000  # of the example's 629,629 bytes


def _params(**update: object) -> DownloadParams:
    return PARAMS.model_copy(update=update)


def _serve_example(http_server) -> str:
    shutil.copyfile(ARCHIVE, http_server.root / NAME)
    return http_server.url(NAME)


def _assert_example(root: Path, dest: Path) -> None:
    assert root == dest / EXTRACTED_DIR / EXAMPLE_TOP_FOLDER
    patches = [p for p in root.iterdir() if p.is_dir()]
    assert len(patches) == 6
    assert all(len(list(p.iterdir())) == 13 for p in patches)
    assert hashlib.sha256((dest / NAME).read_bytes()).hexdigest() == SHA256


@pytest.mark.parametrize("checksum", [Checksum("sha256", SHA256), Checksum("md5", MD5)], ids=["sha256", "md5"])
def test_http_download_then_rerun_makes_no_request(tmp_path: Path, http_server, checksum: Checksum) -> None:
    url = _serve_example(http_server)
    dest = tmp_path / "dest"

    first = download(url=url, dest=dest, checksum=checksum, params=PARAMS)

    _assert_example(first.root, dest)
    assert not first.skipped
    assert json.loads(first.manifest.read_text())["url"] == url
    seen = len(http_server.requests)
    assert seen == 1

    second = download(url=url, dest=dest, checksum=checksum, params=PARAMS)

    assert second.skipped and second.root == first.root
    assert len(http_server.requests) == seen


def test_wrong_checksum_over_http_leaves_nothing(tmp_path: Path, http_server) -> None:
    url = _serve_example(http_server)
    dest = tmp_path / "dest"
    with pytest.raises(ChecksumMismatchError, match=f"expected {'0' * 32}, got {MD5}"):
        download(url=url, dest=dest, checksum=Checksum("md5", "0" * 32), params=PARAMS)
    assert list(dest.iterdir()) == []


def test_killed_download_resumes_with_a_range_request(tmp_path: Path, http_server) -> None:
    url = _serve_example(http_server)
    dest = tmp_path / "dest"
    part = dest / f"{NAME}{PART_SUFFIX}"
    http_server.drop_after = DROP_AFTER

    with pytest.raises(DownloadError, match=rf"{re.escape(url)}: failed after 1 attempt"):
        download(url=url, dest=dest, checksum=Checksum("sha256", SHA256), params=PARAMS)

    size = part.stat().st_size
    assert 0 < size <= DROP_AFTER
    assert ARCHIVE.read_bytes()[:size] == part.read_bytes()
    assert (dest / f"{NAME}{SIDECAR_SUFFIX}").exists()
    assert not (dest / NAME).exists() and not (dest / EXTRACTED_DIR).exists()

    result = download(url=url, dest=dest, checksum=Checksum("sha256", SHA256), params=PARAMS)

    resumed = http_server.requests[-1]
    assert resumed.range == f"bytes={size}-"
    assert resumed.if_range == http_server.etag(http_server.root / NAME)
    _assert_example(result.root, dest)
    assert json.loads(result.manifest.read_text())["checksum"] == SHA256
    assert not part.exists() and not (dest / f"{NAME}{SIDECAR_SUFFIX}").exists()


def test_retry_within_one_run_resumes_from_the_part(tmp_path: Path, http_server) -> None:
    url = _serve_example(http_server)
    dest = tmp_path / "dest"
    http_server.drop_after = DROP_AFTER

    result = download(url=url, dest=dest, checksum=Checksum("sha256", SHA256), params=_params(retries=2))

    _assert_example(result.root, dest)
    first, second = http_server.requests
    assert first.range is None
    assert second.range is not None and second.range.startswith("bytes=")
    assert 0 < int(second.range.removeprefix("bytes=").rstrip("-")) <= DROP_AFTER


def test_server_ignoring_range_restarts_from_zero(tmp_path: Path, http_server) -> None:
    url = _serve_example(http_server)
    dest = tmp_path / "dest"
    http_server.drop_after = DROP_AFTER
    with pytest.raises(DownloadError):
        download(url=url, dest=dest, checksum=Checksum("sha256", SHA256), params=PARAMS)
    http_server.ignore_range = True

    result = download(url=url, dest=dest, checksum=Checksum("sha256", SHA256), params=PARAMS)

    assert http_server.requests[-1].range is not None  # asked for a range, got the whole file (200)
    _assert_example(result.root, dest)


def test_changed_remote_file_is_not_glued_onto_the_old_part(tmp_path: Path, http_server) -> None:
    url = _serve_example(http_server)
    dest = tmp_path / "dest"
    http_server.drop_after = DROP_AFTER
    with pytest.raises(DownloadError):
        download(url=url, dest=dest, checksum=Checksum("sha256", SHA256), params=PARAMS)
    # A new version of the file appears (same bytes here, new mtime → new ETag): If-Range must not match.
    served = http_server.root / NAME
    served.write_bytes(served.read_bytes())

    result = download(url=url, dest=dest, checksum=Checksum("sha256", SHA256), params=PARAMS)

    assert http_server.requests[-1].if_range is not None
    assert http_server.requests[-1].if_range != http_server.etag(served)
    _assert_example(result.root, dest)


def test_transient_503_is_retried(tmp_path: Path, http_server) -> None:
    url = _serve_example(http_server)
    http_server.fail_next = [503, 429]

    result = download(url=url, dest=tmp_path / "dest", checksum=Checksum("md5", MD5), params=_params(retries=2))

    _assert_example(result.root, tmp_path / "dest")
    assert len(http_server.requests) == 3


def test_persistent_503_gives_up_after_the_retries(tmp_path: Path, http_server) -> None:
    url = _serve_example(http_server)
    http_server.fail_next = [503] * 5

    with pytest.raises(DownloadError, match=rf"{re.escape(url)}: failed after 3 attempt.*HTTP 503"):
        download(url=url, dest=tmp_path / "dest", checksum=Checksum("md5", MD5), params=_params(retries=2))
    assert len(http_server.requests) == 3


def test_404_fails_at_once(tmp_path: Path, http_server) -> None:
    url = http_server.url("missing.tar.gz")

    with pytest.raises(DownloadError, match=rf"{re.escape(url)}: HTTP 404"):
        download(url=url, dest=tmp_path / "dest", checksum=Checksum("md5", MD5), params=_params(retries=3))
    assert len(http_server.requests) == 1


def test_refused_connection_is_retried_then_reported(tmp_path: Path) -> None:
    # A bound but not listening socket: connecting to it is refused, and no other process can take the port.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/{NAME}"
        with pytest.raises(DownloadError, match=rf"{re.escape(url)}: failed after 2 attempt.*ConnectionError"):
            download(url=url, dest=tmp_path / "dest", checksum=Checksum("md5", MD5), params=_params(retries=1))


def test_checksum_url_over_http(tmp_path: Path, http_server) -> None:
    url = _serve_example(http_server)
    (http_server.root / f"{NAME}.sha256").write_text(f"{SHA256}  {NAME}\n")

    resolved, checksum = resolve_request(
        url=url, source=None, checksum_url=http_server.url(f"{NAME}.sha256"), params=PARAMS
    )
    result = download(url=resolved, dest=tmp_path / "dest", checksum=checksum, params=PARAMS)

    assert checksum == Checksum("sha256", SHA256)
    _assert_example(result.root, tmp_path / "dest")


# --- whether a failure is worth retrying later (SourceUnavailableError) or not ---------------------------


@pytest.mark.parametrize("status", [503, 429])
def test_a_source_that_keeps_failing_is_a_transient_error(tmp_path: Path, http_server, status: int) -> None:
    url = _serve_example(http_server)
    http_server.fail_next = [status] * 3
    dest = tmp_path / "dest"

    with pytest.raises(SourceUnavailableError, match=rf"{re.escape(url)}: failed after 3 attempt.*HTTP {status}") as e:
        download(url=url, dest=dest, checksum=Checksum("md5", MD5), params=_params(retries=2))

    assert e.value.transient and not is_permanent(e.value)
    assert len(http_server.requests) == 3
    assert not (dest / MANIFEST_NAME).exists()


def test_a_refused_connection_on_every_attempt_is_a_transient_error(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/{NAME}"
        with pytest.raises(SourceUnavailableError, match="ConnectionError") as e:
            download(url=url, dest=tmp_path / "dest", checksum=Checksum("md5", MD5), params=_params(retries=1))
    assert e.value.transient


def test_a_checksum_url_that_keeps_failing_is_a_transient_error(http_server) -> None:
    url = _serve_example(http_server)
    (http_server.root / "SHA256SUMS").write_text(f"{SHA256}  {NAME}\n")
    http_server.fail_next = [503] * 2
    sums = http_server.url("SHA256SUMS")

    with pytest.raises(SourceUnavailableError, match=rf"{re.escape(sums)}: failed after 2 attempt.*HTTP 503") as e:
        resolve_request(url=url, source=None, checksum_url=sums, params=_params(retries=1))
    assert e.value.transient


def test_404_is_a_permanent_error(tmp_path: Path, http_server) -> None:
    url = http_server.url("missing.tar.gz")

    with pytest.raises(DownloadError, match=rf"{re.escape(url)}: HTTP 404") as e:
        download(url=url, dest=tmp_path / "dest", checksum=Checksum("md5", MD5), params=_params(retries=3))

    assert not isinstance(e.value, SourceUnavailableError)
    assert not e.value.transient and is_permanent(e.value)
    assert len(http_server.requests) == 1


def test_a_missing_checksum_file_is_a_permanent_error(http_server) -> None:
    url = _serve_example(http_server)
    sums = http_server.url("SHA256SUMS")

    with pytest.raises(DownloadError, match=rf"{re.escape(sums)}: HTTP 404") as e:
        resolve_request(url=url, source=None, checksum_url=sums, params=_params(retries=3))

    assert not e.value.transient and is_permanent(e.value)
    assert len(http_server.requests) == 1


def test_a_checksum_mismatch_over_http_is_a_permanent_error(tmp_path: Path, http_server) -> None:
    url = _serve_example(http_server)

    with pytest.raises(ChecksumMismatchError) as e:
        download(url=url, dest=tmp_path / "dest", checksum=Checksum("sha256", "0" * 64), params=_params(retries=3))

    assert not e.value.transient and is_permanent(e.value)
    assert len(http_server.requests) == 1  # not retried


# --- gs:// against gcp-storage-emulator -----------------------------------------------------------------


def _upload(blob_name: str, data: bytes) -> int:
    from tasks.lib.gcs import gcs_client

    blob = gcs_client().bucket("cloudscreen").blob(blob_name)
    blob.upload_from_string(data)
    return int(blob.generation)


def test_gs_download_from_the_emulator(tmp_path: Path, gcs_emulator) -> None:
    _, bucket = gcs_emulator
    _upload(f"datasets/{NAME}", ARCHIVE.read_bytes())
    (tmp_path / "sums").write_text(f"{MD5}  {NAME}\n")
    _upload("datasets/MD5SUMS", (tmp_path / "sums").read_bytes())
    url = f"gs://{bucket}/datasets/{NAME}"

    resolved, checksum = resolve_request(
        url=url, source=None, checksum_url=f"gs://{bucket}/datasets/MD5SUMS", params=PARAMS
    )
    result = download(url=resolved, dest=tmp_path / "dest", checksum=checksum, params=PARAMS)

    _assert_example(result.root, tmp_path / "dest")
    assert json.loads(result.manifest.read_text())["url"] == url
    assert download(url=url, dest=tmp_path / "dest", checksum=checksum, params=PARAMS).skipped


def test_gs_resumes_the_same_generation_and_restarts_on_a_new_one(tmp_path: Path, gcs_emulator) -> None:
    _, bucket = gcs_emulator
    data = ARCHIVE.read_bytes()
    generation = _upload(f"datasets/{NAME}", data)
    url = f"gs://{bucket}/datasets/{NAME}"
    dest = tmp_path / "dest"
    checksum = Checksum("sha256", SHA256)

    def interrupted(head: bytes, sidecar_generation: int) -> None:
        """What a killed run leaves (the emulator cannot be told to drop a connection): part + sidecar."""
        dest.mkdir(exist_ok=True)
        (dest / f"{NAME}{PART_SUFFIX}").write_bytes(head)
        sidecar = {"url": url, "generation": sidecar_generation}
        (dest / f"{NAME}{SIDECAR_SUFFIX}").write_text(json.dumps(sidecar))

    # The true head + the same generation: only a ranged read from exactly the part's size verifies.
    interrupted(data[:DROP_AFTER], generation)
    _assert_example(download(url=url, dest=dest, checksum=checksum, params=PARAMS).root, dest)

    # A wrong head with the same generation is kept (resumed), so the digest exposes it...
    shutil.rmtree(dest)
    interrupted(b"\0" * DROP_AFTER, generation)
    with pytest.raises(ChecksumMismatchError):
        download(url=url, dest=dest, checksum=checksum, params=PARAMS)

    # ...while a part from another generation is thrown away and the object fetched from byte 0.
    interrupted(b"\0" * DROP_AFTER, generation - 1)
    _assert_example(download(url=url, dest=dest, checksum=checksum, params=PARAMS).root, dest)


def test_gs_missing_object_fails_at_once(tmp_path: Path, gcs_emulator) -> None:
    _, bucket = gcs_emulator
    url = f"gs://{bucket}/nope.tar.gz"
    with pytest.raises(DownloadError, match=rf"{re.escape(url)}: no such object"):
        download(url=url, dest=tmp_path / "dest", checksum=Checksum("md5", MD5), params=_params(retries=3))


def test_gs_transient_errors_are_retried(tmp_path: Path, http_server, monkeypatch: pytest.MonkeyPatch) -> None:
    # The loopback server plays a GCS endpoint that answers 503 once, then 404 (its root has no such object):
    # the 503 must be retried, the 404 must end the download at once with a clear message.
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", http_server.base_url)
    object_path = f"/storage/v1/b/cloudscreen/o/{NAME}"
    http_server.fail_next, http_server.fail_prefix = [503], object_path
    url = f"gs://cloudscreen/{NAME}"

    with pytest.raises(DownloadError, match=rf"{re.escape(url)}: no such object"):
        download(url=url, dest=tmp_path / "dest", checksum=Checksum("md5", MD5), params=_params(retries=3))
    # Only object requests count: the client also fetches bucket metadata in a background thread.
    assert len([r for r in http_server.requests if r.path.startswith(object_path)]) == 2


def test_gs_source_that_keeps_failing_is_a_transient_error(
    tmp_path: Path, http_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", http_server.base_url)
    object_path = f"/storage/v1/b/cloudscreen/o/{NAME}"
    http_server.fail_next, http_server.fail_prefix = [503] * 2, object_path
    url = f"gs://cloudscreen/{NAME}"

    with pytest.raises(SourceUnavailableError, match=rf"{re.escape(url)}: failed after 2 attempt") as e:
        download(url=url, dest=tmp_path / "dest", checksum=Checksum("md5", MD5), params=_params(retries=1))
    assert e.value.transient
    assert len([r for r in http_server.requests if r.path.startswith(object_path)]) == 2


# --- the command line -----------------------------------------------------------------------------------


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tasks.download", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_prints_the_root(tmp_path: Path, http_server) -> None:
    url = _serve_example(http_server)
    dest = tmp_path / "dest"

    done = _cli("--url", url, "--sha256", SHA256, "--dest", dest)

    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{dest / EXTRACTED_DIR / EXAMPLE_TOP_FOLDER}\n"
    assert (dest / MANIFEST_NAME).exists()


def test_cli_source_from_a_params_file(tmp_path: Path, http_server) -> None:
    url = _serve_example(http_server)
    (http_server.root / "SHA256SUMS").write_text(f"{'1' * 64}  other.tar\n{SHA256}  {NAME}\n")
    params = tmp_path / "params.yaml"
    params.write_text(
        "download:\n"
        f"  sources:\n    local:\n      url: {url}\n      checksum_url: {http_server.url('SHA256SUMS')}\n"
        "  retries: 0\n  backoff_seconds: 0\n  backoff_max_seconds: 0\n  timeout_seconds: 10\n"
        "  chunk_bytes: 65536\n"
    )
    dest = tmp_path / "dest"

    done = _cli("--source", "local", "--dest", dest, "--params", params, "--set", "download.retries=1")

    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{dest / EXTRACTED_DIR / EXAMPLE_TOP_FOLDER}\n"


def test_cli_bad_checksum_is_a_one_line_error(tmp_path: Path, http_server) -> None:
    url = _serve_example(http_server)

    done = _cli("--url", url, "--md5", "0" * 32, "--dest", tmp_path / "dest")

    assert done.returncode == 2
    assert done.stdout == ""
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "md5 mismatch: expected" in errors[0]
    assert "Traceback" not in done.stderr


def test_cli_without_a_checksum_is_a_one_line_error(tmp_path: Path) -> None:
    done = _cli("--url", ARCHIVE, "--dest", tmp_path / "dest")

    assert done.returncode == 2
    assert "a checksum is required" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "dest").exists()
