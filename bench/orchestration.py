"""Orchestration overhead: the demo's two DAG runs, wall time over the time their tasks took, measured in one run.

    python -m bench.orchestration [--keep] [--cpus N [--trainer-cpus M]] [--set SECTION.KEY=VALUE ...]

Runs `make demo`'s pipeline (demo.run.run_demo: the refresh DAG, then the training DAG on the local backend, with
dag.test() against a local Airflow home, the GCS emulator and a real MLflow server) from scratch in a scratch
directory under .local/bench/orchestration (the mirror archive is copied from .local/data/mirror when `make demo` has
built it, since building it is not part of either DAG). It prints:
- the overhead: wall time of both DAG runs, from the start of the first to the end of the second, over the sum of
  their task instances' durations as Airflow recorded them (target <= 1.3: scheduling, task start-up, XCom and
  metadata writes cost less than a third of the work);
- the whole demo's wall time (servers, Airflow set-up and both DAG runs; target: under 10 minutes here), the same over
  the tasks' time, and each task's time.
Both sides come from the same run, so a busy spell of a shared machine stretches both.

--cpus emulates a slower machine of this kind (bench.slow_machine, cgroup v1 CPU bandwidth, root): the whole demo
held to N cores' worth of CPU time and, with --trainer-cpus, the trainer to M. The mirror is then built too, as
from a fresh clone. `--cpus 1 --trainer-cpus 0.33` is a machine twice as slow as this 2-core one at everything and
six times as slow at training (the seed CNN's 150 against 25 images/s of issue 15).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil

from bench.slow_machine import Unavailable, emulated
from demo.run import DEMO_INGEST, DEMO_TRAINING, REPO, describe, run_demo, wall_time
from tasks.lib import cli
from tasks.lib.cli import configure_logging
from tasks.lib.pipeline import INGEST_PATHS

SCRATCH = REPO / ".local" / "bench" / "orchestration"
TARGET = 1.3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", action="store_true", help=f"keep {SCRATCH} afterwards (default: remove it)")
    p.add_argument("--cpus", type=float, help="hold the whole demo to this many cores' worth of CPU time (emulation)")
    p.add_argument("--trainer-cpus", type=float, help="with --cpus: hold the trainer to this many cores' worth")
    cli.add_overrides(p, "a training param for the demo's training run, after the demo's own (repeatable)")
    p.add_argument("--ingest", choices=INGEST_PATHS, default=DEMO_INGEST, help="the refresh's ingest path")
    args = p.parse_args()
    if args.trainer_cpus and not args.cpus:
        p.error("--trainer-cpus needs --cpus")
    configure_logging(verbose=False)
    shutil.rmtree(SCRATCH, ignore_errors=True)
    built = REPO / ".local" / "data" / "mirror"
    if built.is_dir() and not args.cpus:
        shutil.copytree(built, SCRATCH / "data" / "mirror")
    try:
        with emulated(args.cpus, args.trainer_cpus) if args.cpus else contextlib.nullcontext() as slow:
            outcome = run_demo(SCRATCH, training=[*DEMO_TRAINING, *args.overrides], ingest=args.ingest)
    except Unavailable as exc:
        p.error(f"--cpus: {exc}")
    finally:
        if not args.keep:
            shutil.rmtree(SCRATCH, ignore_errors=True)
    print(f"\n{describe(outcome)}")  # what the demo reached: epochs, test figures, the gate's verdict
    runs = [outcome.refresh, outcome.training, *([outcome.screening] if outcome.screening else [])]
    tasks = {f"{o.dag_id}.{task}": seconds for o in runs for task, seconds in o.task_seconds.items() if seconds}
    print("\ntask                                   seconds")
    for name, seconds in tasks.items():
        print(f"{name:<38} {seconds:7.1f}")
    print(
        f"\nDAG runs {outcome.dag_seconds:.1f} s over their tasks {outcome.task_seconds:.1f} s: overhead "
        f"{outcome.overhead:.2f} (target <= {TARGET}, {'met' if outcome.overhead <= TARGET else 'MISSED'}); "
        f"whole demo {outcome.seconds:.0f} s (target < 600 s), {outcome.seconds / outcome.task_seconds:.2f} times its "
        "tasks' time (with the MLflow server's start, the Airflow set-up and the mirror copy: none of them a task)"
    )
    print(wall_time(outcome.seconds))
    if slow:
        print(
            f"emulated: the demo held to {slow['cpus']:g} cores' worth of CPU, the trainer to {slow['trainer_cpus']:g}"
        )
    result = {"overhead": outcome.overhead, "dag_seconds": outcome.dag_seconds, "task_seconds": outcome.task_seconds,
              "demo_seconds": outcome.seconds, "tasks": tasks, "emulated": slow,
              "training_summary": outcome.training.results["summary"]["text"], "overrides": args.overrides,
              "ingest": args.ingest}  # fmt: skip
    (REPO / ".local" / "bench").mkdir(parents=True, exist_ok=True)
    name = "orchestration.json" if not slow else f"orchestration-cpus{args.cpus:g}-trainer{slow['trainer_cpus']:g}.json"
    if args.overrides:  # a trial recipe: a file of its own
        name = name.replace(".json", f"-{hashlib.sha256(json.dumps(args.overrides).encode()).hexdigest()[:8]}.json")
    if args.ingest != DEMO_INGEST:
        name = name.replace(".json", f"-{args.ingest}.json")
    (REPO / ".local" / "bench" / name).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
