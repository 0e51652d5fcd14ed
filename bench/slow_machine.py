"""A slower machine of this kind, emulated on this one with the kernel's CPU bandwidth control (cgroups).

`emulated(cpus=..., trainer_cpus=...)` holds this process and everything it starts to `cpus` cores' worth of CPU time,
and every `python -m tasks.train` process, from the moment a watcher sees it, to `trainer_cpus`: the two machines of
this kind differ far more in training (oneDNN's AVX-512 kernels against AVX2) than in the rest. It needs root and
cgroup v1's cpu hierarchy with CFS bandwidth control (what machines of this kind mount); without them it says so
instead of measuring something else.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000
TRAINER_MARK = ("-m", "tasks.train")  # how the local backend starts the trainer


class Unavailable(RuntimeError):
    """This machine cannot hold processes to a CPU share (no cpu controller, or no permission)."""


class _Group:
    """One cgroup of cgroup v1's cpu hierarchy, with a CPU quota."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, parent: Path, name: str, cpus: float) -> _Group:
        group = cls(parent / name)
        try:
            group.path.mkdir()
            (group.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group.path / "cpu.cfs_quota_us").write_text(str(round(cpus * PERIOD_US)))
        except OSError as exc:
            raise Unavailable(f"cannot create a CPU-limited cgroup under {parent}: {exc}") from exc
        return group

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def pids(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def remove(self, into: Path) -> None:
        """Move what is left into `into` (the group this process started in), then delete this one."""
        for pid in self.pids():
            with contextlib.suppress(OSError):
                (into / "cgroup.procs").write_text(str(pid))
        with contextlib.suppress(OSError):
            self.path.rmdir()


def _own_group() -> Path:
    """The cpu cgroup this process is in."""
    if (CGROUP_ROOT / "cgroup.controllers").is_file():
        raise Unavailable(f"{CGROUP_ROOT} is cgroup v2; this emulation drives cgroup v1's cpu hierarchy only")
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            group = CGROUP_ROOT / "cpu" / path.lstrip("/")
            if (group / "cpu.cfs_quota_us").is_file():
                return group
    raise Unavailable("no cgroup v1 cpu hierarchy with CFS bandwidth control is mounted under /sys/fs/cgroup/cpu")


def _is_trainer(pid: int) -> bool:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    words = [a.decode(errors="replace") for a in args]
    return any(words[i : i + 2] == list(TRAINER_MARK) for i in range(len(words) - 1))


@contextlib.contextmanager
def emulated(cpus: float, trainer_cpus: float | None = None, poll_seconds: float = 0.2) -> Iterator[dict[str, float]]:
    """Hold this process tree to `cpus` cores and the trainer to `trainer_cpus` inside the block.

    Yields the settings (for the record). Raises Unavailable when the machine cannot do it.
    """
    if os.geteuid() != 0:
        raise Unavailable("holding processes to a CPU share needs root (cgroup files are root's)")
    home = _own_group()
    name = f"cloudscreen-slow-{uuid.uuid4().hex[:8]}"
    demo = _Group.create(home, name, cpus)
    trainer = _Group.create(demo.path, "trainer", trainer_cpus) if trainer_cpus else None  # nested: both limits hold
    stop = threading.Event()

    def watch() -> None:
        moved: set[int] = set()
        while not stop.wait(poll_seconds):
            for pid in demo.pids():
                if pid not in moved and _is_trainer(pid):
                    with contextlib.suppress(OSError):
                        trainer.add(pid)
                    moved.add(pid)

    watcher = threading.Thread(target=watch, name="slow-machine-trainer-watch", daemon=True) if trainer else None
    demo.add(os.getpid())
    if watcher:
        watcher.start()
    try:
        yield {"cpus": cpus, "trainer_cpus": trainer_cpus or cpus}
    finally:
        stop.set()
        if watcher:
            watcher.join()
        (home / "cgroup.procs").write_text(str(os.getpid()))
        if trainer:
            trainer.remove(home)
        demo.remove(home)
