"""tasks.download on local files: checksums, params, idempotence, archive types and refusal of unsafe members."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest
import zstandard

from tasks.download import EXTRACTED_DIR, MANIFEST_NAME, DownloadParams, download, resolve_request
from tasks.lib.bigearthnet import EXAMPLE_TOP_FOLDER, example_archive
from tasks.lib.checksums import Checksum
from tasks.lib.config import DEFAULT_PARAMS, load_section
from tasks.lib.errors import ChecksumMismatchError, ConfigError, DownloadError, UnsafeArchiveError, is_permanent
from tasks.lib.outputs import fingerprint

PARAMS = load_section("download", DownloadParams).model_copy(update={"retries": 0, "backoff_seconds": 0.0})
EXAMPLE_PATCHES = 6
FILES_PER_PATCH = 13  # 12 band GeoTIFFs + labels_metadata.json
# Any archive must hold at least one folder named like a BigEarthNet patch, or the download fails.
PATCH_ID = "S2B_MSIL2A_20180204T94161_57_38"


def _digest(path: Path, algorithm: str) -> str:
    return hashlib.new(algorithm, path.read_bytes()).hexdigest()


def _example_copy(tmp_path: Path) -> Path:
    """A private copy of the real example archive, so a test may delete its source."""
    src = tmp_path / "source" / example_archive().name
    src.parent.mkdir()
    shutil.copyfile(example_archive(), src)
    return src


def _assert_example_root(root: Path, dest: Path) -> None:
    assert root == dest / EXTRACTED_DIR / EXAMPLE_TOP_FOLDER
    patches = sorted(p for p in root.iterdir() if p.is_dir())
    assert len(patches) == EXAMPLE_PATCHES
    for patch in patches:
        assert len(list(patch.iterdir())) == FILES_PER_PATCH, patch


def _compress(raw: bytes, compression: str) -> bytes:
    if compression == "gz":
        return gzip.compress(raw)
    if compression == "bz2":
        return bz2.compress(raw)
    if compression == "zst":
        return zstandard.ZstdCompressor().compress(raw)
    return raw


_SUFFIX = {"": ".tar", "gz": ".tar.gz", "bz2": ".tar.bz2", "zst": ".tar.zst"}


def _make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], compression: str = "") -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_compress(buf.getvalue(), compression))
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _dir(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info, None


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


# --- params and checksums -------------------------------------------------------------------------------


def test_params_yaml_download_section_loads_into_the_model() -> None:
    params = load_section("download", DownloadParams, DEFAULT_PARAMS)
    assert set(params.sources) >= {"production", "embedded"}
    assert params.sources["production"].md5 is not None
    assert params.sources["embedded"].checksum_url is not None
    assert params.retries >= 0 and params.chunk_bytes > 0


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("download.retries=-1", "download.retries"),
        ("download.colour=blue", "download.colour"),
        ("download.sources={x: {url: a.tar}}", "exactly one of sha256, md5, checksum_url"),
        ("download.sources={x: {url: a.tar, md5: abc}}", "download.sources.x.md5"),
    ],
)
def test_params_reject_bad_values(override: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_section("download", DownloadParams, DEFAULT_PARAMS, [override])


def test_checksum_algorithm_follows_from_hex_length() -> None:
    assert Checksum.from_hex("A" * 64) == Checksum("sha256", "a" * 64)
    assert Checksum.from_hex(" " + "b" * 32 + "\n").algorithm == "md5"
    with pytest.raises(ConfigError, match=r"64 \(sha256\) or 32 \(md5\)"):
        Checksum.from_hex("abc")
    with pytest.raises(ConfigError, match="expected 64 hexadecimal digits"):
        Checksum("sha256", "z" * 64)


@pytest.mark.parametrize(
    "text",
    [
        "{hex}\n",
        "{hex}  {name}\n",
        "{hex} *{name}\n",
        "# comment\n{other}  other.tar.gz\n{hex}  ./dir/{name}\n",
    ],
)
def test_checksum_url_formats(tmp_path: Path, text: str) -> None:
    src = _example_copy(tmp_path)
    hex_ = _digest(src, "sha256")
    checksum_file = tmp_path / "SHA256SUMS"
    checksum_file.write_text(text.format(hex=hex_, name=src.name, other="0" * 64))
    url, checksum = resolve_request(url=str(src), source=None, checksum_url=checksum_file.as_uri(), params=PARAMS)
    assert url == str(src)
    assert checksum == Checksum("sha256", hex_)


def test_checksum_url_with_several_lines_but_none_for_the_archive_is_an_error(tmp_path: Path) -> None:
    checksum_file = tmp_path / "SHA256SUMS"
    checksum_file.write_text(f"{'0' * 64}  a.tar\n{'1' * 64}  b.tar\n")
    with pytest.raises(DownloadError, match=r"exactly one line for 'c\.tar'"):
        resolve_request(url="c.tar", source=None, checksum_url=str(checksum_file), params=PARAMS)


def test_resolve_request_takes_url_and_checksum_from_a_named_source() -> None:
    url, checksum = resolve_request(url=None, source="production", params=PARAMS)
    assert url == PARAMS.sources["production"].url
    assert checksum == Checksum("md5", PARAMS.sources["production"].md5 or "")


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"url": "a.tar", "source": None}, "a checksum is required"),
        ({"url": "a.tar", "source": None, "md5": "0" * 32, "sha256": "0" * 64}, "only one of"),
        ({"url": None, "source": None, "md5": "0" * 32}, "exactly one of --url or --source"),
        ({"url": "a.tar", "source": "production"}, "not both"),
        ({"url": None, "source": "nope"}, "'nope': not in download.sources"),
        ({"url": None, "source": "production", "md5": "0" * 32}, "checksum comes from params"),
    ],
)
def test_resolve_request_rejects_missing_or_conflicting_options(kwargs: dict, problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)):
        resolve_request(params=PARAMS, **kwargs)


# --- the real example archive from local files -----------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha256", "md5"])
@pytest.mark.parametrize("as_uri", [True, False])
def test_example_archive_from_a_local_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, algorithm: str, as_uri: bool
) -> None:
    src = _example_copy(tmp_path)
    monkeypatch.chdir(tmp_path)
    url = src.as_uri() if as_uri else str(src.relative_to(tmp_path))  # a plain path is relative to the CWD
    dest = tmp_path / "dest"
    checksum = Checksum(algorithm, _digest(src, algorithm))  # type: ignore[arg-type]

    result = download(url=url, dest=dest, checksum=checksum, params=PARAMS)

    assert not result.skipped
    _assert_example_root(result.root, dest)
    assert result.archive == dest / src.name
    assert _digest(result.archive, algorithm) == checksum.digest
    manifest = json.loads((dest / MANIFEST_NAME).read_text())
    assert manifest == {
        "url": src.as_uri(),
        "algorithm": algorithm,
        "checksum": checksum.digest,
        "archive": src.name,
        "size": src.stat().st_size,
        "root": f"{EXTRACTED_DIR}/{EXAMPLE_TOP_FOLDER}",
        "members": 85,  # the top folder, 6 patch folders, 6 x 13 files
        "input": {"fingerprint": fingerprint(src.name, algorithm, checksum.digest)},  # not the URL
    }
    assert sorted(p.name for p in dest.iterdir()) == sorted([src.name, EXTRACTED_DIR, MANIFEST_NAME])


def test_second_run_does_nothing(tmp_path: Path) -> None:
    src = _example_copy(tmp_path)
    dest = tmp_path / "dest"
    checksum = Checksum("sha256", _digest(src, "sha256"))
    first = download(url=str(src), dest=dest, checksum=checksum, params=PARAMS)
    manifest_mtime = first.manifest.stat().st_mtime_ns
    src.unlink()  # a second run that tried to fetch would now fail

    second = download(url=str(src), dest=dest, checksum=checksum, params=PARAMS)

    assert second.skipped
    assert second.root == first.root
    assert first.manifest.stat().st_mtime_ns == manifest_mtime


def test_the_same_archive_from_another_url_is_not_fetched_again(tmp_path: Path) -> None:
    src = _example_copy(tmp_path)
    dest = tmp_path / "dest"
    checksum = Checksum("sha256", _digest(src, "sha256"))
    first = download(url=str(src), dest=dest, checksum=checksum, params=PARAMS)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    moved = src.rename(mirror / src.name)  # the same bytes, served from elsewhere (a mirror, another port)

    second = download(url=str(moved), dest=dest, checksum=checksum, params=PARAMS)

    assert second.skipped
    assert second.root == first.root


def test_lost_extraction_is_redone_from_the_verified_archive_without_refetching(tmp_path: Path) -> None:
    src = _example_copy(tmp_path)
    dest = tmp_path / "dest"
    checksum = Checksum("md5", _digest(src, "md5"))
    download(url=str(src), dest=dest, checksum=checksum, params=PARAMS)
    shutil.rmtree(dest / EXTRACTED_DIR)
    src.unlink()

    result = download(url=str(src), dest=dest, checksum=checksum, params=PARAMS)

    assert not result.skipped
    _assert_example_root(result.root, dest)


def test_corrupt_archive_in_dest_is_refetched(tmp_path: Path) -> None:
    src = _example_copy(tmp_path)
    dest = tmp_path / "dest"
    checksum = Checksum("sha256", _digest(src, "sha256"))
    download(url=str(src), dest=dest, checksum=checksum, params=PARAMS)
    (dest / src.name).write_bytes(b"garbage")

    result = download(url=str(src), dest=dest, checksum=checksum, params=PARAMS)

    assert not result.skipped
    assert _digest(result.archive, "sha256") == checksum.digest


def test_part_file_of_unknown_origin_is_discarded(tmp_path: Path) -> None:
    src = _example_copy(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / f"{src.name}.part").write_bytes(b"bytes from who knows where")
    checksum = Checksum("sha256", _digest(src, "sha256"))

    result = download(url=str(src), dest=dest, checksum=checksum, params=PARAMS)

    assert _digest(result.archive, "sha256") == checksum.digest
    assert not (dest / f"{src.name}.part").exists()


def test_wrong_checksum_discards_everything(tmp_path: Path) -> None:
    src = _example_copy(tmp_path)
    dest = tmp_path / "dest"
    wrong = "0" * 64
    actual = _digest(src, "sha256")

    with pytest.raises(ChecksumMismatchError, match="expected") as caught:
        download(url=src.as_uri(), dest=dest, checksum=Checksum("sha256", wrong), params=PARAMS)

    message = str(caught.value)
    for part in (src.as_uri(), "sha256", wrong, actual, "discarded"):
        assert part in message
    assert list(dest.iterdir()) == []


def test_wrong_checksum_after_a_good_download_leaves_nothing_that_could_pass_for_its_output(tmp_path: Path) -> None:
    src = _example_copy(tmp_path)
    dest = tmp_path / "dest"
    download(url=str(src), dest=dest, checksum=Checksum("md5", _digest(src, "md5")), params=PARAMS)

    with pytest.raises(ChecksumMismatchError, match=r"expected 0{32},"):
        download(url=str(src), dest=dest, checksum=Checksum("md5", "0" * 32), params=PARAMS)

    assert list(dest.iterdir()) == []


def test_missing_local_file_fails_naming_it(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"missing\.tar\.gz: no such file"):
        download(
            url=str(tmp_path / "missing.tar.gz"),
            dest=tmp_path / "d",
            checksum=Checksum.from_hex("0" * 64),
            params=PARAMS,
        )


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://host/a.tar.gz", "unsupported URL scheme 'ftp'"),
        ("https://host/data.zip", "unsupported archive type 'data.zip'"),
        ("https://host/", "cannot derive an archive file name"),
        ("file://otherhost/a.tar", "no host"),
        ("gs://bucket-only", "expected gs://BUCKET/PATH"),
    ],
)
def test_unsupported_urls_fail_before_fetching(tmp_path: Path, url: str, problem: str) -> None:
    with pytest.raises(DownloadError, match=re.escape(problem)):
        download(url=url, dest=tmp_path / "d", checksum=Checksum.from_hex("0" * 64), params=PARAMS)
    assert not (tmp_path / "d").exists()


# --- archive types and layout ----------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["", "gz", "bz2", "zst"])
def test_archive_types_extract_and_single_top_folder_is_the_root(tmp_path: Path, compression: str) -> None:
    # top/a comes into being with its file; the explicit directory member is the patch folder.
    members = [_dir("top"), _dir(f"top/{PATCH_ID}"), _file("top/a/one.txt", b"1"), _file("top/two.txt", b"22")]
    src = _make_tar(tmp_path / "src" / f"data{_SUFFIX[compression]}", members, compression)
    dest = tmp_path / "dest"

    result = download(url=str(src), dest=dest, checksum=Checksum("sha256", _digest(src, "sha256")), params=PARAMS)

    assert result.root == dest / EXTRACTED_DIR / "top"
    assert (result.root / "a" / "one.txt").read_bytes() == b"1"
    assert (result.root / "two.txt").read_bytes() == b"22"
    assert json.loads(result.manifest.read_text())["members"] == 4


def test_several_top_level_entries_make_extracted_the_root(tmp_path: Path) -> None:
    src = _make_tar(tmp_path / "src" / "flat.tgz", [_file("a.txt"), _dir(PATCH_ID), _file(f"{PATCH_ID}/c.txt")], "gz")
    dest = tmp_path / "dest"

    result = download(url=str(src), dest=dest, checksum=Checksum("md5", _digest(src, "md5")), params=PARAMS)

    assert result.root == dest / EXTRACTED_DIR
    assert json.loads(result.manifest.read_text())["root"] == EXTRACTED_DIR


def test_multi_frame_zstd_is_read_to_the_end(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(4):
            info, data = _file(f"top/{PATCH_ID}/f{i}.bin", bytes([i]) * 30_000)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    # Two independent frames, as multi-threaded or concatenated zstd output has.
    half = len(raw) // 2
    src = tmp_path / "src" / "frames.tar.zst"
    src.parent.mkdir()
    cctx = zstandard.ZstdCompressor()
    src.write_bytes(cctx.compress(raw[:half]) + cctx.compress(raw[half:]))

    result = download(
        url=str(src), dest=tmp_path / "dest", checksum=Checksum("sha256", _digest(src, "sha256")), params=PARAMS
    )

    assert sorted(p.name for p in (result.root / PATCH_ID).iterdir()) == ["f0.bin", "f1.bin", "f2.bin", "f3.bin"]


@pytest.mark.parametrize(
    ("members", "found"),
    [
        ([_file("README.md", b"no data here")], "at its top level, which holds README.md"),
        ([], "it is empty"),
        ([_dir("top"), _dir("top/docs"), _file("top/README")], "in its top folder top/, which holds README, docs/"),
        ([_dir("top"), _dir(f"top/{PATCH_ID}-copy")], f"which holds {PATCH_ID}-copy/"),  # the name must match whole
    ],
    ids=["readme-only", "empty", "wrapper-without-patches", "near-miss-name"],
)
def test_an_archive_without_patch_folders_fails_and_leaves_no_output(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], found: str
) -> None:
    src = _make_tar(tmp_path / "src" / "nothing.tar.gz", members, "gz")
    dest = tmp_path / "dest"
    checksum = Checksum("sha256", _digest(src, "sha256"))
    problem = f"{dest / src.name}: the archive holds no BigEarthNet patch folders"

    for _ in range(2):  # a rerun finds the verified archive, extracts it again and fails the same way
        with pytest.raises(DownloadError, match=re.escape(problem)) as e:
            download(url=str(src), dest=dest, checksum=checksum, params=PARAMS)
        assert found in str(e.value)
        assert not e.value.transient
        # Only the verified archive stays: no manifest, no extracted/, no temporary extraction directory.
        assert sorted(p.name for p in dest.iterdir()) == [src.name]


def test_an_archive_without_patch_folders_after_a_good_download_leaves_no_manifest(tmp_path: Path) -> None:
    good = _example_copy(tmp_path)
    dest = tmp_path / "dest"
    download(url=str(good), dest=dest, checksum=Checksum("md5", _digest(good, "md5")), params=PARAMS)
    empty = _make_tar(tmp_path / "src" / "empty.tar", [])

    with pytest.raises(DownloadError, match=r"empty\.tar: the archive holds no BigEarthNet patch .* \(it is empty\)"):
        download(url=str(empty), dest=dest, checksum=Checksum("md5", _digest(empty, "md5")), params=PARAMS)

    assert sorted(p.name for p in dest.iterdir()) == sorted([good.name, empty.name])  # archives only


def test_an_archive_of_a_single_patch_folder_has_extracted_as_its_root(tmp_path: Path) -> None:
    src = _make_tar(tmp_path / "src" / "one.tar", [_dir(PATCH_ID), _file(f"{PATCH_ID}/{PATCH_ID}_B01.tif")])
    dest = tmp_path / "dest"

    result = download(url=str(src), dest=dest, checksum=Checksum("md5", _digest(src, "md5")), params=PARAMS)

    # The patch folder is data, not a wrapper around it, so validate finds it under the root.
    assert result.root == dest / EXTRACTED_DIR
    assert [p.name for p in result.root.iterdir()] == [PATCH_ID]


def test_local_failures_are_permanent(tmp_path: Path) -> None:
    src = _example_copy(tmp_path)
    with pytest.raises(ChecksumMismatchError) as mismatch:
        download(url=str(src), dest=tmp_path / "a", checksum=Checksum("md5", "0" * 32), params=PARAMS)
    with pytest.raises(DownloadError, match="no such file") as missing:
        download(url=str(tmp_path / "gone.tar"), dest=tmp_path / "b", checksum=Checksum("md5", "0" * 32), params=PARAMS)

    assert not mismatch.value.transient and is_permanent(mismatch.value)
    assert not missing.value.transient and is_permanent(missing.value)


# --- unsafe archives ------------------------------------------------------------------------------------


def _unsafe_members(kind: str, outside: Path) -> tuple[list[tuple[tarfile.TarInfo, bytes | None]], str]:
    """Members for one kind of attack (after a harmless file, so a half-done extraction exists) and its name."""
    harmless = [_dir("top"), _file("top/ok.txt", b"fine")]
    evil: tuple[tarfile.TarInfo, bytes | None]
    if kind == "dotdot":
        evil = _file("top/../../../evil.txt", b"escaped")
    elif kind == "absolute":
        evil = _file(f"{outside}/evil.txt", b"escaped")
    elif kind == "symlink":
        evil = _special("top/link", tarfile.SYMTYPE, str(outside))
    elif kind == "hardlink":
        evil = _special("top/hard", tarfile.LNKTYPE, "top/ok.txt")
    elif kind == "fifo":
        evil = _special("top/pipe", tarfile.FIFOTYPE)
    elif kind == "chardev":
        evil = _special("top/null", tarfile.CHRTYPE)
        evil[0].devmajor, evil[0].devminor = 1, 3
    else:
        evil = _special("top/disk", tarfile.BLKTYPE)
        evil[0].devmajor, evil[0].devminor = 8, 0
    return [*harmless, evil], evil[0].name


@pytest.mark.parametrize("compression", ["", "gz", "zst"])
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "fifo", "chardev", "blockdev"])
def test_unsafe_members_are_refused_and_nothing_is_written_outside_dest(
    tmp_path: Path, kind: str, compression: str
) -> None:
    work = tmp_path / "work"  # DEST's parent: must hold DEST and nothing else afterwards
    dest = work / "dest"
    outside = tmp_path / "outside"
    members, evil_name = _unsafe_members(kind, outside)
    src = _make_tar(tmp_path / "src" / f"evil{_SUFFIX[compression]}", members, compression)
    # The hostile name really is in the archive (tarfile did not sanitise it on writing).
    raw = src.read_bytes()
    if compression == "zst":
        raw = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        assert evil_name in tar.getnames()

    with pytest.raises(UnsafeArchiveError, match=re.escape(f"{src.name}: refusing member {evil_name!r}")):
        download(url=str(src), dest=dest, checksum=Checksum("sha256", _digest(src, "sha256")), params=PARAMS)

    assert sorted(p.name for p in work.iterdir()) == ["dest"]
    # Only the verified archive stays: no extracted/, no temporary extraction directory, no manifest.
    assert sorted(p.name for p in dest.iterdir()) == [src.name]
    assert not outside.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "work"]
