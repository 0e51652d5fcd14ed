from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tasks.lib import bigearthnet as ben
from tasks.lib.config import load_section
from tasks.lib.errors import ConfigError
from tasks.lib.files import file_digest
from tasks.mirror import Fault, MirrorParams, Shift, archive_name, build_mirror, parse_faults, parse_shifts
from tests.conftest import REPO, mirror_params


def _members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def test_archive_has_the_bigearthnet_s2_layout(small_mirror):
    files = _members(small_mirror.archive)
    top = "BigEarthNet-S2-mirror-40-5"
    assert small_mirror.archive.name == f"{top}.tar.gz"
    assert len(small_mirror.patch_ids) == 46  # 40 synthesized + 6 real
    for patch_id in small_mirror.patch_ids:
        assert ben.PATCH_NAME_RE.fullmatch(patch_id)
        for band, size in ben.BAND_SIZES.items():
            array = tifffile.imread(io.BytesIO(files[f"{top}/{patch_id}/{ben.band_file(patch_id, band)}"]))
            assert array.shape == (size, size) and array.dtype == np.uint16
        meta = json.loads(files[f"{top}/{patch_id}/{ben.metadata_file(patch_id)}"])
        assert set(meta) == ben.JSON_KEYS
        assert meta["labels"] and set(meta["labels"]) <= ben.LABELS
        c = meta["coordinates"]
        assert c["lrx"] - c["ulx"] == c["uly"] - c["lry"] == ben.PATCH_SIZE_M
    assert len(files) == 46 * 13


def test_synthesized_bands_carry_geotiff_georeferencing(small_mirror):
    files = _members(small_mirror.archive)
    name = next(n for n in files if n.endswith("_B8A.tif") and "T94161_57_38" not in n)
    with tifffile.TiffFile(io.BytesIO(files[name])) as tif:
        tags = tif.pages[0].tags
        assert tags["ModelPixelScaleTag"].value[:2] == (20.0, 20.0)
        assert "UTM zone" in tags["GeoAsciiParamsTag"].value
        patch = name.split("/")[1]
        meta = json.loads(files[f"{name.rsplit('/', 1)[0]}/{ben.metadata_file(patch)}"])
        assert tags["ModelTiepointTag"].value[3:5] == (meta["coordinates"]["ulx"], meta["coordinates"]["uly"])


def test_real_example_patches_are_included_verbatim(small_mirror):
    files = _members(small_mirror.archive)
    with tarfile.open(ben.example_archive()) as tar:
        real = {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar if m.isfile()}
    assert len(real) == 6 * 13
    for name, data in real.items():
        assert files[f"BigEarthNet-S2-mirror-40-5/{name}"] == data


def test_cloud_share_and_names_come_from_the_official_lists(small_mirror):
    clouds = ben.cloud_and_shadow_patches()
    table = ben.name_table()
    assert all(p in table.index for p in small_mirror.patch_ids)
    assert set(small_mirror.cloud_patch_ids) == {p for p in small_mirror.patch_ids if p in clouds}
    assert len(small_mirror.cloud_patch_ids) == round(0.3 * 40)  # none of the 6 real patches is cloudy


def test_same_seed_gives_byte_identical_archive_and_other_seed_does_not(tmp_path, small_mirror):
    params = mirror_params(patches=40, seed=5)
    again = build_mirror(out=tmp_path / "a", params=params, workers=2)  # process pool: order must not change
    assert again.sha256 == small_mirror.sha256
    other = build_mirror(out=tmp_path / "b", params=mirror_params(patches=40, seed=6), workers=1)
    assert other.sha256 != small_mirror.sha256


# sha256 of archives built by tasks/mirror.py: a mirror without shifts is byte for byte this archive, on every machine.
# Change these only when the rendering changes on purpose (and say so in the change). Last changed when the noise's
# upsampling stopped using a matrix product, whose result depended on the CPU's BLAS kernels (AVX2 or AVX-512).
REFERENCE_SHA256 = {
    (40, 5, True): "6160513ffe7c1cc553758428d91fafa13dcbcbedfc6af21f89b72380e5c64b6d",
    (3, 1, False): "212b7f23dc642bc85da9819dbb0b0a75b681023d7245f2d3c4f2e81ccf3176fb",
}


def test_a_mirror_without_shifts_keeps_the_reference_bytes(tmp_path, small_mirror):
    assert small_mirror.shifts == ()
    assert small_mirror.sha256 == REFERENCE_SHA256[40, 5, True]
    tiny = build_mirror(out=tmp_path, params=mirror_params(patches=3, seed=1, include_real=False, shifts=[]))
    assert tiny.sha256 == REFERENCE_SHA256[3, 1, False]
    assert json.loads(tiny.archive.with_name(tiny.archive.name + ".contents.json").read_text())["shifts"] == []


def test_same_seed_and_shifts_give_the_same_bytes_however_spelled(tmp_path):
    def build(out: str, shifts: list[str]):
        params = mirror_params(patches=4, seed=3, include_real=False, shifts=shifts)
        return build_mirror(out=tmp_path / out, params=params, workers=1)

    one = build("a", ["haze", "gain", "offset", "season=winter"])
    two = build("b", ["season=Winter", "offset=1000", "gain=1.1", "haze=0.2"])
    assert one.sha256 == two.sha256 and one.archive.name == two.archive.name
    assert one.shifts == ("offset=1000", "gain=1.1", "season=Winter", "haze=0.2")
    assert one.archive.name == "BigEarthNet-S2-mirror-4-3-offset1000-gain1.1-seasonWinter-haze0.2.tar.gz"
    contents = json.loads(one.archive.with_name(one.archive.name + ".contents.json").read_text())
    assert contents["shifts"] == list(one.shifts)
    assert build("a", ["haze", "gain", "offset", "season=winter"]).skipped  # same recipe: nothing to do
    assert build("c", ["offset=999", "gain", "haze", "season=Winter"]).sha256 != one.sha256


def test_parse_shifts_gives_each_kind_its_default_magnitude():
    assert parse_shifts(list(Shift)) == {
        Shift.OFFSET: 1000,
        Shift.GAIN: 1.1,
        Shift.SEASON: "Winter",
        Shift.CLOUD_FRACTION: 0.6,
        Shift.HAZE: 0.2,
        Shift.REGION: "Luxembourg",
    }
    assert parse_shifts(["region=kosovo", "offset=-200", "gain=2"]) == {
        Shift.OFFSET: -200,
        Shift.GAIN: 2.0,
        Shift.REGION: "Kosovo",
    }
    assert parse_shifts([]) == {}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("brightness=2", r"shift 'brightness=2': unknown kind; choose from offset, gain, season, cloud_fraction, haze"),
        ("offset=1.5", r"shift 'offset=1.5': MAGNITUDE must be an integer"),
        ("offset=70000", r"shift 'offset=70000': MAGNITUDE must be an integer"),
        ("gain=0", r"shift 'gain=0': MAGNITUDE must be a factor above 0"),
        ("gain=x", r"shift 'gain=x': MAGNITUDE must be a factor"),
        ("cloud_fraction=1.5", r"shift 'cloud_fraction=1.5': MAGNITUDE must be a share from 0 to 1"),
        ("haze=nan", r"shift 'haze=nan': MAGNITUDE must be the veil's opacity"),
        ("season=Monsoon", r"shift 'season=Monsoon': MAGNITUDE must be a season, one of Winter"),
        ("region=Spain", r"shift 'region=Spain': MAGNITUDE must be a BigEarthNet country, one of Austria"),
    ],
)
def test_a_bad_shift_is_a_config_error_naming_it(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_shifts([spec])
    with pytest.raises(ConfigError, match=message):  # the same through params and --set
        load_section("mirror", MirrorParams, overrides=[f"mirror.shifts=[{spec!r}]"])


def test_a_shift_given_twice_or_not_as_strings_is_a_config_error():
    with pytest.raises(ConfigError, match="shift 'offset=5': offset is given twice"):
        parse_shifts(["offset", "offset=5"])
    with pytest.raises(ConfigError, match=r"mirror\.shifts: expected a list of 'KIND' or 'KIND=MAGNITUDE' strings"):
        load_section("mirror", MirrorParams, overrides=["mirror.shifts={offset: 1000}"])
    assert load_section("mirror", MirrorParams, overrides=["mirror.shifts=offset"]).shifts == ("offset=1000",)


def test_checksum_file_is_in_sha256sum_format(small_mirror):
    sidecar = small_mirror.archive.with_name(small_mirror.archive.name + ".sha256")
    assert sidecar.read_text() == f"{file_digest(small_mirror.archive, 'sha256')}  {small_mirror.archive.name}\n"
    subprocess.run(["sha256sum", "--check", "--quiet", sidecar.name], cwd=sidecar.parent, check=True)


def test_rebuild_is_skipped_and_a_tampered_archive_is_rebuilt(tmp_path):
    params = mirror_params(patches=3, seed=1, include_real=False)
    first = build_mirror(out=tmp_path, params=params)
    assert not first.skipped
    assert build_mirror(out=tmp_path, params=params).skipped
    first.archive.write_bytes(b"garbage")
    rebuilt = build_mirror(out=tmp_path, params=params)
    assert not rebuilt.skipped and rebuilt.sha256 == first.sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [archive_name(3, 1), f"{archive_name(3, 1)}.sha256", f"{archive_name(3, 1)}.contents.json"]
    )


def test_changed_difficulty_params_rebuild_an_archive_of_the_same_name(tmp_path):
    easy = build_mirror(out=tmp_path, params=mirror_params(patches=3, seed=1, include_real=False, snow_fraction=0.0))
    hard = build_mirror(out=tmp_path, params=mirror_params(patches=3, seed=1, include_real=False, snow_fraction=1.0))
    assert hard.archive == easy.archive and not hard.skipped and hard.sha256 != easy.sha256


def test_no_real_leaves_out_the_example_patches(tmp_path):
    result = build_mirror(out=tmp_path, params=mirror_params(patches=4, seed=2, include_real=False))
    assert len(result.patch_ids) == 4


def test_faults_are_recorded_and_each_lands_on_its_own_patch(faulty_mirror):
    faults = faulty_mirror.faults
    assert sorted(v.split(":")[0] for v in faults.values()) == sorted(Fault)
    assert faulty_mirror.archive.name.endswith("-faulty.tar.gz")
    copy, kind = next((p, k) for p, k in faults.items() if k.startswith("duplicate_patch"))
    original = kind.split(":")[1]
    files = _members(faulty_mirror.archive)
    top = faulty_mirror.archive.name.removesuffix(".tar.gz")
    for band in ben.BANDS:
        assert (
            files[f"{top}/{copy}/{ben.band_file(copy, band)}"]
            == files[f"{top}/{original}/{ben.band_file(original, band)}"]
        )


def test_parse_faults():
    assert parse_faults(["missing_band", "corrupt_band=2", "missing_band"]) == {
        Fault.MISSING_BAND: 2,
        Fault.CORRUPT_BAND: 2,
    }
    with pytest.raises(ConfigError, match="unknown fault; choose from"):
        parse_faults(["broken_everything"])
    with pytest.raises(ConfigError, match="COUNT must be a positive integer"):
        parse_faults(["missing_band=0"])


def test_more_faults_than_patches_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="3 faults asked for but only 2"):
        build_mirror(out=tmp_path, params=mirror_params(patches=2, seed=1), faults={Fault.MISSING_BAND: 3})


def test_cli_prints_the_archive_path(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "tasks.mirror", "--out", str(tmp_path), "--patches", "3", "--seed", "9", "--no-real"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert run.stdout.strip() == str(tmp_path / archive_name(3, 9))
    bad = subprocess.run(
        [sys.executable, "-m", "tasks.mirror", "--out", str(tmp_path), "--fault", "nope"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "unknown fault" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_renders_shifts(tmp_path):
    command = [sys.executable, "-m", "tasks.mirror", "--out", str(tmp_path), "--patches", "3", "--seed", "9"]
    run = subprocess.run(
        [*command, "--no-real", "--shift", "offset", "--shift", "season=summer"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    archive = tmp_path / archive_name(3, 9, shifts=("offset=1000", "season=Summer"))
    assert run.stdout.strip() == str(archive)
    assert json.loads(archive.with_name(archive.name + ".contents.json").read_text())["shifts"] == [
        "offset=1000",
        "season=Summer",
    ]
    bad = subprocess.run([*command, "--shift", "tilt=3"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2
    assert "shift 'tilt=3': unknown kind; choose from offset, gain" in bad.stderr and "Traceback" not in bad.stderr


def test_the_bytes_do_not_depend_on_the_cpus_vector_kernels(tmp_path):
    """The same mirror from processes using other kernels: OpenBLAS forced to its AVX2 (Haswell) kernels, and numpy's
    AVX-512 loops switched off, as on an AVX2-only CPU. On such a CPU the three runs are alike anyway."""
    script = (
        "import sys; from pathlib import Path; from tests.conftest import mirror_params; "
        "from tasks.mirror import build_mirror; "
        "print(build_mirror(out=Path(sys.argv[1]), params=mirror_params(patches=3, seed=1, include_real=False), "
        "workers=1).sha256)"
    )
    avx512 = "AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR"
    kernels = {"default": {}, "openblas_haswell": {"OPENBLAS_CORETYPE": "Haswell"},
               "numpy_without_avx512": {"NPY_DISABLE_CPU_FEATURES": avx512}}  # fmt: skip
    digests = {}
    for name, env in kernels.items():
        done = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / name)],
            env=os.environ | env, cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        digests[name] = done.stdout.split()[-1]
    assert set(digests.values()) == {REFERENCE_SHA256[3, 1, False]}, digests
