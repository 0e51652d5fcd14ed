"""bench.peer without the real peer: a fake `ben_encoder` (and a fake `uv`) stand in, so no venv is built here."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from bench import peer

PATCHES = ["S2A_MSIL2A_20170613T101031_87_48", "S2B_MSIL2A_20180525T94031_33_71", "S2A_MSIL2A_20170717T113321_4_55"]

# Stands in for `ben_encoder`: `--help` works; `write-s2-lmdb-raw ROOT --lmdb-path OUT` holds ~64 MB, writes an LMDB
# directory with one 1000-byte record per patch folder, and fails when ROOT contains a folder named FAIL.
FAKE_ENCODER = f"""#!{sys.executable}
import sys, time
from pathlib import Path
if sys.argv[1:] == ["--help"]:
    sys.exit(0)
assert sys.argv[1] == "write-s2-lmdb-raw" and sys.argv[3] == "--lmdb-path", sys.argv
root, out = Path(sys.argv[2]), Path(sys.argv[4])
if (root / "FAIL").exists():
    sys.stderr.write("Traceback: something broke in the peer\\n")
    sys.exit(3)
ballast = b"\\x01" * (64 * 2**20)
time.sleep(0.3)
out.mkdir()
(out / "data.mdb").write_bytes(b"x" * 1000 * sum(1 for p in root.iterdir() if p.is_dir() and p.name.startswith("S2")))
(out / "lock.mdb").write_bytes(b"l" * 8)
"""


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_venv(tmp_path) -> Path:
    venv = tmp_path / "venv"
    _executable(venv / "bin" / "ben_encoder", FAKE_ENCODER)
    return venv


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "BigEarthNet-S2-mirror-3-1"
    for name in PATCHES:
        (root / name).mkdir(parents=True)
    (root / "not_a_patch").mkdir()
    (root / f"{PATCHES[0]}.txt").write_text("a file, not a folder")
    return root


def test_count_patches_counts_only_patch_named_folders(root):
    assert peer.count_patches(root) == 3


def test_run_peer_measures_time_memory_and_output(fake_venv, root, tmp_path):
    out = tmp_path / "out"
    (out / peer.LMDB_NAME).mkdir(parents=True)  # a previous run's output is replaced, not appended to
    (out / peer.LMDB_NAME / "data.mdb").write_bytes(b"old" * 10_000)
    run = peer.run_peer(root, out, fake_venv)
    assert run.patches == 3
    assert run.output_bytes == 3 * 1000 + 8
    assert run.seconds >= 0.3
    assert 64 * 2**20 < run.peak_rss_bytes < 1024 * 2**20
    assert run.patches_per_second == pytest.approx(3 / run.seconds)


def test_run_peer_measures_memory_without_gnu_time(fake_venv, root, tmp_path, monkeypatch):
    monkeypatch.setattr(peer.os, "access", lambda *a: False)
    run = peer.run_peer(root, tmp_path / "out", fake_venv)
    assert 64 * 2**20 < run.peak_rss_bytes < 1024 * 2**20


def test_run_peer_failure_names_the_command_and_output_tail(fake_venv, root, tmp_path):
    (root / "FAIL").mkdir()
    with pytest.raises(RuntimeError, match=r"write-s2-lmdb-raw(.|\n)*something broke in the peer"):
        peer.run_peer(root, tmp_path / "out", fake_venv)


def test_run_peer_accepts_the_executable_and_rejects_a_missing_venv(fake_venv, root, tmp_path):
    assert peer.run_peer(root, tmp_path / "out", fake_venv / "bin" / "ben_encoder").patches == 3
    with pytest.raises(FileNotFoundError, match="ensure_peer_venv"):
        peer.run_peer(root, tmp_path / "out", tmp_path / "nowhere")


def _fake_uv(tmp_path: Path, monkeypatch) -> Path:
    calls = tmp_path / "uv-calls"
    uv = _executable(
        tmp_path / "fakebin" / "uv",
        f'#!/bin/sh\necho "$@" >> {calls}\necho "error: No solution found when resolving dependencies" >&2\nexit 1\n',
    )
    monkeypatch.setenv("PATH", f"{uv.parent}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_ensure_peer_venv_reuses_a_working_venv(fake_venv, tmp_path, monkeypatch):
    calls = _fake_uv(tmp_path, monkeypatch)
    assert peer.ensure_peer_venv(fake_venv) == fake_venv / "bin" / "ben_encoder"
    assert not calls.exists()


def test_ensure_peer_venv_failure_names_the_command_and_stderr(tmp_path, monkeypatch):
    calls = _fake_uv(tmp_path, monkeypatch)
    with pytest.raises(RuntimeError, match=r"uv venv --clear --python 3\.11(.|\n)*No solution found"):
        peer.ensure_peer_venv(tmp_path / "new-venv")
    assert calls.read_text().startswith("venv --clear --python 3.11")
