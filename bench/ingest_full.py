"""Streaming ingest benchmark (issue 16): tasks.ingest against its limits and against today's path, in one run.

    python -m bench.ingest_full [--patches 5000] [--large 50000] [--small 5000] [--repeats 2] [--work DIR]

On one mirror of --patches patches (tasks.mirror, seed 1), re-packed as the real archive is laid out (GNU tar under
BigEarthNet-v1.0/: the mirror's own pax headers would double the tar headers to parse per patch):
- limits, single process each: (a) `gzip -dc ARCHIVE > /dev/null`; (b) every band of every patch decoded from
  memory (bytes read beforehand) by the project's reader, tasks.lib.bands.BandReader;
- the stream: `python -m tasks.ingest` (whole command line) and the same in-process (driver and worker CPU time);
- today's path: `python -m tasks.download`, then `tasks.validate`, then `tasks.tile --report`, whole command lines;
  the two paths alternate --repeats times and the best of each is kept (interference only ever slows a run down);
- peak disk of each path (allocated blocks, sampled) over archive + its final outputs;
- the indexed path (DASK_SCHEDULER_ADDRESS) on a LocalCluster of each --cluster-workers size: the indexing pass
  and the ranges timed apart, the ranges' speed-up, and a projection to 32 workers;
Then peak memory (process tree) of the stream's command line at --large over --small patches, and its marginal
rate between them (the throughput a 590,326-patch archive sees, start-up costs spread thin); the gzip ratio of
the 6 real example patches against the mirror's; and the full 590,326-patch time projected from per-core rates.
Prints a markdown table; the 1-minute load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib
import io
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from bench.measure import run_measured, sampled_peak
from tasks.download import DownloadParams
from tasks.ingest import IngestParams, ingest
from tasks.lib import bigearthnet as ben
from tasks.lib.bands import BandReader
from tasks.lib.checksums import Checksum
from tasks.lib.config import load_section
from tasks.lib.files import file_digest
from tasks.mirror import MirrorParams, build_mirror
from tasks.tile import TileParams
from tasks.validate import ValidateParams

REPO = Path(__file__).resolve().parent.parent
OFFICIAL_ROOT = "BigEarthNet-v1.0"  # the real archive's top folder
LARGE_CLOUD_FRACTION = 0.15  # of the memory runs' mirrors
FULL_PATCHES = 590_326
FULL_ARCHIVE_BYTES = 66e9  # the official BigEarthNet-v1.0.tar.gz, as the issue gives it


def _load() -> float:
    return os.getloadavg()[0]


def _allocated(root: Path) -> int:
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):  # removed while walking
                total += (Path(folder) / name).lstat().st_blocks * 512
    return total


def _disk_peak(root: Path, interval: float = 0.3) -> contextlib.AbstractContextManager[list[int]]:
    """Sample the allocated bytes under `root` while the block runs (and once after); yields [peak]."""
    return sampled_peak(lambda: _allocated(root), interval, last=True)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _mirror(work: Path, patches: int, cloud_fraction: float | None = None):
    overrides = [f"mirror.patches={patches}", "mirror.seed=1"]
    if cloud_fraction is not None:
        overrides.append(f"mirror.cloud_fraction={cloud_fraction}")
    params = load_section("mirror", MirrorParams, overrides=overrides)
    return build_mirror(out=work / "mirrors", params=params)


def _official_layout(mirror_archive: Path, out: Path, compresslevel: int) -> Path:
    """The mirror's members re-packed as the real archive lays them out: under BigEarthNet-v1.0/, in GNU tar format
    (as the real example archive in bigearthnet-common is: a ././@LongLink header before a name over 100 characters,
    which there is the metadata JSON only). The mirror itself writes pax headers for its longer root's names, about 10
    a patch, which is header parsing the real archive does not cost. Same member bytes and order, same gzip level."""
    path = out / f"{OFFICIAL_ROOT}-{mirror_archive.name.removesuffix('.tar.gz')}.tar.gz"
    if path.exists() and path.stat().st_mtime >= mirror_archive.stat().st_mtime:
        return path  # re-packed since the mirror was (re)built
    tmp = path.with_suffix(".tmp")
    with (
        tarfile.open(mirror_archive, "r:gz") as src,
        gzip.GzipFile(tmp, "wb", compresslevel=compresslevel, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as dst,
    ):
        for member in src:
            data = src.extractfile(member).read() if member.isfile() else None
            _, _, rest = member.name.partition("/")
            member.name = f"{OFFICIAL_ROOT}/{rest}" if rest else OFFICIAL_ROOT
            member.pax_headers = {}
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    tmp.replace(path)
    return path


def _headers_per_patch(archive: Path) -> float:
    """Tar header blocks (pax and long-name ones included) per patch folder."""
    headers, folders = 0, 0
    with tarfile.open(archive, "r|gz") as tar:
        for member in tar:
            headers += (member.offset_data - member.offset) // tarfile.BLOCKSIZE
            folders += member.isdir() and member.name.count("/") == 1
            tar.members.clear()
    return headers / folders


_PHASE_LOGS = {"index": r"^indexed .* in ([\d.]+) s", "ranges": r"^read \d+ ranges of .* in ([\d.]+) s"}


class _Phases(logging.Handler):
    """Collects the seconds tasks.ingest logs for its indexing pass and its ranges."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seconds: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for phase, pattern in _PHASE_LOGS.items():
            if match := re.match(pattern, message):
                self.seconds[phase] = float(match.group(1))


def _on_cluster(archive: Path, sha256: str, out: Path, workers: int) -> tuple[float, dict[str, float]]:
    """ingest() with DASK_SCHEDULER_ADDRESS at a LocalCluster of `workers` single-threaded processes: wall (the
    cluster's start excluded) and the logged phase seconds."""
    from distributed import Client, LocalCluster

    phases = _Phases()
    logger = logging.getLogger("tasks.ingest")
    logger.addHandler(phases)
    logger.setLevel(logging.INFO)
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:  # imports done before timing, as on a running cluster
            client.run(importlib.import_module, "tasks.ingest")
        os.environ["DASK_SCHEDULER_ADDRESS"] = cluster.scheduler_address
        try:
            wall = _stream_in_process(archive, sha256, out)[0]
        finally:
            del os.environ["DASK_SCHEDULER_ADDRESS"]
            logger.removeHandler(phases)
    return wall, phases.seconds


def _gzip_dc(archive: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["gzip", "-dc", str(archive)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def _band_bytes(archive: Path) -> list[list[bytes]]:
    """Every patch's 12 band files, in memory."""
    patches: dict[str, list[bytes]] = {}
    with tarfile.open(archive, "r|gz") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".tif"):
                patches.setdefault(Path(member.name).parent.name, []).append(tar.extractfile(member).read())
            tar.members.clear()
    return list(patches.values())


def _decode_all(bands: list[list[bytes]]) -> float:
    reader = BandReader()
    start = time.perf_counter()
    for patch in bands:
        for data in patch:
            reader.decode(data)
    return time.perf_counter() - start


def _cli(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"tasks.{module}", *args]


def _today(archive: Path, sha256: str, out: Path) -> tuple[float, float, int, int, dict[str, float]]:
    """download → validate → tile as command lines; wall, CPU, peak and final disk, CPU per phase."""
    raw, validated, tiles = out / "raw", out / "validated", out / "tiles"
    walls, cpus = {}, {}
    with _disk_peak(out) as peak:
        for phase, command in (
            ("download", _cli("download", "--url", str(archive), "--sha256", sha256, "--dest", str(raw))),
            ("validate", None),
            ("tile", None),
        ):
            if phase == "validate":
                root = next(p for p in (raw / "extracted").iterdir() if p.is_dir())
                command = _cli("validate", "--patches", str(root), "--out", str(validated))
            elif phase == "tile":
                command = _cli("tile", "--patches", str(root), "--out", str(tiles), "--report",
                               str(validated / "report.json"))  # fmt: skip
            before = _children_cpu()
            walls[phase] = run_measured(command).seconds
            cpus[phase] = _children_cpu() - before
    final = _allocated(validated) + _allocated(tiles)
    return sum(walls.values()), sum(cpus.values()), peak[0], final, cpus


def _stream_cli(archive: Path, sha256: str, out: Path) -> tuple[float, int, int, int]:
    """The stream's command line: wall, peak memory of its process tree, peak and final disk under `out`."""
    with _disk_peak(out) as peak:
        measured = run_measured(_cli("ingest", "--url", str(archive), "--sha256", sha256, "--out", str(out)))
    return measured.seconds, measured.peak_rss_bytes, peak[0], _allocated(out)


def _stream_in_process(archive: Path, sha256: str, out: Path) -> tuple[float, float, float]:
    """ingest() in this process: wall, driver CPU, worker CPU."""
    wall, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
    ingest(
        url=str(archive),
        checksum=Checksum("sha256", sha256),
        out=out,
        params=load_section("ingest", IngestParams),
        validate_params=load_section("validate", ValidateParams),
        tile_params=load_section("tile", TileParams),
        download_params=load_section("download", DownloadParams),
    )
    return time.perf_counter() - wall, time.process_time() - cpu, _children_cpu() - children


def _tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _gzip_ratios(mirror_archive: Path) -> dict[str, float]:
    """Compressed / uncompressed tar bytes: the 6 real patches and 6 of the mirror's synthesized ones."""
    real: dict[str, bytes] = {}
    with tarfile.open(ben.example_archive(), "r:bz2") as tar:
        for member in tar:
            if member.isfile():
                real[member.name] = tar.extractfile(member).read()
    real_ids = {Path(n).parent.name for n in real}
    synthesized: dict[str, bytes] = {}
    with tarfile.open(mirror_archive, "r|gz") as tar:
        for member in tar:
            folder = Path(member.name).parent.name
            if member.isfile() and folder not in real_ids:
                if len({Path(n).parent.name for n in synthesized} | {folder}) > 6:
                    break
                synthesized[member.name] = tar.extractfile(member).read()
    ratios = {}
    for name, files in (("real", real), ("mirror", synthesized)):
        raw = _tar_of(files)
        for level in (1, 6):
            ratios[f"{name} level {level}"] = len(gzip.compress(raw, compresslevel=level)) / len(raw)
        ratios[f"{name} bytes per patch"] = len(raw) / 6
    return ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patches", type=int, default=5000, help="mirror size for throughput and disk")
    p.add_argument("--large", type=int, default=50000, help="memory ratio: this size over --small (0: skip)")
    p.add_argument("--small", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", type=Path, default=REPO / ".local" / "bench-ingest-full")
    p.add_argument("--cluster-workers", type=int, nargs="*", default=[1, 2],
                   help="LocalCluster sizes for the indexed path (DASK_SCHEDULER_ADDRESS); none: skip")  # fmt: skip
    args = p.parse_args()
    load_start = _load()
    print(f"ingest_full: 1-minute load average at start {load_start:.2f}", flush=True)
    mirror = _mirror(args.work, args.patches)
    level = load_section("mirror", MirrorParams).compresslevel
    archive = _official_layout(mirror.archive, args.work / "mirrors", level)
    sha256 = file_digest(archive, "sha256")
    n = len(mirror.patch_ids)
    headers = {"mirror": _headers_per_patch(mirror.archive), "official layout": _headers_per_patch(archive)}
    runs = args.work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    size = archive.stat().st_size
    try:
        gzip_dc = min(_gzip_dc(archive) for _ in range(args.repeats))
        bands = _band_bytes(archive)
        decode = min(_decode_all(bands) for _ in range(args.repeats))
        del bands

        today, stream = [], []
        for r in range(args.repeats):
            today.append(_today(archive, sha256, runs / f"today-{r}"))
            shutil.rmtree(runs / f"today-{r}")
            stream.append(_stream_cli(archive, sha256, runs / f"stream-{r}" / "out"))
            shutil.rmtree(runs / f"stream-{r}")
        inproc = _stream_in_process(archive, sha256, runs / "inproc")
        shutil.rmtree(runs / "inproc")
        cluster = {}
        for workers in args.cluster_workers:
            cluster[workers] = min(
                (_on_cluster(archive, sha256, runs / f"cluster-{workers}-{r}", workers) for r in range(args.repeats)),
                key=lambda measured: measured[1].get("ranges", measured[0]),
            )
            for r in range(args.repeats):
                shutil.rmtree(runs / f"cluster-{workers}-{r}", ignore_errors=True)
        best_today = min(today, key=lambda t: t[0])
        best_stream = min(stream, key=lambda s: s[0])

        memory = {}
        if args.large:
            for count in (args.small, args.large):
                # The official lists name 9,280 cloud patches: a 50,000-patch mirror at the default 0.3 would need
                # 15,000. Both sizes take 0.15 (the real archive's share is 1.6 %), so they differ in size only.
                m = _mirror(args.work, count, cloud_fraction=LARGE_CLOUD_FRACTION)
                laid_out = _official_layout(m.archive, args.work / "mirrors", level)
                sha256_of = file_digest(laid_out, "sha256")
                seconds, rss, _, _ = _stream_cli(laid_out, sha256_of, runs / f"mem-{count}" / "out")
                memory[count] = (seconds, rss, len(m.patch_ids))
                shutil.rmtree(runs / f"mem-{count}")
        ratios = _gzip_ratios(archive)
    finally:
        shutil.rmtree(runs, ignore_errors=True)

    rate = lambda seconds: n / seconds  # noqa: E731
    slower_limit = min(rate(gzip_dc), rate(decode))
    wall, driver_cpu, worker_cpu = inproc
    cores = os.cpu_count() or 1
    # Per-core rates → this machine: the driver's work is serial; the rest spreads over the cores.
    stream_proj = FULL_PATCHES * max(driver_cpu, (driver_cpu + worker_cpu) / cores) / n
    today_cpu = best_today[4]
    today_proj = FULL_PATCHES * (today_cpu["download"] + (today_cpu["validate"] + today_cpu["tile"]) / cores) / n
    rows = [
        ("patches (mirror, seed 1)", f"{n:,}; archive {size / 1e6:.0f} MB", ""),
        ("(a) `gzip -dc` (1 process)", f"{rate(gzip_dc):,.0f} patches/s ({size / gzip_dc / 1e6:.0f} MB/s)", ""),
        ("(b) every band decoded from memory, BandReader (1 process)", f"{rate(decode):,.0f} patches/s", ""),
        ("stream, `python -m tasks.ingest` whole command line", f"{rate(best_stream[0]):,.0f} patches/s "
         f"({best_stream[0]:.1f} s)", ""),
        ("stream / slower of (a), (b)", f"{rate(best_stream[0]) / slower_limit:.2f}", "≥ 0.8"),
        ("stream in-process: wall; CPU driver + workers", f"{wall:.1f} s; {driver_cpu:.1f} + {worker_cpu:.1f} s", ""),
        ("in-process stream / slower of (a), (b)", f"{rate(wall) / slower_limit:.2f}", ""),
        ("today: download + validate + tile command lines", f"{rate(best_today[0]):,.0f} patches/s "
         f"({best_today[0]:.1f} s)", ""),
        ("stream / today", f"{best_today[0] / best_stream[0]:.2f}", "≥ 2"),
        ("peak disk / (archive + outputs), stream", f"{(size + best_stream[2]) / (size + best_stream[3]):.2f} "
         f"({(size + best_stream[2]) / 1e6:.0f} / {(size + best_stream[3]) / 1e6:.0f} MB)", "1.0"),
        ("peak disk / (archive + outputs), today", f"{(size + best_today[2]) / (size + best_today[3]):.2f} "
         f"({(size + best_today[2]) / 1e6:.0f} / {(size + best_today[3]) / 1e6:.0f} MB)", ""),
    ]  # fmt: skip
    if cluster:
        base = min(cluster)
        base_wall, base_phases = cluster[base]
        for workers, (cluster_wall, phases) in sorted(cluster.items()):
            rows.append((
                f"indexed path, LocalCluster of {workers}: wall; indexing pass; ranges",
                f"{cluster_wall:.1f} s; {phases.get('index', float('nan')):.1f} s; "
                f"{phases.get('ranges', float('nan')):.1f} s ({rate(cluster_wall):,.0f} patches/s whole)",
                "",
            ))  # fmt: skip
            if workers != base:
                rows.append((
                    f"ranges: {workers} workers / {base} (speed-up); whole ingest",
                    f"**{base_phases['ranges'] / phases['ranges']:.2f}**; {base_wall / cluster_wall:.2f}",
                    f"≥ {0.8 * workers / base:.1f}",
                ))  # fmt: skip
        # 32 workers: the indexing pass is serial (its per-file rate as measured); ranges spread over the workers;
        # what the driver does after them (report, arrangement, statistics, metadata) as measured on this machine.
        index_s, ranges_s = base_phases["index"], base_phases["ranges"] * base
        tail = base_wall - base_phases["index"] - base_phases["ranges"]
        projected = FULL_PATCHES / n * (index_s + ranges_s / 32 + tail)
        rows.append((
            "590,326 patches on 32 single-core Dask workers, from these rates (index serial, ranges / 32, driver's "
            "tail serial)",
            f"{projected / 3600:.2f} h (index {FULL_PATCHES / n * index_s / 3600:.2f} h)",
            "",
        ))  # fmt: skip
    rows.append(("tar header blocks per patch: mirror; official layout (measured on)",
                 f"{headers['mirror']:.1f}; {headers['official layout']:.1f}", ""))  # fmt: skip
    if memory:
        (small_s, small_rss, small_n), (large_s, large_rss, large_n) = memory[args.small], memory[args.large]
        marginal = (large_s - small_s) / (large_n - small_n)
        rows += [
            (f"peak memory, stream command line, {large_n:,} / {small_n:,} patches",
             f"{large_rss / small_rss:.2f} ({large_rss / 2**20:,.0f} / {small_rss / 2**20:,.0f} MiB)", "≤ 1.2"),
            (f"stream wall at {large_n:,} / {small_n:,}", f"{large_s:.0f} / {small_s:.0f} s "
             f"(marginal {1 / marginal:,.0f} patches/s)", ""),
            ("stream's marginal rate / slower of (a), (b): its throughput on a large archive",
             f"**{1 / marginal / slower_limit:.2f}**", "≥ 0.8"),
            ("590,326 patches at that marginal rate", f"{FULL_PATCHES * marginal / 3600:.2f} h", ""),
        ]  # fmt: skip
    rows += [
        (f"590,326 patches projected from per-core CPU ({cores} cores): stream", f"{stream_proj / 3600:.2f} h", ""),
        ("... today's path (download serial; validate, tile over the cores)", f"{today_proj / 3600:.2f} h", ""),
        ("gzip ratio, 6 real example patches, level 1 / 6", f"{ratios['real level 1']:.3f} / "
         f"{ratios['real level 6']:.3f}", ""),
        ("gzip ratio, 6 mirror patches, level 1 (the mirror's) / 6", f"{ratios['mirror level 1']:.3f} / "
         f"{ratios['mirror level 6']:.3f}", ""),
        ("official archive: 66 GB over 590,326 real patches' tar bytes",
         f"{FULL_ARCHIVE_BYTES / (FULL_PATCHES * ratios['real bytes per patch']):.3f}", ""),
    ]  # fmt: skip
    print("\n| measurement | result | target |\n|---|---|---|")
    for name, value, target in rows:
        print(f"| {name} | {value} | {target} |")
    print(f"\n1-minute load average: {load_start:.2f} at the start, {_load():.2f} at the end", flush=True)


if __name__ == "__main__":
    main()
