"""Backend: one `--vm-type`, the machine that runs a build over a VolumePair.

obs-build dispatches `vm_startup_$VM_TYPE`, `vm_kill_$VM_TYPE`, ... by name; here each VM type is
a Backend class registered under its name. Backends stay thin: the phases, deadlines, cleanup
and exit-code policy live once in `cloudbuild/build.py`.
"""

from __future__ import annotations

import abc
import enum
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Protocol

from cloudbuild.errors import UsageError
from cloudbuild.options import BACKEND_MODULES, VmOptions
from cloudbuild.volume import VolumePair


class ExitReason(enum.StrEnum):
    POWERED_OFF = "powered-off"  # the guest shut itself down: read the status it left
    EXITED = "exited"  # a container/chroot process exited: `status` holds its exit code
    CRASHED = "crashed"  # the machine died abnormally (panic, hypervisor error, vanished)
    TIMEOUT = "timeout"  # the build deadline passed and we killed it
    WATCHDOG = "watchdog"  # the watchdog marker stayed open too long and we killed it
    KILLED = "killed"  # killed from outside (`cloudbuild kill`)


@dataclass(frozen=True)
class BootResult:
    reason: ExitReason
    status: int | None = None  # exit status of a container/chroot build, when the backend has one
    detail: str = ""


@dataclass(frozen=True)
class BuildSlot:
    """Where one build runs: its id, the slot number on this worker and a private work folder."""

    build_id: str
    slot: int
    workdir: Path


class Console(Protocol):
    """Receives the build machine's console output as it arrives (build log + watchdog)."""

    def write(self, data: bytes) -> None: ...


ResultChannel = Literal["swap", "directory"]

KILL_MARKER = ".cloudbuild-killed"
"""The file `cloudbuild kill` (another process) leaves in a build's work folder: the build
process then reports its machine's end as KILLED (failed, nothing extracted), not as a crash.
The orchestrator removes a stale one (an earlier build's kill in a kept `--root`) before boot."""


def mark_killed(workdir: Path) -> None:
    """`cloudbuild kill` was here."""
    if workdir.is_dir():
        (workdir / KILL_MARKER).write_text("killed\n")


def was_killed(workdir: Path | None) -> bool:
    return workdir is not None and (workdir / KILL_MARKER).exists()


def clear_killed(workdir: Path) -> None:
    (workdir / KILL_MARKER).unlink(missing_ok=True)


class Backend(abc.ABC):
    """One VM type. See ARCHITECTURE.md for the flow that calls these methods."""

    name: ClassVar[str]
    # How status and results come back: "swap" (BUILDSTATUS + blocklist manifest on the swap
    # volume, results read from the raw root volume) or "directory" (the root is a host folder
    # the guest controlled: status from the exit code, results copied as hostile input).
    channel: ClassVar[ResultChannel] = "swap"

    def __init__(self, options: VmOptions):
        self.options = options

    @abc.abstractmethod
    def verify(self) -> None:
        """Check options and host before anything is created; raise UsageError / HostBroken."""

    @abc.abstractmethod
    def volumes(self, slot: BuildSlot) -> VolumePair:
        """The (not yet created) root and swap volumes of this slot."""

    @property
    def guest_swap_device(self) -> str | None:
        """VM_SWAP in build.data: the swap as the guest names it; None (the default): the guest
        finds it by itself (a container, a machine that gets it as its second disk)."""
        return None

    def fixup(self, buildroot: Path) -> None:  # noqa: B027 - optional hook
        """Adjust the staged build root for this VM type (obs-build's vm_fixup)."""

    def kernel_files(self, buildroot: Path) -> None:  # noqa: B027 - optional hook
        """Called with the mounted build root before it is unmounted: copy out what boot needs."""

    @abc.abstractmethod
    def boot_and_wait(
        self, pair: VolumePair, slot: BuildSlot, *, timeout: float | None, console: Console
    ) -> BootResult:
        """Hand the volumes to a machine, boot it, stream its console, and wait until it stops."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Stop the machine of this backend's current build; idempotent."""

    def build_finished(self, status: int) -> None:  # noqa: B027 - optional hook
        """The build status the host read (0 ok, 1 failed, 2 unchanged, 3 infrastructure); not
        called when there is none (timeout, watchdog, crash, no status): a backend that reuses
        machines reuses one only after this said 0 or 2."""

    def cleanup(self) -> None:  # noqa: B027 - optional hook
        """Release what the backend itself created (instances, domains, temp files); idempotent."""


_REGISTRY: dict[str, type[Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make `cls` the backend of `cls.name`."""
    _REGISTRY[cls.name] = cls
    return cls


def backend_class(vm_type: str) -> type[Backend]:
    """The Backend class for a VM type, importing its module on first use."""
    if vm_type not in _REGISTRY:
        module = BACKEND_MODULES.get(vm_type)
        if module is None:
            raise UsageError(f"VM '{vm_type}' is not supported")
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            raise UsageError(f"--vm-type {vm_type}: this backend is not available in this version") from exc
    if vm_type not in _REGISTRY:
        raise UsageError(f"--vm-type {vm_type}: module {BACKEND_MODULES[vm_type]} registers no backend")
    return _REGISTRY[vm_type]


def create_backend(options: VmOptions) -> Backend:
    return backend_class(options.vm_type)(options)
