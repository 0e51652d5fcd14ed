"""tasks.ingest: the archive streamed once gives what download → validate → tile give, byte for byte, and keeps
their guarantees (checksum first, unsafe members refused, atomic outputs, idempotent re-runs, a killed run)."""

from __future__ import annotations

import gzip
import io
import json
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import pytest
import zstandard

from tasks.download import DownloadParams
from tasks.ingest import INGEST_MANIFEST, IngestParams, ingest
from tasks.lib import bigearthnet as ben
from tasks.lib.checksums import Checksum
from tasks.lib.config import load_section
from tasks.lib.errors import ChecksumMismatchError, DownloadError, UnsafeArchiveError
from tasks.lib.files import file_digest
from tasks.lib.tiles import INDEX_FILE, MANIFEST_FILE, METADATA_FILE, STATS_FILE
from tasks.mirror import build_mirror
from tasks.tile import TileParams, tile
from tasks.validate import DATA_DOCS_INDEX, ValidateParams, validate
from tests.conftest import REPO, mirror_params

# Small shards, so that the permutation runs across several spool files and the last shard is a partial one.
TILE = ["tile.shard_patches=8", "tile.workers=1"]
TOLERANT = ["validate.max_bad_fraction=0.5"]


def _params(section: str, model, overrides: list[str]):
    return load_section(section, model, overrides=[o for o in overrides if o.startswith(f"{section}.")])


def _ingest(archive: Path, out: Path, overrides: list[str] = (), checksum: Checksum | None = None, workers: int = 1):
    return ingest(
        url=str(archive),
        checksum=checksum or Checksum("sha256", file_digest(archive, "sha256")),
        out=out,
        params=_params("ingest", IngestParams, [f"ingest.workers={workers}", "ingest.batch_patches=4", *overrides]),
        validate_params=_params("validate", ValidateParams, list(overrides)),
        tile_params=_params("tile", TileParams, list(overrides)),
        download_params=load_section("download", DownloadParams),
    )


def _extracted_path(root: Path, out: Path, overrides: list[str]) -> tuple[dict, Path]:
    """Today's path on an extracted tree: validate, then tile with the report."""
    report = validate(patches=root, out=out / "validated", params=_params("validate", ValidateParams, overrides))
    tiled = tile(
        patches=root, out=out / "tiles", params=_params("tile", TileParams, overrides), report=report.report_path
    )
    return report.report, tiled.out


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_same_outputs(streamed: Path, extracted: Path) -> None:
    a, b = _tree(streamed), _tree(extracted)
    assert sorted(a) == sorted(b)
    for name in (INDEX_FILE, STATS_FILE, MANIFEST_FILE, *(n for n in a if n.startswith("shards/"))):
        assert a[name] == b[name], f"{name} differs"
    assert pd.read_parquet(streamed / METADATA_FILE).equals(pd.read_parquet(extracted / METADATA_FILE))
    metadata_parts = [n for n in a if n.startswith(f"{METADATA_FILE}/")]
    assert metadata_parts and all(a[n] == b[n] for n in metadata_parts)


def _assert_same_verdicts(streamed: dict, extracted: dict) -> None:
    for key in ("checked", "valid", "quarantined", "suite_success", "success", "expectations", "cloud_fraction",
                "unexpected_files", "ignored_files", "params"):  # fmt: skip
        assert streamed[key] == extracted[key], key


@pytest.fixture(scope="module")
def faulty_both(faulty_mirror, faulty_mirror_root, tmp_path_factory):
    """The faulty mirror (every fault once) through both paths, tolerant enough to tile the rest."""
    work = tmp_path_factory.mktemp("faulty_both")
    streamed = _ingest(faulty_mirror.archive, work / "stream", [*TILE, *TOLERANT], workers=2)
    extracted = _extracted_path(faulty_mirror_root, work / "extracted", [*TILE, *TOLERANT])
    return streamed, extracted


def test_faulty_mirror_streamed_gives_the_extracted_paths_bytes(faulty_both):
    streamed, (_, tiles) = faulty_both
    assert streamed.success and streamed.patches == 37 and streamed.shards == 5
    _assert_same_outputs(streamed.tiles, tiles)


def test_faulty_mirror_streamed_quarantines_the_same_patches_for_the_same_reasons(faulty_both, faulty_mirror):
    streamed, (report, _) = faulty_both
    _assert_same_verdicts(streamed.report, report)
    assert len(streamed.report["quarantined"]) == len(faulty_mirror.faults) == 10
    assert (streamed.validated / DATA_DOCS_INDEX).exists()
    assert json.loads((streamed.validated / "report.json").read_text()) == streamed.report


def test_all_bands_streamed_give_the_extracted_paths_bytes(small_mirror, small_mirror_root, tmp_path):
    overrides = [*TILE, "tile.bands=all"]
    streamed = _ingest(small_mirror.archive, tmp_path / "stream", overrides)
    report, tiles = _extracted_path(small_mirror_root, tmp_path / "extracted", overrides)
    _assert_same_verdicts(streamed.report, report)
    _assert_same_outputs(streamed.tiles, tiles)


def test_failed_validation_publishes_the_report_and_tiles_nothing(faulty_mirror, tmp_path):
    result = _ingest(faulty_mirror.archive, tmp_path / "out", TILE)
    assert not result.success and result.tiles is None
    assert "10 of 47 patches quarantined" in _failure(result.report)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["validated"]


def _failure(report: dict) -> str:
    from tasks.validate import failure_summary

    return failure_summary(report)


def test_rerun_is_skipped_until_params_change(small_mirror, tmp_path):
    out = tmp_path / "out"
    assert not _ingest(small_mirror.archive, out, TILE).skipped
    again = _ingest(small_mirror.archive, out, TILE)
    assert again.skipped and again.patches == 46
    assert not _ingest(small_mirror.archive, out, ["tile.shard_patches=16"]).skipped
    assert len(json.loads((out / "tiles" / MANIFEST_FILE).read_text())["shards"]) == 3


def test_a_wrong_checksum_leaves_nothing(small_mirror, tmp_path):
    with pytest.raises(ChecksumMismatchError, match=r"sha256 mismatch: expected 0{64}"):
        _ingest(small_mirror.archive, tmp_path / "out", TILE, checksum=Checksum("sha256", "0" * 64))
    assert list((tmp_path / "out").iterdir()) == []


# --- unsafe and unusual archives ------------------------------------------------------------------------------------


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = None, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    if kind == tarfile.DIRTYPE:
        info.mode = 0o755
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info, data


def _archive(path: Path, members: list[tuple], compression: str = "gz") -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    raw = {"gz": gzip.compress, "zst": zstandard.ZstdCompressor().compress, "": bytes}[compression](raw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return path


PATCH = "S2B_MSIL2A_20180204T94161_57_38"
UNSAFE = {
    "dotdot": lambda outside: _member(f"top/{PATCH}/../../../evil.txt", data=b"escaped"),
    "absolute": lambda outside: _member(f"{outside}/evil.txt", data=b"escaped"),
    "symlink": lambda outside: _member(f"top/{PATCH}/link", tarfile.SYMTYPE, link=str(outside)),
    "hardlink": lambda outside: _member(f"top/{PATCH}/hard", tarfile.LNKTYPE, link=f"top/{PATCH}/ok.txt"),
    "fifo": lambda outside: _member(f"top/{PATCH}/pipe", tarfile.FIFOTYPE),
    "chardev": lambda outside: _member(f"top/{PATCH}/null", tarfile.CHRTYPE),
    "blockdev": lambda outside: _member(f"top/{PATCH}/disk", tarfile.BLKTYPE),
}
SUFFIX = {"gz": ".tar.gz", "zst": ".tar.zst", "": ".tar"}


@pytest.mark.parametrize("compression", ["gz", "zst", ""])
@pytest.mark.parametrize("kind", sorted(UNSAFE))
def test_unsafe_members_are_refused_by_name_and_nothing_is_written(tmp_path, kind, compression):
    outside = tmp_path / "outside"
    evil = UNSAFE[kind](outside)
    harmless = [_member("top", tarfile.DIRTYPE), _member(f"top/{PATCH}", tarfile.DIRTYPE),
                _member(f"top/{PATCH}/ok.txt", data=b"fine")]  # fmt: skip
    src = _archive(tmp_path / "src" / f"evil{SUFFIX[compression]}", [*harmless, evil], compression)
    with pytest.raises(UnsafeArchiveError, match=re.escape(f"refusing member {evil[0].name!r}")):
        _ingest(src, tmp_path / "out", TILE)
    assert list((tmp_path / "out").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_folders_that_come_back_later_are_refused(tmp_path):
    other = "S2A_MSIL2A_20170613T101031_87_48"
    src = _archive(tmp_path / "split.tar.gz", [
        _member(f"top/{PATCH}/a.txt", data=b"1"), _member(f"top/{other}/b.txt", data=b"2"),
        _member(f"top/{PATCH}/c.txt", data=b"3"),
    ])  # fmt: skip
    with pytest.raises(DownloadError, match=f"of folder {PATCH} comes after other folders' members"):
        _ingest(src, tmp_path / "out", TILE)
    assert list((tmp_path / "out").iterdir()) == []


def test_an_archive_without_patch_folders_is_refused(tmp_path):
    src = _archive(tmp_path / "docs.tar.gz", [_member("top/README/a.txt", data=b"hello")])
    with pytest.raises(DownloadError, match="holds no BigEarthNet patch folders"):
        _ingest(src, tmp_path / "out", TILE)
    assert list((tmp_path / "out").iterdir()) == []


# --- a killed run ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def larger_mirror(tmp_path_factory):
    return build_mirror(out=tmp_path_factory.mktemp("larger_mirror"), params=mirror_params(patches=300, seed=9))


def test_a_run_killed_mid_stream_leaves_nothing_final_and_a_rerun_completes(larger_mirror, tmp_path):
    out = tmp_path / "out"
    archive = larger_mirror.archive
    command = [sys.executable, "-m", "tasks.ingest", "--url", archive.as_uri(), "--out", str(out),
               "--sha256", larger_mirror.sha256, "--set", "ingest.workers=1", "--set", "ingest.batch_patches=2",
               *(a for o in TILE for a in ("--set", o))]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        # Killed once the stream has filled a few spool files: well inside the stream, long before the end.
        while not list(out.glob(".tiles.*.tmp/shards/shard-00002.npy")):
            assert process.poll() is None, process.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the stream never started"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "validated").exists() and not (out / "tiles").exists() and not (out / INGEST_MANIFEST).exists()

    result = _ingest(archive, out, TILE)
    assert result.success and result.patches == len(larger_mirror.patch_ids)
    assert sorted(p.name for p in out.iterdir()) == [INGEST_MANIFEST, "tiles", "validated"]


def test_the_real_example_patches_stream_clean(tmp_path):
    """bigearthnet-common's archive of 6 real patches (bzip2, its own top folder) through the stream."""
    archive = ben.example_archive()
    result = _ingest(archive, tmp_path / "out", TILE, checksum=Checksum("md5", file_digest(archive, "md5")))
    assert result.success and result.report["checked"] == 6 and result.patches == 6
    assert json.loads((tmp_path / "out" / INGEST_MANIFEST).read_text())["root"] == ben.EXAMPLE_TOP_FOLDER
