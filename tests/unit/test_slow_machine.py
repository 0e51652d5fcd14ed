"""bench.slow_machine holds a process tree, and the trainer within it, to a CPU share (cgroup v1, root only)."""

from __future__ import annotations

import os
import resource
import subprocess
import time

import pytest

from bench.slow_machine import Unavailable, _own_group, emulated


def _cgroup_v1() -> bool:
    try:
        _own_group()
    except (Unavailable, OSError):
        return False
    return os.geteuid() == 0


pytestmark = pytest.mark.skipif(not _cgroup_v1(), reason="needs root and cgroup v1's cpu hierarchy")

BUSY = "end=$((SECONDS+2)); while [ $SECONDS -lt $end ]; do :; done"


def _cpu_seconds(*argv: str) -> float:
    """CPU time of a child that spins for 2 s of wall time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(["bash", "-c", BUSY, *argv], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def test_the_tree_gets_its_share_and_a_trainer_a_smaller_one():
    with emulated(cpus=0.5, trainer_cpus=0.1):
        other = _cpu_seconds("other")
        time.sleep(0.3)
        trainer = _cpu_seconds("-m", "tasks.train")  # argv as the local backend starts it

    assert 0.4 < other < 1.3  # half a core for 2 s; unlimited it would take ~2 s
    assert trainer < 0.45  # a tenth of a core once the watcher moved it (within 0.2 s)
    assert _cpu_seconds("after") > 1.3  # the limits end with the block
