"""Ingest benchmarks: each stage's throughput as a ratio to the plain tool doing the same work, in one run.

    python -m bench.ingest [--patches 2000] [--repeats 3]

- validate raster checks vs the decode-only limit: tifffile reading the same 12 band files per patch on the same
  worker processes, doing nothing else. The checks add nodata/saturation counts and a content hash.
- download extraction (Python tarfile, safety checks per member) vs `tar xzf` of the same archive.
- mirror build rate, in patches per second (the issue's bar: 2,000 patches well under a minute).
Measurements alternate (A, B, A, B, ...) and the median of each is reported, so machine noise hits both sides.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import tifffile

from tasks.lib import bigearthnet as ben
from tasks.lib.archive import extract
from tasks.lib.config import load_section
from tasks.mirror import MirrorParams, build_mirror
from tasks.validate import ValidateParams, _check_patch


def _decode_only(folder: Path) -> int:
    return sum(int(tifffile.imread(folder / ben.band_file(folder.name, band)).size) for band in ben.BANDS)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _pooled(fn, folders: list[Path], workers: int) -> None:
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(fn, folders, chunksize=32))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patches", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        params = load_section("mirror", MirrorParams, overrides=[f"mirror.patches={args.patches}", "mirror.seed=1"])
        build_seconds = _timed(lambda: build_mirror(out=work / "mirror", params=params))
        archive = work / "mirror" / next(p.name for p in (work / "mirror").glob("*.tar.gz"))
        n = args.patches + 6

        extract_py, extract_tar = [], []
        for i in range(args.repeats):
            (work / f"py{i}").mkdir()
            extract_py.append(_timed(lambda i=i: extract(archive, work / f"py{i}", "gz")))
            (work / f"tar{i}").mkdir()
            extract_tar.append(
                _timed(
                    lambda i=i: subprocess.run(["tar", "xzf", str(archive), "-C", str(work / f"tar{i}")], check=True)
                )
            )
        root = next((work / "py0").iterdir())
        folders = sorted(p for p in root.iterdir() if p.is_dir())

        vparams = load_section("validate", ValidateParams)
        check = partial(_check_patch, params=vparams)
        checks, decodes = [], []
        for _ in range(args.repeats):
            decodes.append(_timed(lambda: _pooled(_decode_only, folders, vparams.workers)))
            checks.append(_timed(lambda: _pooled(check, folders, vparams.workers)))

        med = statistics.median
        print(f"ingest benchmark: {n} patches, {args.repeats} alternating repeats, {vparams.workers} workers")
        print(f"  mirror build              {n / build_seconds:8.0f} patches/s  ({build_seconds:.1f} s)")
        print(f"  validate raster checks    {n / med(checks):8.0f} patches/s")
        print(f"  decode-only (tifffile)    {n / med(decodes):8.0f} patches/s")
        print(f"  ratio checks / decode     {med(decodes) / med(checks):8.2f}")
        print(f"  extract (archive.py)      {n / med(extract_py):8.0f} patches/s")
        print(f"  extract (tar xzf)         {n / med(extract_tar):8.0f} patches/s")
        print(f"  ratio ours / tar          {med(extract_tar) / med(extract_py):8.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
