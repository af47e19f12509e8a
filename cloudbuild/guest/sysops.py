"""System operations of the guest agent: commands, mounts, swap, processes, clock, power.

STDLIB ONLY: this runs inside the build machine on the interpreter packed into the initramfs
(or the builder image's python3), next to a busybox (or util-linux) that provides `mount`,
`mkswap`, `swapon`, `swapoff` and `poweroff` on PATH. Commands run through `os.posix_spawnp`
rather than `subprocess`, which would pull a dozen more stdlib modules into the initramfs.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Sequence

SYSRQ_TRIGGER = "/proc/sysrq-trigger"


class AgentError(Exception):
    """An infrastructure step inside the build machine failed (reported as BUILDSTATUS3)."""


TIMING = False  # `cloudbuild.timing=1` on the kernel command line: uptime before each line


def say(message: str) -> None:
    """One line on the console (which the host streams into the build log)."""
    if TIMING:
        try:
            with open("/proc/uptime", encoding="ascii") as f:
                message = f"[{f.read().split()[0]:>9}] {message}"
        except OSError:
            pass
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def command(argv: Sequence[str], *, check: bool = True, env: dict[str, str] | None = None) -> int:
    """Run a command to completion with the console as stdout/stderr; raise AgentError when it fails."""
    try:
        pid = os.posix_spawnp(
            argv[0],
            list(argv),
            env if env is not None else dict(os.environ),
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),  # python ignores them; commands must not
        )
    except OSError as exc:
        if check:
            raise AgentError(f"{argv[0]}: {exc.strerror}") from exc
        return 127
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if check and code != 0:
        raise AgentError(f"{' '.join(argv)} exited {code}")
    return code


def wait_for_path(path: str, *, timeout: float = 10.0) -> bool:
    """Wait (bounded) for a device node to appear: virtio probing may trail the module load.

    The host's `cloudbuild.retry.wait_for` is not available here (tenacity is no stdlib);
    this is the one bounded poll of the guest.
    """
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def mount(source: str, target: str, *, fstype: str | None = None, options: str = "") -> None:
    os.makedirs(target, exist_ok=True)
    argv = ["mount"]
    if fstype:
        argv += ["-t", fstype]
    if options:
        argv += ["-o", options]
    command([*argv, source, target])


def umount(target: str, *, lazy: bool = False) -> bool:
    return command(["umount", *(["-l"] if lazy else []), target], check=False) == 0


def is_mountpoint(path: str) -> bool:
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as mounts:
            return any(line.split()[1:2] == [real] for line in mounts)
    except OSError:
        return False


def mount_api_filesystems(root: str) -> list[str]:
    """/proc, /sys, /dev, /dev/pts, /dev/shm inside the build root; returns them innermost first."""
    done: list[str] = []
    for source, sub, fstype, options in (
        ("proc", "proc", "proc", ""),
        ("sysfs", "sys", "sysfs", ""),
        ("devtmpfs", "dev", "devtmpfs", ""),
        ("devpts", "dev/pts", "devpts", "gid=5,mode=620,ptmxmode=666"),
        ("tmpfs", "dev/shm", "tmpfs", "mode=1777"),
    ):
        target = os.path.join(root, sub)
        if is_mountpoint(target):
            continue
        mount(source, target, fstype=fstype, options=options)
        done.append(target)
    return list(reversed(done))


def setup_swap(device: str) -> bool:
    """mkswap + swapon: the host only zeroed the head, the signature is written here (obs-build does too)."""
    if not wait_for_path(device):
        say(f"WARNING: swap device {device} did not appear, building without swap")
        return False
    command(["mkswap", device])
    return command(["swapon", device], check=False) == 0


def swapoff(device: str) -> None:
    command(["swapoff", device], check=False)


def set_hostname(name: str) -> None:
    if not name:
        return
    try:
        with open("/proc/sys/kernel/hostname", "w", encoding="ascii") as f:
            f.write(name[:64])
    except (OSError, UnicodeError) as exc:
        say(f"WARNING: cannot set the hostname to {name!r}: {exc}")


def loopback_up() -> None:
    if command(["ip", "link", "set", "lo", "up"], check=False) != 0:
        command(["ifconfig", "lo", "127.0.0.1", "up"], check=False)


def fix_clock(date_file: str) -> None:
    """Set the clock to the build start when the machine's clock is behind it (broken RTC)."""
    try:
        with open(date_file, encoding="ascii") as f:
            text = f.read().strip()
    except OSError:
        return
    try:
        stamp = int(text.lstrip("@"))
    except ValueError:
        return
    if time.time() < stamp:
        say(f"WARNING: system has a broken clock, setting it to a newer time: @{stamp}")
        try:
            time.clock_settime(time.CLOCK_REALTIME, float(stamp))
        except OSError as exc:
            say(f"WARNING: cannot set the clock: {exc}")


def process_root(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/root")
    except OSError:
        return None


def kill_build_processes(root: str) -> int:
    """Kill every process left over by the build; return how many were signalled.

    As PID 1 (our own initramfs) that is everything else (`kill -9 -1`, as obs-build's
    vm_shutdown). Elsewhere (a builder image's service) only the processes chrooted into the
    build root, so that the agent does not take the builder's own daemons with it.
    """
    if os.getpid() == 1:
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            return 0
        _reap_all()
        return -1
    real_root = os.path.realpath(root)
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        proc_root = process_root(int(entry))
        if proc_root is not None and (proc_root == real_root or proc_root.startswith(real_root + "/")):
            try:
                os.kill(int(entry), signal.SIGKILL)
                count += 1
            except ProcessLookupError:
                pass
    return count


def _reap_all(timeout: float = 10.0) -> None:
    """Collect the killed processes (PID 1 inherits the orphans of the build) until none is left."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            if time.monotonic() >= deadline:
                say("WARNING: some build processes did not die")
                return
            time.sleep(0.01)


def in_container() -> bool:
    """True inside lxc/docker/systemd-nspawn: never touch sysrq or power there."""
    if os.environ.get("container"):  # noqa: SIM112 - systemd spells it in lower case
        return True
    try:
        with open("/proc/1/environ", "rb") as f:
            if b"container=" in f.read():
                return True
    except OSError:
        pass
    return os.path.exists("/run/systemd/container") or os.path.exists("/.dockerenv")


def power_off() -> None:
    """Sync and power the machine off. Never returns normally; never called in a container."""
    os.sync()
    command(["poweroff", "-f"], check=False)
    # poweroff -f calls reboot(RB_POWER_OFF); when it is missing or failed, use the magic sysrq key
    try:
        with open(SYSRQ_TRIGGER, "w", encoding="ascii") as f:
            f.write("o")
    except OSError as exc:
        say(f"Warning: clean shut down of the VM didn't work: {exc}")
    time.sleep(5)  # sysrq acts asynchronously; PID 1 must not exit before (that would panic)
