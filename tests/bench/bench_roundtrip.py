"""Round trip of a trivial build (`true`) on qemu/TCG, split into phases; compared with
`fakemachine -b uml` and virtme-ng (when they run here) running the same command.

    /work/venv/bin/python tests/bench/bench_roundtrip.py [--rounds 5] [--no-others]

fakemachine's uml backend needs libslirp-helper and /lib/systemd/systemd-resolved; virtme-ng is
looked up as `vng` on PATH or $VNG (pip install virtme-ng; it needs virtme-run on PATH too).

Phases (medians over the rounds, seconds):
  initramfs  verify: kernel + initramfs from the cache (the cold build is timed once, apart)
  image      volumes + prepare: create the images, mkfs, copy the build root, stage /.build
  boot       qemu start -> the recipe starts (firmware, kernel, modules, agent, mount, swap)
  recipe     the recipe runs
  shutdown   recipe exit -> qemu exit (kill leftovers, statistics, manifest, status, power off)
  extract    status + extract (by the manifest on swap)
  cleanup    delete the images
  total      wall clock of the whole build, as `cloudbuild build` would take it (minus python start)

Not collected by pytest (no test_ prefix): run it on demand.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cloudbuild import log as cblog
from cloudbuild.backend import create_backend
from cloudbuild.build import BuildJob, run_build
from cloudbuild.buildroot.hoststeps import DiskHostSteps
from cloudbuild.commands.rootfs import busybox_rootfs
from cloudbuild.options import parse, resolve_paths
from local_backends.kernel import host_kernel


class TimedConsole:
    """Keeps the console and the time each marker line arrived."""

    MARKS: ClassVar[dict[str, bytes]] = {
        "booting": b"booting qemu",
        "running": b"running /.build-srcdir",
        "exited": b"exited ",
    }

    def __init__(self) -> None:
        self.data = b""
        self.times: dict[str, float] = {}

    def write(self, data: bytes) -> None:
        now = time.monotonic()
        self.data += data
        for name, marker in self.MARKS.items():
            if name not in self.times and marker in self.data:
                self.times[name] = now


def one_build(work: Path, rootfs: Path, recipe: Path) -> dict[str, float]:
    dest = work / "out"
    shutil.rmtree(dest, ignore_errors=True)
    options = resolve_paths(
        parse(
            ["--vm-type", "qemu", "--rootfs", str(rootfs), "--dest", str(dest), "--vm-disk-size", "512",
             "--vm-swap-size", "64", str(recipe)]
        )
    )  # fmt: skip
    slot = work / "slot"
    shutil.rmtree(slot, ignore_errors=True)
    slot.mkdir()
    console = TimedConsole()
    backend = create_backend(options)
    steps = DiskHostSteps(options, recipe, build_id="bench", workdir=slot)
    started = time.monotonic()
    outcome = run_build(BuildJob("bench", dest, slot), backend, steps, console)
    total = time.monotonic() - started
    if int(outcome.exit_code) != 0:
        sys.stderr.write(console.data.decode(errors="replace"))
        raise SystemExit(f"build failed: {outcome.message}")
    phases = outcome.phases
    marks = console.times
    boot_end = marks["booting"] + phases["boot"]
    return {
        "initramfs": phases["verify"],
        "image": phases["volumes"] + phases["prepare"],
        "boot": marks["running"] - marks["booting"],
        "recipe": marks["exited"] - marks["running"],
        "shutdown": boot_end - marks["exited"],
        "extract": phases["status"] + phases["extract"],
        "cleanup": phases["cleanup"],
        "total": total,
    }


def timed(argv: list[str], *, cwd: Path | None = None, timeout: float = 300) -> float | None:
    started = time.monotonic()
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"  {argv[0]}: {exc}")
        return None
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).decode(errors="replace")[-300:]
        print(f"  {' '.join(argv)} exited {proc.returncode}: {output}")
        return None
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-others", action="store_true", help="skip fakemachine and virtme-ng")
    args = parser.parse_args()
    cblog.configure("json", stream=open(os.devnull, "w"))  # noqa: SIM115
    work = Path(tempfile.mkdtemp(prefix="bench-roundtrip-", dir="/var/tmp"))
    try:
        rootfs = work / "rootfs"
        rootfs.mkdir()
        busybox_rootfs(rootfs)
        (work / "recipe").mkdir()
        recipe = work / "recipe" / "true.sh"
        recipe.write_text("#!/bin/sh\ntrue\n")
        recipe.chmod(0o755)

        # the one-off cost: extract vmlinux and build the initramfs into an empty cache
        os.environ["CLOUDBUILD_CACHE_DIR"] = str(work / "cache")
        cold = time.monotonic()
        backend = create_backend(parse(["--vm-type", "qemu"]))
        backend.verify()
        cold = time.monotonic() - cold

        one_build(work, rootfs, recipe)  # warm-up (page cache)
        rounds = [one_build(work, rootfs, recipe) for _ in range(args.rounds)]
        medians = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        print(f"cloudbuild qemu/TCG round trip of `true`, median of {args.rounds} (seconds):")
        for key, value in medians.items():
            print(f"  {key:<10} {value:6.2f}")
        print(f"  (cold cache: vmlinux + initramfs built in {cold:.2f} s, once per kernel/agent)")

        if args.no_others:
            return 0
        results: dict[str, float | None] = {}
        if shutil.which("fakemachine"):
            runs = [timed(["fakemachine", "-b", "uml", "true"]) for _ in range(args.rounds)]
            ok = [r for r in runs if r is not None]
            results["fakemachine -b uml"] = statistics.median(ok) if ok else None
        else:
            print("  fakemachine: not installed")
        vng = os.environ.get("VNG") or shutil.which("vng")
        if vng:
            # the host kernel under TCG, as ours (virtme-ng boots the host's root over virtiofs/9p)
            kernel = str(host_kernel())
            runs = [timed([vng, "--run", kernel, "--disable-kvm", "--", "true"]) for _ in range(args.rounds)]
            ok = [r for r in runs if r is not None]
            results["virtme-ng (TCG)"] = statistics.median(ok) if ok else None
        else:
            print("  virtme-ng: not installed (pip install virtme-ng)")
        for name, value in results.items():
            if value is None:
                print(f"  {name}: did not run here")
            else:
                print(
                    f"  {name}: {value:.2f} s median = {value / medians['total']:.1f}x cloudbuild's round trip"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
