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
import sys
from pathlib import Path

from cloudbuild.backend import BootResult, BuildSlot, Console, register
from cloudbuild.errors import HostBroken, UsageError
from cloudbuild.log import get_logger
from cloudbuild.options import NO_VM
from cloudbuild.runner import run, terminate, which
from cloudbuild.volume import VolumePair
from local_backends import agentroot
from local_backends.machines import vmproc
from local_backends.machines.directory import NO_STATUS, DirectoryBackend, check_mount_target

log = get_logger(__name__)


DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


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
            "local_backends.machines.chroot",
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
