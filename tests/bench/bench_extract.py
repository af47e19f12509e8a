"""Benchmark: extraction by manifest vs `cp -a` from a read-only loop mount of the same image.

A 1 GiB ext4 image holds 10 x 100 MiB + 500 x 10 KiB result files. Page caches are dropped before
each timed run. Run as root, on demand (pytest does not collect it):

    /work/venv/bin/python tests/bench/bench_extract.py [--rounds 3] [--workdir DIR]

Target: cloudbuild's time <= 0.7 x cp -a's.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from cloudbuild.disk import blocklist  # noqa: E402
from cloudbuild.disk.extract import extract_results  # noqa: E402
from tests.disk.conftest import mounted  # noqa: E402

MIB = 1024 * 1024
PAD = 512


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def build_image(work: Path) -> tuple[Path, Path]:
    image = work / "root.img"
    with open(image, "wb") as f:
        f.truncate(1024 * MIB)
    # small journal and inode table so that 1005 MiB of results fit in 1 GiB
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-N", "4096", "-J", "size=8", image], check=True)
    with mounted(image, work / "mnt") as mnt:
        # ext4 keeps up to 16 MiB free for delayed allocation: give it to the results
        source = subprocess.run(["findmnt", "-no", "SOURCE", mnt], check=True, capture_output=True).stdout
        Path(f"/sys/fs/ext4/{os.path.basename(source.decode().strip())}/reserved_clusters").write_text("0\n")
        out = mnt / "RPMS"
        out.mkdir()
        for i in range(10):
            with open(out / f"big-{i}.rpm", "wb") as f:
                for _ in range(100):
                    f.write(os.urandom(MIB))
        small = mnt / "OTHER"
        small.mkdir()
        for i in range(500):
            (small / f"small-{i:03}.log").write_bytes(os.urandom(10 * 1024))
        names = subprocess.run(
            ["find", "RPMS", "OTHER", "-print0"], cwd=mnt, check=True, capture_output=True
        ).stdout
        buf = io.BytesIO()
        fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            blocklist.write_manifest(
                [n for n in names.split(b"\0") if n], buf, padstart=PAD, padend=PAD, dir_fd=fd
            )
        finally:
            os.close(fd)
    swap = work / "swap.img"
    swap.write_bytes(buf.getvalue())
    return image, swap


def time_extract(image: Path, swap: Path, dest: Path) -> float:
    dest.mkdir()
    drop_caches()
    started = time.perf_counter()
    extract_results(image, swap, skip=PAD, dest=dest)
    elapsed = time.perf_counter() - started
    shutil.rmtree(dest)
    return elapsed


def time_cp(image: Path, work: Path, dest: Path) -> float:
    with mounted(image, work / "ro", readonly=True) as mnt:
        dest.mkdir()
        drop_caches()
        started = time.perf_counter()
        subprocess.run(["cp", "-a", f"{mnt}/RPMS", f"{mnt}/OTHER", dest], check=True)
        elapsed = time.perf_counter() - started
    shutil.rmtree(dest)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="default: a temporary directory in /var/tmp"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_extract: needs root (loop devices, drop_caches)", file=sys.stderr)
        return 1
    import logging

    from cloudbuild.log import configure

    configure(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-extract-", dir=args.workdir or "/var/tmp"))
    try:
        image, swap = build_image(work)
        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(time_extract(image, swap, work / "dest"))
            theirs.append(time_cp(image, work, work / "dest"))
        a, b = statistics.median(ours), statistics.median(theirs)
        print(f"extract (cloudbuild): {' '.join(f'{t:.3f}' for t in ours)} s  median {a:.3f} s")
        print(f"cp -a (loop mount):   {' '.join(f'{t:.3f}' for t in theirs)} s  median {b:.3f} s")
        print(f"ratio cloudbuild / cp -a = {a / b:.2f} (target <= 0.70)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
