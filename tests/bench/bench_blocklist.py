"""Benchmark: the blocklist of a 10,000-file tree vs `find | xargs filefrag -v` (and obs-build's perl).

The tree (100 directories x 100 files of 1-64 KiB) lives on a loop-mounted ext4 image; page caches
are dropped before each timed run. Run as root, on demand (pytest does not collect it):

    /work/venv/bin/python tests/bench/bench_blocklist.py [--rounds 3] [--files 10000]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.disk.conftest import PEER_COMPUTEBLOCKLISTS as COMPUTEBLOCKLISTS  # noqa: E402  (today's obs-build)
from tests.disk.conftest import mounted  # noqa: E402

MIB = 1024 * 1024


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(argv: list[str], cwd: Path, *, shell: bool = False) -> tuple[float, bytes]:
    drop_caches()
    started = time.perf_counter()
    proc = subprocess.run(
        argv if not shell else " ".join(argv), cwd=cwd, shell=shell, check=True, capture_output=True
    )
    return time.perf_counter() - started, proc.stdout


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="default: a temporary directory in /var/tmp"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_blocklist: needs root (loop devices, drop_caches)", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="bench-blocklist-", dir=args.workdir or "/var/tmp"))
    try:
        image = work / "root.img"
        with open(image, "wb") as f:
            f.truncate(2048 * MIB)
        subprocess.run(["mkfs.ext4", "-q", "-F", image], check=True)
        with mounted(image, work / "mnt") as mnt:
            rng = random.Random(1)
            per_dir = 100
            for i in range(args.files):
                d = mnt / "RPMS" / f"d{i // per_dir:03}"
                if i % per_dir == 0:
                    d.mkdir(parents=True)
                (d / f"f{i:05}.rpm").write_bytes(rng.randbytes(rng.randrange(1024, 64 * 1024)))
            python = sys.executable
            commands = {
                "cloudbuild blocklist": (
                    [
                        f"find RPMS -print0 | {python} -m cloudbuild.commands.blocklist --format obs --manifest - -0"
                    ],
                    True,
                ),
                "computeblocklists (perl)": (
                    [f"find RPMS -print0 | perl {COMPUTEBLOCKLISTS} --manifest - -0"],
                    True,
                ),
                "find | xargs filefrag -v": (["find RPMS -type f -print0 | xargs -0 filefrag -v"], True),
            }
            env_path = f"PYTHONPATH={REPO}"
            times: dict[str, list[float]] = {name: [] for name in commands}
            outputs: dict[str, bytes] = {}
            for _ in range(args.rounds):
                for name, (argv, shell) in commands.items():
                    elapsed, out = timed(
                        [env_path, *argv] if name.startswith("cloudbuild") else argv, mnt, shell=shell
                    )
                    times[name].append(elapsed)
                    outputs[name] = out
            assert outputs["cloudbuild blocklist"] == outputs["computeblocklists (perl)"], "manifests differ"
            base = statistics.median(times["find | xargs filefrag -v"])
            for name, values in times.items():
                median = statistics.median(values)
                print(
                    f"{name:<26} {' '.join(f'{t:.3f}' for t in values)} s  median {median:.3f} s"
                    f"  ratio to filefrag {median / base:.2f}"
                )
            print(f"({args.files} files; the cloudbuild and perl manifests are byte-identical)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
