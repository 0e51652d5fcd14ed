"""Wall time and the peak resident memory of a whole process tree, for benchmarks."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
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
def sampled_peak(read: Callable[[], int], interval: float = POLL_SECONDS, *, last: bool = False) -> Iterator[list[int]]:
    """Call `read` every `interval` seconds from a thread while the block runs.

    Yields a one-element list holding the largest value read so far; it is final once the block has ended (with
    `last`, after one more reading taken then).
    """
    peak, stop = [0], threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], read())
            stop.wait(interval)

    sampler = threading.Thread(target=poll, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()
        if last:
            peak[0] = max(peak[0], read())


def tree_rss_peak(pid: int, *, include_self: bool = True) -> contextlib.AbstractContextManager[list[int]]:
    """Sample the summed RSS of process `pid` (and its descendants) every 50 ms while the block runs (sampled_peak)."""
    try:
        root: psutil.Process | None = psutil.Process(pid)
    except psutil.Error:
        root = None

    def rss() -> int:
        if root is None:
            return 0
        try:
            return _tree_rss(root, include_self)
        except psutil.Error:
            return 0

    return sampled_peak(rss)


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
