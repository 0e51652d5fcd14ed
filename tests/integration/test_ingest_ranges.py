"""tasks.ingest on a Dask cluster (DASK_SCHEDULER_ADDRESS): the archive indexed in one pass, then read in ranges by
two worker processes with range requests to the object store (the GCS emulator), gives the single-process stream's
bytes and verdicts, repairs a range that started at an imitated header, and keeps the stream's refusals."""

from __future__ import annotations

import logging
import re
import tarfile
from pathlib import Path

import pytest

from tasks import ingest as ingest_module
from tasks.lib.checksums import Checksum
from tasks.lib.errors import ChecksumMismatchError, DownloadError, UnsafeArchiveError
from tasks.lib.files import file_digest
from tasks.lib.gcs import gcs_client
from tests.data.test_ingest_stream import PATCH, TILE, TOLERANT, _archive, _ingest, _member, _tree

pytestmark = pytest.mark.integration

# Seek points every 64 KiB: the 47-patch mirror (~6 MB) is cut into the 8 ranges two workers are given.
RANGES = [*TILE, *TOLERANT, "ingest.seek_spacing_kib=64"]


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as running:
        yield running.scheduler_address


@pytest.fixture
def on_cluster(cluster, gcs_emulator, monkeypatch):
    """The cluster's address in DASK_SCHEDULER_ADDRESS; the workers inherited STORAGE_EMULATOR_HOST's name, not its
    value, so it is set on them for this test's emulator."""
    from distributed import Client

    emulator, bucket = gcs_emulator
    with Client(cluster) as client:
        client.run(lambda: __import__("os").environ.__setitem__("STORAGE_EMULATOR_HOST", emulator))
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", cluster)
    return bucket


def _upload(path: Path, bucket: str) -> str:
    gcs_client().bucket(bucket).blob(f"datasets/{path.name}").upload_from_filename(path)
    return f"gs://{bucket}/datasets/{path.name}"


@pytest.fixture(scope="module")
def streamed(faulty_mirror, tmp_path_factory):
    """The faulty mirror through the single-process stream, tolerant enough to tile the rest."""
    return _ingest(faulty_mirror.archive, tmp_path_factory.mktemp("streamed") / "out", [*TILE, *TOLERANT])


def _assert_same(ranged, streamed) -> None:
    assert ranged.success and (ranged.patches, ranged.shards) == (streamed.patches, streamed.shards) == (37, 5)
    assert _tree(ranged.tiles) == _tree(streamed.tiles)  # shards, index, stats, metadata: every byte
    for key in ("checked", "valid", "quarantined", "unexpected_files", "ignored_files", "expectations", "success"):
        assert ranged.report[key] == streamed.report[key], key


def test_ranges_read_from_the_object_store_give_the_streams_bytes(on_cluster, faulty_mirror, streamed, tmp_path,
                                                                   caplog):  # fmt: skip
    url = _upload(faulty_mirror.archive, on_cluster)
    with caplog.at_level(logging.INFO, logger="tasks.ingest"):
        ranged = ingest_module.ingest(**_request(url, faulty_mirror.archive, tmp_path / "out"))
    assert any(f"reading {url} in 8 ranges on 2 Dask workers" in r.getMessage() for r in caplog.records)
    _assert_same(ranged, streamed)
    assert len(ranged.report["quarantined"]) == 10
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ingest.json", "tiles", "validated"]  # no copy


def _request(url: str, archive: Path, out: Path, checksum: Checksum | None = None) -> dict:
    """ingest()'s arguments as tests.data.test_ingest_stream._ingest builds them, for a URL."""
    from tasks.download import DownloadParams
    from tasks.ingest import IngestParams
    from tasks.lib.config import load_section
    from tasks.tile import TileParams
    from tasks.validate import ValidateParams

    def section(name, model):
        return load_section(name, model, overrides=[o for o in RANGES if o.startswith(f"{name}.")])

    return {
        "url": url,
        "checksum": checksum or Checksum("sha256", file_digest(archive, "sha256")),
        "out": out,
        "params": section("ingest", IngestParams),
        "validate_params": section("validate", ValidateParams),
        "tile_params": section("tile", TileParams),
        "download_params": load_section("download", DownloadParams),
    }


def test_a_range_started_at_an_imitated_header_is_read_again(on_cluster, faulty_mirror, streamed, tmp_path,
                                                            monkeypatch, caplog):  # fmt: skip
    """One patch gains a file whose contents are a valid tar header; a range is made to start exactly there."""
    archive, fake_at = _with_imitated_header(faulty_mirror.archive, tmp_path / "src")
    real_cuts = ingest_module._cuts
    monkeypatch.setattr(ingest_module, "_cuts", lambda *a: sorted({*real_cuts(*a), fake_at}))
    with caplog.at_level(logging.WARNING, logger="tasks.ingest"):
        ranged = ingest_module.ingest(**_request(str(archive), archive, tmp_path / "out"))
    assert any("read again from there" in r.getMessage() for r in caplog.records)
    stream_again = _ingest(archive, tmp_path / "stream", [*TILE, *TOLERANT])
    assert _tree(ranged.tiles) == _tree(stream_again.tiles)
    assert ranged.report["unexpected_files"] == stream_again.report["unexpected_files"] != []


def _with_imitated_header(source: Path, out: Path) -> tuple[Path, int]:
    """`source` rewritten with a file `imitation.bin` in its tenth folder, holding a tar header block; returns the
    archive and the uncompressed offset of that block."""

    def imitation(folder: tarfile.TarInfo) -> tuple[tarfile.TarInfo, bytes]:
        fake = tarfile.TarInfo(f"{Path(folder.name).parts[0]}/S2A_MSIL2A_20170613T101031_99_99")
        fake.type = tarfile.DIRTYPE
        return tarfile.TarInfo(f"{folder.name}/imitation.bin"), fake.tobuf(tarfile.PAX_FORMAT) + b"garbage" * 100

    path = _with_member(source, out, imitation, in_folder=10)
    with tarfile.open(path, "r:gz") as tar:
        return path, next(m.offset_data for m in tar if m.name.endswith("imitation.bin"))


def _with_member(source: Path, out: Path, extra, in_folder: int) -> Path:
    """`source` rewritten with the member `extra(folder)` makes added to its `in_folder`-th folder."""
    folders_seen, members = 0, []
    with tarfile.open(source, "r:gz") as tar:
        for member in tar:
            members.append((member, tar.extractfile(member).read() if member.isfile() else None))
            if member.isdir() and len(Path(member.name).parts) == 2:
                folders_seen += 1
                if folders_seen == in_folder:
                    members.append(extra(member))
    return _archive(out / source.name, members)


def test_an_unsafe_member_in_a_later_range_is_refused(on_cluster, faulty_mirror, tmp_path, caplog):
    """A range that searched for its start reports what it met; the driver raises it once the chain shows the start
    was right."""

    def link(folder: tarfile.TarInfo) -> tuple[tarfile.TarInfo, None]:
        info = tarfile.TarInfo(f"{folder.name}/escape")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        return info, None

    archive = _with_member(faulty_mirror.archive, tmp_path / "src", link, in_folder=40)
    with pytest.raises(UnsafeArchiveError, match=r"refusing member '.*/escape': it is a symlink"):
        ingest_module.ingest(**_request(str(archive), archive, tmp_path / "out"))
    assert list((tmp_path / "out").iterdir()) == []


def test_a_wrong_checksum_stops_before_any_range_is_read(on_cluster, faulty_mirror, tmp_path):
    url = _upload(faulty_mirror.archive, on_cluster)
    wrong = Checksum("sha256", "0" * 64)
    with pytest.raises(ChecksumMismatchError, match="nothing was written"):
        ingest_module.ingest(**_request(url, faulty_mirror.archive, tmp_path / "out", wrong))
    assert list((tmp_path / "out").iterdir()) == []


def test_unsafe_members_are_refused_in_a_range(on_cluster, tmp_path):
    members = [_member("top", tarfile.DIRTYPE), _member(f"top/{PATCH}", tarfile.DIRTYPE),
               _member(f"top/{PATCH}/ok.txt", data=b"fine"),
               _member(f"top/{PATCH}/link", tarfile.SYMTYPE, link="/etc/passwd")]  # fmt: skip
    src = _archive(tmp_path / "src" / "evil.tar.gz", members)
    with pytest.raises(UnsafeArchiveError, match=re.escape("refusing member 'top/" + PATCH + "/link'")):
        ingest_module.ingest(**_request(str(src), src, tmp_path / "out"))
    assert list((tmp_path / "out").iterdir()) == []


def test_a_missing_object_is_named(on_cluster, faulty_mirror, tmp_path):
    with pytest.raises(DownloadError, match=r"gs://.*/datasets/absent\.tar\.gz: no such object"):
        ingest_module.ingest(**_request(f"gs://{on_cluster}/datasets/absent.tar.gz", faulty_mirror.archive,
                                        tmp_path / "out"))  # fmt: skip
