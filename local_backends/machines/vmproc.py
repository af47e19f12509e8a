"""A local machine that is one host process (uml, an emulator, a container, a chroot):
start it, stream its output to the console, wait with the build timeout, stop it.

Also obs-build's way of killing such a machine from outside (`cloudbuild kill`): every process
that holds the root image open (`fuser -k`), or every process chrooted into a build root.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, ClassVar

from cloudbuild.backend import Backend, BootResult, BuildSlot, Console, ExitReason, clear_killed, was_killed
from cloudbuild.log import get_logger
from cloudbuild.options import VmOptions
from cloudbuild.runner import Arg, run, spawn, terminate, which
from cloudbuild.volume import VolumePair
from cloudbuild.watchdog import Watchdog, watchdog_timeout
from local_backends.localvolume import LocalVolume

log = get_logger(__name__)


@dataclass(frozen=True)
class ProcessExit:
    returncode: int | None  # None: killed at the timeout
    timed_out: bool = False


def wants_console(options: VmOptions) -> bool:
    """`--shell`/`--shell-after-fail`: the machine reads the terminal the build was started on."""
    return options.shell or options.shell_after_fail


def pump(stream: IO[bytes], console: Console) -> None:
    """Copy a process' output to the console until it closes."""
    while True:
        data = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
        if not data:
            return
        console.write(data)


def run_machine(
    argv: Sequence[Arg],
    console: Console,
    *,
    timeout: float | None,
    env: Mapping[str, str] | None = None,
    cwd: Arg | None = None,
    started: list[subprocess.Popen[bytes]] | None = None,
    stop: Callable[[], None] | None = None,
    interactive: bool = False,
) -> ProcessExit:
    """Run the machine's process to its end with stdout+stderr on `console`; kill it at `timeout`.

    `started` receives the process as soon as it runs, so `Backend.kill()` from another thread
    can stop it. `stop` is the machine's own way to stop (e.g. `lxc-stop -k`), tried at the
    timeout before the process is terminated. `interactive` hands it our stdin (`--shell`: the
    terminal the build was started on becomes the machine's console input).
    """
    proc = spawn(argv, env=env, cwd=cwd, stdin=None if interactive else subprocess.DEVNULL)
    if started is not None:
        started.append(proc)
    assert proc.stdout is not None
    reader = threading.Thread(target=pump, args=(proc.stdout, console), daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("build timeout: stopping the machine", seconds=timeout, pid=proc.pid)
        if stop is not None:
            try:
                stop()
            except Exception as exc:
                log.error("stopping the machine failed, terminating its process", error=str(exc))
        terminate(proc)
        return ProcessExit(None, timed_out=True)
    finally:
        reader.join(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
        if started is not None and proc in started:
            started.remove(proc)
    return ProcessExit(code)


def boot_machine(
    argv: Sequence[Arg],
    console: Console,
    *,
    name: str,
    watchdog: bool,
    timeout: float | None,
    started: list[subprocess.Popen[bytes]],
    kill: Callable[[], None],
    killed: Callable[[], bool],
    workdir: Path | None,
    stop: Callable[[], None] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Arg | None = None,
    interactive: bool = False,
) -> BootResult:
    """Boot a one-process machine under the console watchdog and say how it ended.

    The order of the verdicts matters: a watchdog or timeout kill also makes the process exit
    non-zero, and a machine stopped by `cloudbuild kill` (here or from another process, seen
    through the kill marker) leaves its status on swap, so it is KILLED, not CRASHED.
    """
    dog = Watchdog(console, timeout=watchdog_timeout() if watchdog else None, on_fire=kill)
    dog.open()
    console.write(f"booting {name}...\n".encode())
    exit_ = run_machine(
        argv, dog, timeout=timeout, env=env, cwd=cwd, started=started, stop=stop, interactive=interactive
    )
    dog.close()
    return machine_outcome(exit_, dog, name=name, killed=killed() or was_killed(workdir))


def machine_outcome(
    exit_: ProcessExit,
    dog: Watchdog,
    *,
    name: str,
    killed: bool,
    killed_status: int | None = None,
    ended: Callable[[ProcessExit], BootResult] | None = None,
) -> BootResult:
    """How a machine ended, from its process' exit, the watchdog's view and whether we killed it.

    The one place that orders the verdicts, for every local backend: a watchdog or timeout kill
    also makes the process exit non-zero, and a machine stopped by `cloudbuild kill` (here or
    from another process, seen through the kill marker) is KILLED, not CRASHED. `killed_status`
    is the status a killed build reports where no swap carries one (the directory channel);
    `ended` says how a machine that ended by itself ended (default: its exit code and the panic
    the watchdog saw; the directory channel reads the status the agent recorded).
    """
    if dog.fired:
        after = f" for {dog.timeout:g}s" if dog.timeout is not None else ""
        return BootResult(ExitReason.WATCHDOG, detail=f"watchdog marker open{after}")
    if exit_.timed_out:
        return BootResult(ExitReason.TIMEOUT, detail="the build timeout passed")
    if killed:
        return BootResult(ExitReason.KILLED, status=killed_status, detail="killed (cloudbuild kill)")
    if ended is not None:
        return ended(exit_)
    if exit_.returncode != 0:
        return BootResult(ExitReason.CRASHED, detail=f"{name} exited {exit_.returncode}")
    if dog.panicked:
        return BootResult(ExitReason.CRASHED, detail="kernel panic")
    return BootResult(ExitReason.POWERED_OFF)


class ProcessMachineBackend(Backend):
    """Base of the backends whose machine is one host process over local images (qemu, uml, xen,
    emulator): the state they share, the boot under the watchdog, kill and cleanup."""

    # kill also the processes holding the root image while our own process still runs (an
    # emulator script's children may outlive it); otherwise only when we run nothing ourselves
    # (`cloudbuild kill` from another process)
    kill_image_holders_always: ClassVar[bool] = False

    def __init__(self, options: VmOptions):
        super().__init__(options)
        self.pair: VolumePair | None = None
        self.workdir: Path | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self._killed = False

    def boot_process(
        self,
        argv: Sequence[Arg],
        pair: VolumePair,
        slot: BuildSlot,
        console: Console,
        *,
        timeout: float | None,
        name: str,
        stop: Callable[[], None] | None = None,
        cwd: Arg | None = None,
    ) -> BootResult:
        self.pair = pair
        self.workdir = slot.workdir
        clear_killed(slot.workdir)
        self._killed = False
        return boot_machine(
            argv,
            console,
            name=name,
            watchdog=self.options.watchdog,
            timeout=timeout,
            started=self._procs,
            kill=self.kill,
            killed=lambda: self._killed,
            workdir=slot.workdir,
            stop=stop,
            cwd=cwd,
            interactive=wants_console(self.options),
        )

    def stop_processes(self) -> None:
        for proc in list(self._procs):
            terminate(proc)

    def kill(self) -> None:
        self._killed = True
        ours = bool(self._procs)
        self.stop_processes()
        root = self.pair.root if self.pair is not None else None
        if (
            (self.kill_image_holders_always or not ours)
            and isinstance(root, LocalVolume)
            and fuser_kill(root.path)
        ):
            log.warning("killed the processes holding the root image", image=str(root.path))

    def cleanup(self) -> None:
        self.stop_processes()
        if self.workdir is not None:
            clear_killed(self.workdir)


def fuser_kill(path: Path) -> bool:
    """Kill every process that has `path` open (obs-build's `fuser -k -TERM`); True if there were any."""
    if not path.exists():
        return False
    fuser = which("fuser")
    if fuser is None:
        return _kill_holders(path)
    # fuser exits 1 when nobody has the file open: that is the idempotent "nothing to do"
    proc = run([fuser, "-k", "-TERM", path], check=False, timeout=30)
    return proc.returncode == 0


def _kill_holders(path: Path) -> bool:
    """fuser without psmisc: walk /proc/*/fd."""
    target = os.stat(path)
    found = False
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    st = os.stat(f"/proc/{pid}/fd/{fd}")
                    if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                        os.kill(pid, signal.SIGTERM)
                        found = True
                        break
    return found


def chrooted_pids(root: Path) -> list[int]:
    """Processes whose root directory is `root` or below it (obs-build's killchroot)."""
    real = os.path.realpath(root)
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            proc_root = os.readlink(f"/proc/{entry}/root")
            if proc_root == real or proc_root.startswith(real + "/"):
                pids.append(int(entry))
    return pids


def kill_chrooted(root: Path) -> int:
    """SIGKILL every process chrooted into `root`; return how many."""
    count = 0
    for pid in chrooted_pids(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            count += 1
    return count
