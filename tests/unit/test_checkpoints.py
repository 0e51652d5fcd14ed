"""tasks.lib.checkpoints: run.json is the commit; a file it names that is missing or damaged is never trusted."""

from __future__ import annotations

from tasks.lib.checkpoints import STATE_FILE, file_md5, prune_local, read_local
from tasks.lib.files import write_json


def _commit(directory, **files: bytes) -> dict:
    for name, data in files.items():
        (directory / name).write_bytes(data)
    state = {"run_id": "r", "epochs": 2, "files": {name: file_md5(directory / name) for name in files}}
    write_json(directory / STATE_FILE, state)
    return state


def test_a_whole_commit_is_read_back(tmp_path):
    state = _commit(tmp_path, **{"epoch-00002.weights.h5": b"weights"})
    assert read_local(tmp_path) == state


def test_no_state_is_none(tmp_path):
    assert read_local(tmp_path) is None


def test_a_missing_or_damaged_file_makes_the_commit_untrusted(tmp_path):
    _commit(tmp_path, **{"epoch-00002.weights.h5": b"weights"})
    (tmp_path / "epoch-00002.weights.h5").write_bytes(b"weig")  # a half-written copy
    assert read_local(tmp_path) is None
    (tmp_path / "epoch-00002.weights.h5").unlink()
    assert read_local(tmp_path) is None


def test_pruning_keeps_the_commit_and_deletes_earlier_epochs(tmp_path):
    (tmp_path / "epoch-00001.weights.h5").write_bytes(b"old")
    state = _commit(tmp_path, **{"epoch-00002.weights.h5": b"new", "best-00001.weights.h5": b"best"})
    prune_local(tmp_path, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-00001.weights.h5", "epoch-00002.weights.h5", STATE_FILE]
