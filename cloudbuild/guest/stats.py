"""Build statistics inside the build machine (obs-build's background_monitor_process and
vm_save_statistics): peak memory and disk use sampled every 5 s, disk I/O counters at the end,
written as obs-build's `_statistics` file (`KEY: value` lines).

STDLIB ONLY (runs in the build machine).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping

INTERVAL = 5.0
MIB = 1024 * 1024

# /proc/meminfo keys: used = MemTotal + SwapTotal - (free + caches), as obs-build counts it
_MEM_ADD = ("MemTotal:", "SwapTotal:")
_MEM_SUB = ("MemFree:", "SwapFree:", "SwapCached:", "Cached:", "Buffers:")


def memory_used_mib(meminfo: str) -> int:
    """Memory in use (MiB) from the text of /proc/meminfo."""
    total_kib = 0
    for line in meminfo.splitlines():
        fields = line.split()
        if len(fields) < 2 or not fields[1].isdigit():
            continue
        if fields[0] in _MEM_ADD:
            total_kib += int(fields[1])
        elif fields[0] in _MEM_SUB:
            total_kib -= int(fields[1])
    return max(0, total_kib) // 1024


def disk_used_mib(path: str) -> int:
    """Used MiB of the filesystem at `path`, as `df -m` reports it."""
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize // MIB


def read_meminfo() -> str:
    try:
        with open("/proc/meminfo", encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def io_counters(device: str) -> dict[str, int]:
    """obs-build's IO_* keys from /sys/block/<device>/stat (fields 1, 3, 5, 7); zero counters omitted."""
    try:
        with open(f"/sys/block/{device}/stat", encoding="ascii") as f:
            fields = f.read().split()
    except OSError:
        return {}
    names = {0: "IO_requests_read", 2: "IO_sectors_read", 4: "IO_requests_write", 6: "IO_sectors_write"}
    out: dict[str, int] = {}
    for index, name in names.items():
        if index < len(fields) and fields[index].isdigit() and int(fields[index]) > 0:
            out[name] = int(fields[index])
    return out


class Peaks:
    """The peak values seen so far; the monitor keeps them in two files like obs-build."""

    def __init__(self, statedir: str):
        self.statedir = statedir
        self.memory = 0
        self.disk = 0

    def sample(self, root: str) -> None:
        memory = memory_used_mib(read_meminfo())
        if memory > self.memory:
            self.memory = memory
            self._store("_statistics.memory", memory)
        try:
            disk = disk_used_mib(root)
        except OSError:
            disk = 0
        if disk > self.disk:
            self.disk = disk
            self._store("_statistics.df", disk)

    def _store(self, name: str, value: int) -> None:
        path = os.path.join(self.statedir, name)
        try:
            with open(path + ".new", "w", encoding="ascii") as f:
                f.write(str(value))
            os.replace(path + ".new", path)
        except OSError:
            pass

    def load(self) -> None:
        """Fold in what the monitor process stored."""
        for name, attr in (("_statistics.memory", "memory"), ("_statistics.df", "disk")):
            try:
                with open(os.path.join(self.statedir, name), encoding="ascii") as f:
                    value = int(f.read().strip() or 0)
            except (OSError, ValueError):
                continue
            setattr(self, attr, max(getattr(self, attr), value))


class Monitor:
    """background_monitor_process: a forked child sampling every INTERVAL seconds until stopped."""

    def __init__(self, root: str, statedir: str, interval: float = INTERVAL):
        self.root = root
        self.peaks = Peaks(statedir)
        self.interval = interval
        self.pid: int | None = None

    def start(self) -> None:
        self.peaks.sample(self.root)
        pid = os.fork()
        if pid == 0:  # the monitor
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                while True:
                    time.sleep(self.interval)
                    self.peaks.sample(self.root)
            finally:
                os._exit(0)
        self.pid = pid

    def stop(self) -> Peaks:
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass  # already gone (PID 1 killed and reaped it with the build's leftovers)
            self.pid = None
        self.peaks.load()
        self.peaks.sample(self.root)
        return self.peaks


def format_statistics(values: Mapping[str, int | str]) -> str:
    """obs-build's `_statistics`: one `KEY: value` line each, in the given order."""
    return "".join(f"{key}: {value}\n" for key, value in values.items())


def parse_statistics(text: str, *, max_lines: int = 200) -> dict[str, str]:
    """Read a `_statistics` file (from the guest: bounded, odd lines ignored)."""
    out: dict[str, str] = {}
    for line in text.splitlines()[:max_lines]:
        key, sep, value = line.partition(": ")
        if sep and key.replace("_", "").isalnum() and len(key) <= 64 and len(value) <= 64:
            out[key] = value.strip()
    return out
