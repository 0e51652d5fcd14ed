"""The ingest stages chained as a user runs them: archive served on loopback → download → validate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.download import DownloadParams, download, resolve_request
from tasks.lib import bigearthnet as ben
from tasks.lib.config import load_section
from tasks.lib.files import file_digest
from tasks.lib.gcs import gcs_client
from tasks.validate import DATA_DOCS_INDEX, ValidateParams, validate
from tests.conftest import REPO

pytestmark = pytest.mark.integration


def test_real_example_archive_from_the_bucket_downloads_and_validates_clean(tmp_path: Path, gcs_emulator) -> None:
    _, bucket = gcs_emulator
    archive = ben.example_archive()
    gcs_client().bucket(bucket).blob(f"datasets/{archive.name}").upload_from_filename(archive)
    params = load_section("download", DownloadParams)
    url, checksum = resolve_request(
        url=f"gs://{bucket}/datasets/{archive.name}", source=None, md5=file_digest(archive, "md5"), params=params
    )
    fetched = download(url=url, dest=tmp_path / "raw", checksum=checksum, params=params)
    assert fetched.root.name == ben.EXAMPLE_TOP_FOLDER

    result = validate(patches=fetched.root, out=tmp_path / "validated", params=load_section("validate", ValidateParams))
    assert result.success and result.report["checked"] == 6 and result.report["quarantined"] == []
    assert (tmp_path / "validated" / DATA_DOCS_INDEX).exists()


def test_faulty_mirror_over_http_through_both_command_lines(tmp_path: Path, http_server, faulty_mirror) -> None:
    for suffix in ("", ".sha256"):
        shutil.copy(faulty_mirror.archive.with_name(faulty_mirror.archive.name + suffix), http_server.root)
    name = faulty_mirror.archive.name

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True)

    fetched = run("tasks.download", "--url", http_server.url(name), "--checksum-url", http_server.url(name + ".sha256"),
                  "--dest", str(tmp_path / "raw"))  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr
    root = Path(fetched.stdout.strip())
    assert root == tmp_path / "raw" / "extracted" / name.removesuffix(".tar.gz")

    validated = run("tasks.validate", "--patches", str(root), "--out", str(tmp_path / "validated"))
    assert validated.returncode == 2
    assert "patches quarantined" in validated.stderr and "Traceback" not in validated.stderr
    report = json.loads((tmp_path / "validated" / "report.json").read_text())
    assert len(report["quarantined"]) == len(faulty_mirror.faults)
    assert report["checked"] == len(faulty_mirror.patch_ids)
