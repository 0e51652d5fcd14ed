"""An archive read in ranges (tasks.lib.archive_stream.range_folders) and the seek index behind them
(tasks.lib.gzip_index): every cut gives what one stream gives, a header imitated by file data is caught by the chain,
and the index pass hashes the file in order whatever order it is read in."""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import re
import tarfile
from pathlib import Path, PurePosixPath

import pytest

from tasks.lib.archive_stream import StreamStats, _parts, dataset_root, range_folders, stream_folders
from tasks.lib.gzip_index import _InOrderHasher, build_index, open_indexed

ITEM = re.compile(r"item-\d+(-x+)?")
ROOT = "dataset"


def _tar(members: list[tuple[str, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            else:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _dataset(folders: int = 12, seed: int = 0) -> bytes:
    """Folders of a few files each under one root; every third name is long enough to need a pax header, and a file
    sits directly in the root between folders."""
    rng = random.Random(seed)
    members: list[tuple[str, bytes | None]] = [(ROOT, None)]
    for k in range(folders):
        folder = f"{ROOT}/item-{k}" + ("-" + "x" * 120 if k % 3 == 0 else "")
        members.append((folder, None))
        for f in range(rng.randint(1, 4)):
            members.append((f"{folder}/file-{f}.bin", rng.randbytes(rng.randint(0, 3000))))
        if k == folders // 2:
            members.append((f"{ROOT}/README", b"a stray file"))
    return _tar(members)


def _walk(data: bytes, start: int, stop: int | None, exact: bool) -> tuple[list[tuple[str, dict]], StreamStats]:
    stats = StreamStats()
    folders = range_folders(io.BytesIO(data), "test.tar", start=start, stop=stop, root=ROOT, exact=exact,
                            wanted=lambda name: {"file-0.bin", "file-2.bin"}, is_item=ITEM, stats=stats)  # fmt: skip
    return [(f.name, f.files) for f in folders], stats


def _one_stream(tmp_path: Path, data: bytes) -> tuple[list[tuple[str, dict]], StreamStats]:
    path = tmp_path / "whole.tar"
    path.write_bytes(data)
    stats = StreamStats()
    folders = stream_folders(path, "", algorithm="sha256", wanted=lambda name: {"file-0.bin", "file-2.bin"},
                             is_item=ITEM, stats=stats)  # fmt: skip
    return [(f.name, f.files) for f in folders], stats


def test_every_cut_gives_the_folders_of_one_stream(tmp_path):
    data = _dataset()
    whole, whole_stats = _one_stream(tmp_path, data)
    assert len(whole) == 12 and whole_stats.stray_files == ["README"]
    for cut in range(tarfile.BLOCKSIZE, len(data), tarfile.BLOCKSIZE):
        before, before_stats = _walk(data, 0, cut, exact=True)
        after, after_stats = _walk(data, cut, None, exact=False)
        assert after_stats.start == before_stats.end, f"cut at {cut}"
        assert before + after == whole, f"cut at {cut}"
        assert before_stats.members + after_stats.members == whole_stats.members
        assert before_stats.stray_files + after_stats.stray_files == ["README"]


def test_three_ranges_chain_and_the_last_reads_to_the_end(tmp_path):
    data = _dataset(folders=30, seed=1)
    whole, _ = _one_stream(tmp_path, data)
    cuts = [0, len(data) // 3, 2 * len(data) // 3]
    got, ends = [], []
    for k, cut in enumerate(cuts):
        folders, stats = _walk(data, cut, cuts[k + 1] if k + 1 < len(cuts) else None, exact=k == 0)
        assert k == 0 or stats.start == ends[-1]
        got += folders
        ends.append(stats.end)
    assert got == whole and ends[-1] is None


def test_a_header_imitated_by_file_data_shows_as_a_broken_chain():
    folder = f"{ROOT}/item-1"
    fake = _tar([(f"{ROOT}/item-99", None)])[: tarfile.BLOCKSIZE]  # a valid header block, as file contents
    data = _tar([(ROOT, None), (folder, None), (f"{folder}/file-0.bin", b"x" * 700),
                 (f"{folder}/file-1.bin", fake + b"y" * 100), (f"{folder}/file-2.bin", b"z"),
                 *((f"{ROOT}/item-{k}/file-0.bin", b"w") for k in (2, 3, 4))])  # fmt: skip
    cut = data.index(fake)
    before_folders, before = _walk(data, 0, cut, exact=True)
    _, after = _walk(data, cut, None, exact=False)
    # The range after the cut walked from the imitation into file data; the range before knows where item-3 starts.
    assert [name for name, _ in before_folders] == ["item-1", "item-2"]
    assert before.end is not None and after.start != before.end
    # Read again from where the range before ended, it is right.
    again, again_stats = _walk(data, before.end, None, exact=True)
    assert [name for name, _ in again] == ["item-3", "item-4"] and again_stats.start == before.end


def test_a_range_with_no_folder_start_is_empty():
    data = _dataset(folders=2)
    folders, stats = _walk(data, len(data) - 2 * tarfile.BLOCKSIZE, None, exact=False)
    assert folders == [] and stats.start is None and stats.members == 0


@pytest.mark.parametrize("name", ["a", "a/b/c.tif", "./a/b", "/a", "a//b", "a/./b", "a/", "a/.", ".", "", "..",
                                  "a/../b", "...", ".a/b.", "a/.b"])  # fmt: skip
def test_member_names_split_as_pathlib_splits_them(name):
    assert _parts(name) == PurePosixPath(name).parts


def test_the_dataset_root_is_found_as_the_stream_finds_it(tmp_path):
    data = _dataset(folders=3)
    assert dataset_root(io.BytesIO(data), ITEM) == _one_stream(tmp_path, data)[1].root == ROOT
    bare = _tar([("item-1", None), ("item-1/file-0.bin", b"1")])
    assert dataset_root(io.BytesIO(bare), ITEM) == ""


class _Scrambled(io.RawIOBase):
    """A file read in a random order of chunks, then a part of it again: as rapidgzip's prefetching might."""

    def __init__(self, data: bytes, rng: random.Random) -> None:
        self._data, self._position, self._rng = data, 0, rng

    def readinto(self, buffer) -> int:
        size = min(len(buffer), self._rng.randint(1, 5000))
        chunk = self._data[self._position : self._position + size]
        buffer[: len(chunk)] = chunk
        self._position += len(chunk)
        return len(chunk)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._position = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._data)}[whence] + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


@pytest.mark.parametrize("seed", range(5))
def test_the_index_pass_hashes_in_file_order_whatever_the_read_order(seed):
    rng = random.Random(seed)
    data = rng.randbytes(50_000)
    reads: list[int] = []
    hashed = _InOrderHasher(_Scrambled(data, rng), hashlib.sha256(), reads.append)
    for _ in range(40):
        hashed.seek(rng.randrange(len(data)))
        hashed.read(rng.randint(1, 4000))
    hashed.finish()
    assert hashed.hasher.hexdigest() == hashlib.sha256(data).hexdigest()
    assert hashed.count == sum(reads) == len(data)


def test_the_seek_index_reads_any_offset_and_hashes_the_file(tmp_path):
    rng = random.Random(3)
    tar_bytes = _tar([(f"item-{k}/file-0.bin", rng.randbytes(20_000) * 3) for k in range(60)])
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(gzip.compress(tar_bytes, 6))
    index = build_index(
        lambda: archive.open("rb"), tmp_path / "a.index", algorithm="sha256", spacing=64 << 10, threads=2
    )
    assert index.digest == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert index.size == len(tar_bytes) and index.compressed_bytes == archive.stat().st_size
    assert index.points[0] == 0 and len(index.points) > 5
    with archive.open("rb") as raw, open_indexed(raw, index.path) as f:
        for offset in [*index.points[1:4], *(rng.randrange(len(tar_bytes)) for _ in range(10))]:
            f.seek(offset)
            assert f.read(3000) == tar_bytes[offset : offset + 3000]
