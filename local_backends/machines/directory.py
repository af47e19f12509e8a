"""What the folder-root backends (chroot, lxc) share: the build root is a host folder, the status is
written by the agent into a host folder the recipe cannot see, `cloudbuild kill` leaves a marker.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
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
    was_killed,
)
from cloudbuild.errors import InfraError
from cloudbuild.log import get_logger
from cloudbuild.options import VmOptions
from cloudbuild.runner import terminate
from cloudbuild.volume import VolumePair
from cloudbuild.watchdog import Watchdog, watchdog_timeout
from local_backends import agentroot
from local_backends.dirvolume import DirectoryVolume
from local_backends.machines import vmproc

log = get_logger(__name__)

NO_STATUS = 255


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
        exit_ = vmproc.run_machine(
            argv,
            watchdog,
            timeout=timeout,
            started=self._procs,
            stop=stop,
            interactive=vmproc.wants_console(self.options),
        )
        watchdog.close()
        return self.outcome(exit_, watchdog)

    def outcome(self, exit_: vmproc.ProcessExit, watchdog: Watchdog) -> BootResult:
        """vmproc.machine_outcome orders watchdog, timeout and kill; a killed build reports 1."""
        return vmproc.machine_outcome(
            exit_,
            watchdog,
            name=self.name,
            killed=was_killed(self.workdir),
            killed_status=1,
            ended=self.exited,
        )

    def exited(self, exit_: vmproc.ProcessExit) -> BootResult:
        """The container ended by itself: the status the agent recorded outside the build root."""
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
