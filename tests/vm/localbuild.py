"""Helpers of the local-backend build tests (uml, lxc, chroot, and the xen/zvm/emulator flows on fakes)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cloudbuild.backend import Backend
from cloudbuild.build import BuildJob, BuildOutcome, run_build
from cloudbuild.buildroot.hoststeps import DiskHostSteps
from cloudbuild.options import VmOptions
from tests.fakes.console import RecordingConsole

CLI = [sys.executable, "-m", "cloudbuild"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox build root (`cloudbuild rootfs`)."""
    target = tmp_path_factory.mktemp("localrootfs") / "root"
    subprocess.run([*CLI, "rootfs", str(target)], check=True, capture_output=True)
    return target


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("localcache")


def recipe(folder: Path, body: str, name: str = "build.sh") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\nset -e\n" + body)
    path.chmod(0o755)
    return path


def cli_build(
    tmp_path: Path, cache: Path, vm_type: str, rootfs: Path, script: Path, *extra: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CLOUDBUILD_CACHE_DIR": str(cache), "TMPDIR": str(tmp_path)}
    argv = [
        *CLI,
        "build",
        "--vm-type",
        vm_type,
        "--rootfs",
        str(rootfs),
        "--dest",
        str(tmp_path / "out"),
        "--log-format",
        "json",
        *extra,
        str(script),
    ]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def spawn_build(
    tmp_path: Path, cache: Path, vm_type: str, rootfs: Path, script: Path, *extra: str
) -> subprocess.Popen[str]:
    env = {**os.environ, "CLOUDBUILD_CACHE_DIR": str(cache), "TMPDIR": str(tmp_path)}
    argv = [
        *CLI, "build", "--vm-type", vm_type, "--rootfs", str(rootfs), "--dest", str(tmp_path / "out"),
        "--log-format", "json", *extra, str(script),
    ]  # fmt: skip
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cli_kill(
    tmp_path: Path, cache: Path, vm_type: str, build_id: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CLOUDBUILD_CACHE_DIR": str(cache), "TMPDIR": str(tmp_path)}
    argv = [*CLI, "kill", "--vm-type", vm_type, "--build-id", build_id, "--log-format", "json", *extra]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def tree(top: Path) -> dict[str, str]:
    """relative path -> 'd', 'l:target' or the sha256 of the file (only these three kinds may exist)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(top))
            if path.is_symlink():
                out[rel] = "l:" + os.readlink(path)
            elif path.is_dir():
                out[rel] = "d"
            elif path.is_file():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[rel] = "SPECIAL"
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mounts_under(folder: Path) -> list[str]:
    text = Path("/proc/self/mountinfo").read_text()
    return [line.split()[4] for line in text.splitlines() if line.split()[4].startswith(str(folder))]


def processes_mentioning(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            root = os.readlink(f"/proc/{entry}/root")
        except OSError:
            continue
        if marker.encode() in cmdline or root.startswith(marker):
            found.append(int(entry))
    return found


def _loops(folder: Path) -> list[str]:
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(folder) in line]


def loop_devices_on(folder: Path, *, settle: float = 5.0) -> list[str]:
    """Loop devices still backed by files in `folder`, after giving autoclear (asynchronous) time."""
    from cloudbuild.errors import DeadlineExceeded
    from cloudbuild.retry import wait_for

    try:
        wait_for(lambda: not _loops(folder), what="loop devices to clear", timeout=settle, interval=0.05)
    except DeadlineExceeded:
        return _loops(folder)
    return []


def flow(
    backend: Backend, options: VmOptions, tmp_path: Path, script: Path, *, build_id: str = "t1", **job: Any
) -> tuple[BuildOutcome, RecordingConsole]:
    """The whole build through the orchestrator and the real host steps (in this process)."""
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    steps = DiskHostSteps(options, script, build_id=build_id, workdir=workdir)
    console = RecordingConsole()
    outcome = run_build(BuildJob(build_id, tmp_path / "out", workdir, **job), backend, steps, console)
    return outcome, console


HOSTILE_RECIPE = """\
R=$BUILD_RESULTS
mkdir -p $R/RPMS
cp input.bin $R/RPMS/input.bin
ln -s RPMS/input.bin $R/good-link
ln -s . $R/here
ln -s /etc/passwd $R/abs-link
ln -s ../../../../../../../../etc/passwd $R/rel-escape
ln -s here/.. $R/chain-escape
ln /bin/busybox $R/hardlink
mkfifo $R/fifo
mknod $R/null c 1 3
mknod $R/disk b 7 0
sleep 1000 &
echo planted
"""


def hostile_expected(input_sha: str, busybox_sha: str) -> dict[str, str]:
    """What may come back of HOSTILE_RECIPE: files, folders and the links that stay inside."""
    return {
        "RPMS": "d",
        "RPMS/input.bin": input_sha,
        "good-link": "l:RPMS/input.bin",
        "here": "l:.",
        "hardlink": busybox_sha,
    }


def wait_for_file(pattern: str, timeout: float = 60) -> Path:
    from cloudbuild.retry import wait_for

    def probe() -> Path | None:
        import glob

        found = glob.glob(pattern)
        return Path(found[0]) if found else None

    return wait_for(probe, what=pattern, timeout=timeout, interval=0.1)
