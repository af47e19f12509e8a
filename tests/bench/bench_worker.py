"""Worker overhead per job and throughput with 1 and 2 slots, on chroot and qemu, in one run.

    .venv/bin/python tests/bench/bench_worker.py [--rounds 3] [--jobs 8] [--qemu-jobs 4] [--no-qemu]

- bare: wall clock of `cloudbuild build` of a trivial recipe (`true`), median over the rounds.
- overhead: what the worker adds per job beyond its child build (claim, recipe download and
  unpack, rootfs cache hit, child start, result publish, ack), from the worker's own events:
  (`job finished` - `job claimed`) - (`build ended` - `build starting`), median over the jobs,
  also as a share of the bare build's round trip.
- throughput: jobs per minute for N jobs queued up front, from the first `job claimed` to the
  last `job finished` (the worker's own start-up left out), with 1 and then 2 slots. The load
  average is printed too: on a shared 2-core machine other processes eat the second slot's core.

Not collected by pytest (no test_ prefix): run it on demand. Figures go into docs/worker.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "cloudbuild"]
VM_ARGS = {"chroot": [], "qemu": ["--vm-disk-size", "512", "--vm-swap-size", "64"]}


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, check=True, cwd=REPO)


def bare(top: Path, vm: str, rootfs: Path, script: Path, env: dict[str, str], rounds: int) -> float:
    times = []
    for n in range(rounds):
        started = time.monotonic()
        run([*CLI, "build", "--vm-type", vm, *VM_ARGS[vm], "--rootfs", str(rootfs), "--dest",
             str(top / f"bare-{vm}-{n}"), "--log-format", "json", str(script)], env)  # fmt: skip
        times.append(time.monotonic() - started)
    return statistics.median(times)


def stamp(event: dict[str, str]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def farm_run(
    top: Path, vm: str, rootfs: Path, script: Path, env: dict[str, str], jobs: int, slots: int
) -> tuple[float, list[float]]:
    """Seconds from the first claim to the last finish of `jobs` queued jobs; the per-job overheads."""
    base = top / f"farm-{vm}-{slots}"
    queue, store = f"dir://{base}/q", f"dir://{base}/s"
    for _ in range(jobs):
        run([*CLI, "submit", "--queue", queue, "--store", store, str(script)], env)
    worker = run([*CLI, "worker", "--queue", queue, "--store", store, "--work-dir", str(base / "w"),
                  "--slots", str(slots), "--max-jobs", str(jobs), "--log-format", "json",
                  "--vm-type", vm, *VM_ARGS[vm], "--rootfs", str(rootfs)], env)  # fmt: skip
    events: dict[tuple[str, str], float] = {}
    for line in worker.stdout.splitlines() + worker.stderr.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if "job" in event and event.get("logger", "").startswith("cloudbuild.worker"):
            events[(event["job"], event["event"])] = stamp(event)
    overheads = []
    for job in {j for j, _ in events}:
        total = events[(job, "job finished")] - events[(job, "job claimed")]
        build = events[(job, "build ended")] - events[(job, "build starting")]
        overheads.append(total - build)
    claimed = [t for (_, name), t in events.items() if name == "job claimed"]
    finished = [t for (_, name), t in events.items() if name == "job finished"]
    return max(finished) - min(claimed), overheads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=8, help="jobs per throughput run (chroot)")
    p.add_argument("--qemu-jobs", type=int, default=4, help="jobs per throughput run (qemu)")
    p.add_argument("--no-qemu", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-worker-", dir="/var/tmp") as tmp:
        top = Path(tmp)
        env = {**os.environ, "TMPDIR": str(top), "PYTHONPATH": str(REPO)}
        rootfs = top / "root"
        run([*CLI, "rootfs", str(rootfs)], env)
        src = top / "src"
        src.mkdir()
        script = src / "build.sh"
        script.write_text("#!/bin/sh\ntrue\n")
        script.chmod(0o755)
        for vm in ["chroot"] + ([] if args.no_qemu else ["qemu"]):
            jobs = args.jobs if vm == "chroot" else args.qemu_jobs
            bare_s = bare(top, vm, rootfs, script, env, args.rounds)
            wall1, over1 = farm_run(top, vm, rootfs, script, env, jobs, 1)
            wall2, _ = farm_run(top, vm, rootfs, script, env, jobs, 2)
            overhead = statistics.median(over1)
            print(f"{vm}: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
            print(f"{vm}: bare `cloudbuild build` {bare_s:.2f} s (median of {args.rounds})")
            print(
                f"{vm}: worker overhead per job {overhead * 1000:.0f} ms = {100 * overhead / bare_s:.1f} % of a bare build"
            )
            print(f"{vm}: {jobs} jobs, 1 slot: {60 * jobs / wall1:.1f} jobs/min; 2 slots: {60 * jobs / wall2:.1f} jobs/min "
                  f"({wall1 / wall2:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
