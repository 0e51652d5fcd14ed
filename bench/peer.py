"""Peer benchmark: the BigEarthNet authors' `bigearthnet-encoder` converting a BigEarthNet-S2 folder into LMDB.

    python -m bench.peer --patches ROOT [--venv .local/bench/peer-venv] [--out DIR]

The peer tool cannot share the project's environment: `bigearthnet_common.base` imports `fastcore.dispatch`, which
fastcore 1.8 removed, so it runs from its own virtual environment (built once, reused) with `fastcore<1.8`. The run is
`ben_encoder write-s2-lmdb-raw ROOT --lmdb-path OUT` (all 12 bands of each patch, pickled, one LMDB entry per patch),
timed wall-clock, with the peak resident memory of the child process tree. The peer only encodes folders whose name
matches the BigEarthNet-S2 patch name pattern; `patches` counts those folders the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.measure import tree_rss_peak
from tasks.lib.bigearthnet import PATCH_NAME_RE

log = logging.getLogger(__name__)

DEFAULT_VENV = Path(__file__).resolve().parents[1] / ".local" / "bench" / "peer-venv"
# The peer stack as last released (2022-10). fastcore 1.8 removed fastcore.dispatch, which bigearthnet_common.base
# imports at load time; everything else resolves to current releases and works (numpy 2, pydantic 2, rasterio 1.4).
PEER_REQUIREMENTS = (
    "bigearthnet-encoder==0.3.0",
    "bigearthnet-common==2.8.0",
    "bigearthnet-patch-interface==0.1.2",
    "fastcore<1.8",
)
LMDB_NAME = "peer.lmdb"
_TAIL_CHARS = 2000


@dataclass(frozen=True)
class PeerRun:
    seconds: float
    peak_rss_bytes: int
    patches: int
    output_bytes: int

    @property
    def patches_per_second(self) -> float:
        return self.patches / self.seconds if self.seconds > 0 else float("inf")


def _bin(venv: Path, name: str) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin") / name


def _tail(text: str | bytes | None) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "").strip()[-_TAIL_CHARS:]


def _run(cmd: list[str], *, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    log.info("running: %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"peer venv: `{' '.join(cmd)}` failed: {exc}") from exc
    if proc.returncode != 0:
        raise RuntimeError(
            f"peer venv: `{' '.join(cmd)}` exited {proc.returncode}; stderr tail:\n{_tail(proc.stderr or proc.stdout)}"
        )
    return proc


def _works(exe: Path) -> bool:
    """True when `ben_encoder --help` runs: it imports bigearthnet_common.base, where a wrong fastcore fails."""
    if not exe.is_file():
        return False
    try:
        return subprocess.run([str(exe), "--help"], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with (path.parent / f".{path.name}.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_peer_venv(path: Path = DEFAULT_VENV) -> Path:
    """Create (once) the peer's virtual environment at `path` and return its `ben_encoder` executable.

    Reuses the environment when its `ben_encoder` already works; otherwise (re)creates it with `uv venv --python 3.11`
    and `uv pip install` (or `python -m venv` + pip when uv is not on PATH). Concurrent callers serialise on a lock
    file beside `path`. Raises RuntimeError naming the failing command and its stderr tail.
    """
    path = Path(path).absolute()
    exe = _bin(path, "ben_encoder")
    if _works(exe):
        log.info("peer venv %s: reusing %s", path, exe)
        return exe
    with _locked(path):
        if _works(exe):  # built by a concurrent caller while we waited
            log.info("peer venv %s: reusing %s", path, exe)
            return exe
        started = time.perf_counter()
        uv = shutil.which("uv")
        if uv:
            log.info("peer venv %s: creating with uv (%s)", path, ", ".join(PEER_REQUIREMENTS))
            _run([uv, "venv", "--clear", "--python", "3.11", str(path)])
            _run([uv, "pip", "install", "--python", str(_bin(path, "python")), *PEER_REQUIREMENTS])
        else:
            log.info("peer venv %s: uv not on PATH, creating with %s -m venv + pip", path, sys.executable)
            if path.exists():
                shutil.rmtree(path)
            _run([sys.executable, "-m", "venv", str(path)])
            pip = [str(_bin(path, "python")), "-m", "pip"]
            _run([*pip, "install", "--disable-pip-version-check", "--quiet", *PEER_REQUIREMENTS])
        if not _works(exe):
            probe = subprocess.run([str(exe), "--help"], capture_output=True, text=True) if exe.is_file() else None
            detail = _tail(probe.stderr) if probe else f"{exe} was not installed"
            raise RuntimeError(f"peer venv: `{exe} --help` does not run after install; stderr tail:\n{detail}")
        log.info("peer venv %s: ready in %.1f s", path, time.perf_counter() - started)
        return exe


def count_patches(root: Path) -> int:
    """Patch folders under `root` that the peer encodes: directories named like a BigEarthNet-S2 patch."""
    return sum(1 for p in Path(root).iterdir() if p.is_dir() and PATCH_NAME_RE.fullmatch(p.name))


def _lmdb_bytes(lmdb_path: Path) -> int:
    if lmdb_path.is_file():
        return lmdb_path.stat().st_size
    return sum(f.stat().st_size for f in lmdb_path.rglob("*") if f.is_file())


def _venv_dir(venv: Path) -> Path:
    """Accept the venv directory or its `ben_encoder` executable."""
    venv = Path(venv).absolute()
    return venv.parent.parent if venv.is_file() else venv


def run_peer(root: Path, out_dir: Path, venv: Path = DEFAULT_VENV) -> PeerRun:
    """Run `ben_encoder write-s2-lmdb-raw root --lmdb-path out_dir/peer.lmdb` and measure it.

    `seconds` is the wall time of the whole command (interpreter start-up included). `peak_rss_bytes` is the larger
    of GNU time's max RSS (`/usr/bin/time -f %M`, exact for the peer's single process; used when available) and the
    peak of the process tree's summed RSS polled every 50 ms with psutil (covers children running at once). A previous
    `peer.lmdb` in `out_dir` is replaced, since LMDB would otherwise add to it. The peer's output goes to
    `out_dir/peer.log`.
    """
    root, out_dir = Path(root).absolute(), Path(out_dir).absolute()
    exe = _bin(_venv_dir(venv), "ben_encoder")
    if not exe.is_file():
        raise FileNotFoundError(f"{exe} not found: build the peer venv with ensure_peer_venv() first")
    patches = count_patches(root)
    if patches == 0:
        raise ValueError(f"{root}: no BigEarthNet-S2 patch folders")
    out_dir.mkdir(parents=True, exist_ok=True)
    lmdb_path = out_dir / LMDB_NAME
    if lmdb_path.is_dir():
        shutil.rmtree(lmdb_path)
    elif lmdb_path.exists():
        lmdb_path.unlink()
    cmd = [str(exe), "write-s2-lmdb-raw", str(root), "--lmdb-path", str(lmdb_path)]

    gnu_time = Path("/usr/bin/time")
    use_time = gnu_time.is_file() and os.access(gnu_time, os.X_OK)
    with tempfile.NamedTemporaryFile("r", prefix="peer-time-", suffix=".txt") as time_out:
        full = [str(gnu_time), "-f", "%M", "-o", time_out.name, *cmd] if use_time else cmd
        log.info("running: %s", " ".join(full))
        log_path = out_dir / "peer.log"
        with log_path.open("wb") as log_fh:
            started = time.perf_counter()
            proc = subprocess.Popen(full, stdout=log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            # Under GNU time the peer is time's child: sample the tree below time, not time itself.
            with tree_rss_peak(proc.pid, include_self=not use_time) as peak:
                returncode = proc.wait()
            seconds = time.perf_counter() - started
        if returncode != 0:
            raise RuntimeError(
                f"peer: `{' '.join(cmd)}` exited {returncode}; output tail ({log_path}):\n"
                f"{_tail(log_path.read_bytes())}"
            )
        time_rss = 0
        if use_time:
            lines = [ln.strip() for ln in Path(time_out.name).read_text().splitlines() if ln.strip()]
            if lines and lines[-1].isdigit():
                time_rss = int(lines[-1]) * 1024  # GNU time reports kilobytes
    if not lmdb_path.exists():
        raise RuntimeError(f"peer: `{' '.join(cmd)}` succeeded but wrote no {lmdb_path}")
    run = PeerRun(
        seconds=seconds,
        peak_rss_bytes=max(time_rss, peak[0]),
        patches=patches,
        output_bytes=_lmdb_bytes(lmdb_path),
    )
    log.info(
        "peer: %d patches in %.2f s (%.1f patches/s), peak RSS %.0f MB, LMDB %.1f MB",
        run.patches,
        run.seconds,
        run.patches_per_second,
        run.peak_rss_bytes / 1e6,
        run.output_bytes / 1e6,
    )
    return run


_COUNT_ENTRIES = (
    "import lmdb, sys; print(lmdb.open(sys.argv[1], readonly=True, lock=False, subdir=True).stat()['entries'])"
)


def lmdb_entries(lmdb_path: Path, venv: Path = DEFAULT_VENV) -> int:
    """Number of entries in the peer's LMDB, read with the peer venv's own `lmdb` module."""
    python = _bin(_venv_dir(venv), "python")
    proc = _run([str(python), "-c", _COUNT_ENTRIES, str(lmdb_path)], timeout=120)
    return int(proc.stdout.strip().splitlines()[-1])


def startup_seconds(venv: Path = DEFAULT_VENV) -> float:
    """Wall time of `ben_encoder --help`: the interpreter and import cost included in every run's `seconds`."""
    exe = _bin(_venv_dir(venv), "ben_encoder")
    started = time.perf_counter()
    subprocess.run([str(exe), "--help"], capture_output=True, check=True)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patches", type=Path, required=True, help="BigEarthNet-S2 root folder (one folder per patch)")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="peer virtual environment (built if needed)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one, removed after)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    ensure_peer_venv(args.venv)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-peer-"))
    try:
        run = run_peer(args.patches, out, args.venv)
        entries = lmdb_entries(out / LMDB_NAME, args.venv)
        startup = startup_seconds(args.venv)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()
    print(f"peer benchmark: bigearthnet-encoder write-s2-lmdb-raw, {run.patches} patches in {args.patches}")
    print(f"  wall time        {run.seconds:8.2f} s   ({run.patches_per_second:.1f} patches/s)")
    print(
        f"  without start-up {run.seconds - startup:8.2f} s   ({run.patches / max(run.seconds - startup, 1e-9):.1f}"
        f" patches/s; `ben_encoder --help` takes {startup:.2f} s)"
    )
    print(f"  peak RSS         {run.peak_rss_bytes / 2**20:8.1f} MiB")
    print(f"  LMDB size        {run.output_bytes / 2**20:8.1f} MiB ({entries} entries)")
    print(f"  load average     {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if entries != run.patches:
        print(f"  WARNING: {entries} LMDB entries for {run.patches} patch folders", file=sys.stderr)


if __name__ == "__main__":
    main()
