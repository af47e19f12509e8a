"""`--vm-type none` (chroot): no machine; the host runs the guest agent on the build root folder.

The agent (`cloudbuild.guest.agent`, on this host's python) runs as PID 1 of fresh mount, pid,
uts, ipc and network namespaces (`unshare`), so that
- /proc, /sys (read-only), a private /dev (tmpfs with null, zero, full, random, urandom, tty bound
  from the host, a new devpts instance, a tmpfs /dev/shm) are mounted into the build root by
  `sandbox_main` below, and vanish with the namespace: nothing can stay mounted on the host,
  whatever the build does or however it ends;
- the agent's "kill every leftover process" (`kill -9 -1` as PID 1) reaches only the build;
- the build has no network but loopback, and its hostname is its own;
- /proc/sys is read-only and /proc/sysrq-trigger is covered: the build cannot reboot the host.

A chroot is not a security boundary against a root recipe; it keeps an honest build from
touching the host, as obs-build's chroot builds do. The results come back through the
`directory` channel (`cloudbuild/disk/dircopy.py`); the status is what the agent recorded in a
host folder outside the build root (the recipe cannot forge it), else 255 (-> exit 3).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from cloudbuild.backend import (
    Backend,
    BootResult,
    BuildSlot,
    Console,
    ExitReason,
    clear_killed,
    mark_killed,
    register,
    was_killed,
)
from cloudbuild.errors import HostBroken, InfraError, UsageError
from cloudbuild.log import get_logger
from cloudbuild.options import NO_VM, VmOptions
from cloudbuild.runner import run, terminate, which
from cloudbuild.volume import VolumePair
from cloudbuild.watchdog import Watchdog, watchdog_timeout
from local_backends import agentroot, vmproc
from local_backends.dirvolume import DirectoryVolume

log = get_logger(__name__)

NO_STATUS = 255
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


class DirectoryBackend(Backend):
    """What chroot and lxc share: a folder as the root, a status folder, a kill marker."""

    channel = "directory"
    root_name: ClassVar[str] = "root"

    def __init__(self, options: VmOptions):
        super().__init__(options)
        self.workdir: Path | None = None
        self.pair: VolumePair | None = None
        self.build_id: str | None = None
        self._procs: list[subprocess.Popen[bytes]] = []

    def volumes(self, slot: BuildSlot) -> VolumePair:
        self.workdir = slot.workdir
        self.build_id = slot.build_id
        self.pair = VolumePair(DirectoryVolume(slot.workdir / self.root_name))
        return self.pair

    @property
    def root(self) -> Path:
        if self.workdir is None:
            raise InfraError(f"{self.name}: no build slot yet")
        return self.workdir / self.root_name

    @property
    def status_dir(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "status"

    def fresh_status_dir(self) -> Path:
        folder = self.status_dir
        folder.mkdir(parents=True, exist_ok=True)
        (folder / agentroot.STATUS_FILE).unlink(missing_ok=True)
        assert self.workdir is not None
        clear_killed(self.workdir)
        return folder

    def run_watched(
        self,
        argv: list[str],
        console: Console,
        *,
        timeout: float | None,
        stop: Callable[[], None] | None = None,
    ) -> BootResult:
        """Run the container/sandbox with the console watchdog (`--vm-watchdog`) around it."""
        watchdog = Watchdog(
            console, timeout=watchdog_timeout() if self.options.watchdog else None, on_fire=self.kill
        )
        watchdog.open()
        exit_ = vmproc.run_machine(argv, watchdog, timeout=timeout, started=self._procs, stop=stop)
        watchdog.close()
        if watchdog.fired:
            return BootResult(ExitReason.WATCHDOG, detail=f"watchdog marker open for {watchdog.timeout:g}s")
        return self.result(exit_)

    def result(self, exit_: vmproc.ProcessExit) -> BootResult:
        if was_killed(self.workdir):
            return BootResult(ExitReason.KILLED, status=1, detail="killed (cloudbuild kill)")
        if exit_.timed_out:
            return BootResult(ExitReason.TIMEOUT, detail="the build timeout passed")
        status = agentroot.read_status(self.status_dir)
        if status is None:
            log.warning("the build left no status", returncode=exit_.returncode)
            return BootResult(ExitReason.EXITED, status=NO_STATUS, detail=f"exited {exit_.returncode}")
        return BootResult(ExitReason.EXITED, status=status)

    def mark_killed(self) -> None:
        if self.workdir is not None:
            mark_killed(self.workdir)

    def cleanup(self) -> None:
        for proc in list(self._procs):
            terminate(proc)
        if self.workdir is not None:
            clear_killed(self.workdir)
            shutil.rmtree(self.status_dir, ignore_errors=True)


def check_mount_target(root: Path, sub: str) -> Path:
    """`root/sub` as a real folder (created when missing); never through a symlink the root planted."""
    path = root
    for part in sub.split("/"):
        path = path / part
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            path.mkdir(mode=0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise InfraError(f"build root: /{sub} is not a folder (a symlink or file is in the way)")
    return path


@register
class ChrootBackend(DirectoryBackend):
    name = NO_VM

    def verify(self) -> None:
        if os.geteuid() != 0:
            raise UsageError("--vm-type none (chroot) builds need root (mount and chroot)")
        if which("unshare") is None:
            raise HostBroken("unshare not found: install util-linux")

    def boot_and_wait(
        self, pair: VolumePair, slot: BuildSlot, *, timeout: float | None, console: Console
    ) -> BootResult:
        root = pair.root.attach()
        assert root is not None
        status_dir = self.fresh_status_dir()
        unshare = which("unshare")
        argv = [
            str(unshare),
            "--mount",
            "--uts",
            "--ipc",
            "--net",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            sys.executable,
            "-m",
            "local_backends.chroot",
            str(root),
            str(status_dir),
        ]
        console.write(b"running the build in a chroot...\n")
        return self.run_watched(argv, console, timeout=timeout)

    def kill(self) -> None:
        self.mark_killed()
        for proc in list(self._procs):
            terminate(proc)
        if self.workdir is not None and self.root.is_dir():
            count = vmproc.kill_chrooted(self.root)
            if count:
                log.warning("killed processes chrooted into the build root", count=count)


# --- inside the namespaces ------------------------------------------------------------------------


def _mount(*args: str) -> None:
    run(["mount", *args], timeout=60)


def mount_sandbox(root: Path) -> None:
    """/proc, /sys, /dev into the build root (we are in a private mount namespace)."""
    proc = check_mount_target(root, "proc")
    _mount("-t", "proc", "-o", "nosuid,nodev,noexec", "proc", str(proc))
    _mount("--bind", str(proc / "sys"), str(proc / "sys"))
    _mount("-o", "remount,bind,ro", str(proc / "sys"))
    if (proc / "sysrq-trigger").exists():
        _mount("--bind", "-o", "ro", "/dev/null", str(proc / "sysrq-trigger"))
    sys_dir = check_mount_target(root, "sys")
    _mount("-t", "sysfs", "-o", "ro,nosuid,nodev,noexec", "sysfs", str(sys_dir))
    dev = check_mount_target(root, "dev")
    _mount("-t", "tmpfs", "-o", "mode=755,nosuid", "tmpfs", str(dev))
    for name in DEVICES:
        (dev / name).touch(mode=0o666)
        _mount("--bind", f"/dev/{name}", str(dev / name))
    (dev / "pts").mkdir()
    _mount("-t", "devpts", "-o", "newinstance,ptmxmode=0666,mode=0620,gid=5", "devpts", str(dev / "pts"))
    os.symlink("pts/ptmx", dev / "ptmx")
    (dev / "shm").mkdir()
    _mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", str(dev / "shm"))
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "fd/0"), ("stdout", "fd/1"), ("stderr", "fd/2")):
        os.symlink(target, dev / name)


def sandbox_main(argv: list[str]) -> int:
    """PID 1 of the namespaces: mount, run the agent on the folder, record its status."""
    root, status_dir = Path(argv[0]), Path(argv[1])
    from cloudbuild.guest.agent import main as agent_main

    try:
        mount_sandbox(root)
    except Exception as exc:
        print(f"cloudbuild chroot: cannot prepare the build root: {exc}", flush=True)
        return NO_STATUS
    status = agent_main(["--root-dir", str(root), "--no-poweroff"])
    (status_dir / agentroot.STATUS_FILE).write_text(f"{status}\n")
    return status


if __name__ == "__main__":
    sys.exit(sandbox_main(sys.argv[1:]))
