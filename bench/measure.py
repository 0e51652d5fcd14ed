"""Wall time and the peak resident memory of a whole process tree, for benchmarks."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

POLL_SECONDS = 0.05


@dataclass(frozen=True)
class Measured:
    seconds: float
    peak_rss_bytes: int  # sum over the process and all its descendants, at the worst moment


def _tree_rss(root: psutil.Process, include_self: bool) -> int:
    total = 0
    for proc in [*([root] if include_self else []), *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # exited between listing and reading
            total += proc.memory_info().rss
    return total


@contextlib.contextmanager
def tree_rss_peak(pid: int, *, include_self: bool = True) -> Iterator[list[int]]:
    """Sample the summed RSS of process `pid` (and its descendants) every 50 ms while the block runs.

    Yields a one-element list holding the peak in bytes so far; it is final once the block has ended.
    """
    peak, stop = [0], threading.Event()

    def poll() -> None:
        try:
            root = psutil.Process(pid)
        except psutil.Error:
            return
        while not stop.is_set():
            with contextlib.suppress(psutil.Error):
                peak[0] = max(peak[0], _tree_rss(root, include_self))
            stop.wait(POLL_SECONDS)

    sampler = threading.Thread(target=poll, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()


def run_measured(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> Measured:
    """Run `cmd` to completion (raising on a non-zero exit) while sampling its tree's memory."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with tree_rss_peak(proc.pid) as peak:
        _, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {stderr[-2000:]}")
    return Measured(seconds, peak[0])
