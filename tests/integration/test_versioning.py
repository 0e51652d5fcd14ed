"""Data versions against the GCS emulator: push, restore byte for byte, content addressing, concurrent snapshots."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.lib.config import load_section
from tasks.lib.errors import ConfigError
from tasks.sample import SampleParams, sample
from tasks.tile import TileParams, state_path, tile
from tasks.versioning import (
    DVC_FILE,
    RECORD_FILE,
    UnknownVersionError,
    VersioningError,
    VersioningParams,
    data_version,
    push,
    restore,
)
from tests.conftest import REPO

pytestmark = pytest.mark.integration

VERSION = re.compile(r"[0-9a-f]{32}\.dir")


def _files(root: Path) -> dict[str, bytes]:
    """Every file under `root` by relative path, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _copy_snapshot(snapshot: Path, dest: Path) -> Path:
    shutil.copytree(snapshot, dest)
    return dest


@pytest.fixture(scope="module")
def snapshot(small_mirror_root, tmp_path_factory) -> Path:
    """One snapshot's step outputs, made by the steps themselves: SNAPSHOT/tiles and SNAPSHOT/samples/small."""
    root = tmp_path_factory.mktemp("snapshot")
    tile_params = load_section("tile", TileParams, overrides=["tile.shard_patches=16", "tile.workers=1"])
    tile(patches=small_mirror_root, out=root / "tiles", params=tile_params)
    state_path(root / "tiles").unlink()  # tile's own re-run bookkeeping beside its output, not part of the data
    sample_params = load_section("sample", SampleParams, overrides=["sample.small_per_class=10"])
    sample(tiles=root / "tiles", out=root / "samples", dataset="small", params=sample_params)
    return root


@pytest.fixture
def params(gcs_emulator) -> VersioningParams:
    _, bucket = gcs_emulator
    return load_section("versioning", VersioningParams, overrides=[f"versioning.remote=gs://{bucket}/dvc"])


def test_push_then_restore_after_the_local_copy_is_gone_is_byte_identical(snapshot, params, tmp_path):
    local = _copy_snapshot(snapshot, tmp_path / "local")
    pushed = push(snapshot="2026-03-01", tiles=local / "tiles", samples=local / "samples", out=tmp_path / "record",
                  params=params)  # fmt: skip
    assert VERSION.fullmatch(pushed.data.version) and pushed.uploaded > 0
    assert pushed.data.files == len(_files(snapshot))
    assert pushed.record == tmp_path / "record" / RECORD_FILE
    record = json.loads(pushed.record.read_text())
    assert record["version"] == pushed.data.version and record["snapshot"] == "2026-03-01"
    assert record["parts"] == {"tiles": pushed.data.tiles, "samples": pushed.data.samples}
    assert f"md5: {pushed.data.version}" in (tmp_path / "record" / DVC_FILE).read_text()
    shutil.rmtree(local)

    dest = tmp_path / "restored"
    dest.mkdir()
    (dest / "stale.txt").write_text("from before the restore")
    restored = restore(version=pushed.data.version, dest=dest, params=params)
    assert restored.files == pushed.data.files and restored.size == pushed.data.size
    assert _files(dest) == {f"tiles/{k}": v for k, v in _files(snapshot / "tiles").items()} | {
        f"samples/{k}": v for k, v in _files(snapshot / "samples").items()
    }
    # Restored files are ordinary files, not the write-protected hard links of a DVC cache.
    assert all(p.stat().st_mode & 0o200 and p.stat().st_nlink == 1 for p in dest.rglob("*") if p.is_file())

    # A part's hash (what dvc.lock records for the tiles directory) restores that directory alone; the hash may be
    # given without its ".dir".
    restore(version=pushed.data.tiles.removesuffix(".dir"), dest=tmp_path / "tiles-only", params=params)
    assert _files(tmp_path / "tiles-only") == _files(snapshot / "tiles")

    again = push(snapshot="2026-03-01", tiles=snapshot / "tiles", samples=snapshot / "samples", out=tmp_path / "record",
                 params=params)  # fmt: skip
    assert again.data == pushed.data and again.uploaded == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "scratch workspaces left behind"


def test_the_version_is_a_content_hash(snapshot, tmp_path):
    original = data_version(tiles=snapshot / "tiles", samples=snapshot / "samples")
    copy = _copy_snapshot(snapshot, tmp_path / "elsewhere" / "copy")
    assert data_version(tiles=copy / "tiles", samples=copy / "samples") == original

    shard = next((copy / "tiles" / "shards").iterdir())
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    changed = data_version(tiles=copy / "tiles", samples=copy / "samples")
    assert changed.version != original.version and changed.tiles != original.tiles
    assert changed.samples == original.samples

    shard.unlink()
    removed = data_version(tiles=copy / "tiles", samples=copy / "samples")
    assert removed.version not in {original.version, changed.version}
    # Computing a version leaves the inputs as they were: no write protection, no extra links, no scratch files.
    assert all(p.stat().st_mode & 0o200 and p.stat().st_nlink == 1 for p in snapshot.rglob("*") if p.is_file())
    assert sorted(p.name for p in snapshot.iterdir()) == ["samples", "tiles"]


def test_unknown_or_malformed_versions_fail_with_a_clear_error(params, tmp_path):
    unknown = "0123456789abcdef0123456789abcdef.dir"
    with pytest.raises(UnknownVersionError, match=rf"{unknown} is not in the DVC remote gs://cloudscreen/dvc"):
        restore(version=unknown, dest=tmp_path / "dest", params=params)
    with pytest.raises(VersioningError, match=r"'v1': expected a DVC directory hash"):
        restore(version="v1", dest=tmp_path / "dest", params=params)
    assert list(tmp_path.iterdir()) == []


def test_inputs_that_are_not_step_outputs_are_refused(snapshot, params, tmp_path):
    with pytest.raises(VersioningError, match=r"empty: no tiles\.json"):
        data_version(tiles=tmp_path / "empty", samples=snapshot / "samples")
    with pytest.raises(VersioningError, match=r"tiles: no <set>/manifest\.parquet"):
        data_version(tiles=snapshot / "tiles", samples=snapshot / "tiles")
    with pytest.raises(ConfigError, match=r"versioning\.remote: .*'s3://b/dvc': expected gs://BUCKET"):
        load_section("versioning", VersioningParams, overrides=["versioning.remote=s3://b/dvc"])
    with pytest.raises(VersioningError, match=r"snapshot '\.\./x'"):
        push(snapshot="../x", tiles=snapshot / "tiles", samples=snapshot / "samples", out=tmp_path / "r", params=params)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tasks.versioning", *args]


def test_concurrent_snapshots_each_push_and_restore_exactly(snapshot, params, tmp_path):
    a = _copy_snapshot(snapshot, tmp_path / "a")
    b = _copy_snapshot(snapshot, tmp_path / "b")
    (b / "samples" / "small" / "summary.json").write_text('{"another": "snapshot"}\n')
    runs = {  # two backfills at once, and a retry of the first racing it
        "a": ("2026-03-01", a),
        "b": ("2026-03-02", b),
        "a-retry": ("2026-03-01", a),
    }
    procs = {}
    for name, (day, src) in runs.items():
        args = _cli("push", "--snapshot", day, "--tiles", str(src / "tiles"), "--samples", str(src / "samples"),
                    "--out", str(tmp_path / "versions" / name), "--remote", params.remote)  # fmt: skip
        procs[name] = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    versions = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        versions[name] = stdout.strip()
        assert VERSION.fullmatch(versions[name]), stdout
    assert versions["a"] == versions["a-retry"] != versions["b"]

    for name in ("a", "b"):
        dest = tmp_path / "restored" / name
        restore(version=versions[name], dest=dest, params=params)
        src = runs[name][1]
        assert _files(dest / "tiles") == _files(src / "tiles")
        assert _files(dest / "samples") == _files(src / "samples")


def test_cli_prints_the_version_and_reports_bad_versions_in_one_line(snapshot, params, tmp_path):
    run = subprocess.run(_cli("version", "--tiles", str(snapshot / "tiles"), "--samples", str(snapshot / "samples")),
                         cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == data_version(tiles=snapshot / "tiles", samples=snapshot / "samples").version

    for version, message in (
        ("not-a-hash", "expected a DVC directory hash"),
        ("ffffffffffffffffffffffffffffffff", "is not in the DVC remote"),
    ):
        run = subprocess.run(_cli("restore", "--version", version, "--dest", str(tmp_path / "d"), "--remote",
                                  params.remote), cwd=REPO, capture_output=True, text=True)  # fmt: skip
        assert run.returncode == 2
        assert message in run.stderr and "Traceback" not in run.stderr
        assert [line for line in run.stderr.splitlines() if "ERROR" in line] == [run.stderr.splitlines()[-1]]
        assert run.stdout == ""
