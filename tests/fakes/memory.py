"""In-memory Volume, Backend and HostSteps for orchestrator tests.

Stateful like the real things, and loud: a call in the wrong state (attach before create, attach
to a second host, delete while attached, delete a volume we do not own, boot with a volume still
attached to the worker, read a device that is not attached here) raises `FakeMisuse` and is
recorded in `Ledger.violations`, so a test fails even when the orchestrator swallows the error.
Failures are injected by operation name: `Faults({"attach:root": InfraError("...")})`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from cloudbuild.backend import Backend, BootResult, BuildSlot, Console, ExitReason, ResultChannel
from cloudbuild.deadline import Deadline
from cloudbuild.options import VmOptions
from cloudbuild.volume import Role, Volume, VolumePair, VolumeState

WORKER = "worker"  # the host name the fake uses for "this worker" (attach(None))


class FakeMisuse(AssertionError):
    """The code under test called a fake in a state where the real thing would break."""


@dataclass
class Ledger:
    """Everything that happened, in order, across volumes, backend and host steps."""

    events: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    volumes: dict[str, MemoryVolume] = field(default_factory=dict)

    def record(self, event: str) -> None:
        self.events.append(event)

    def misuse(self, message: str) -> FakeMisuse:
        self.violations.append(message)
        return FakeMisuse(message)

    def attached_here(self, device: Path) -> MemoryVolume:
        """The volume behind `device`, which must be attached to this worker."""
        for volume in self.volumes.values():
            if volume.device == device:
                if volume.host != WORKER:
                    raise self.misuse(f"{device} used while {volume.id} is attached to {volume.host}")
                return volume
        raise self.misuse(f"{device} is no device of any volume")

    def index(self, event: str) -> int:
        return self.events.index(event)


class Faults:
    """Exceptions to raise (once) at named operations, e.g. "create:swap", "attach:root@worker", "boot"."""

    def __init__(self, faults: Mapping[str, BaseException] | None = None):
        self.faults = dict(faults or {})
        self.fired: list[str] = []

    def check(self, *names: str) -> None:
        """Raise the fault registered for the first of `names` that has one; each fault fires once."""
        for name in names:
            if name in self.faults:
                self.fired.append(name)
                raise self.faults.pop(name)


class MemoryVolume(Volume):
    """A volume that exists only in the ledger; `host` is where it is attached (None: nowhere)."""

    def __init__(
        self,
        role: Role,
        size_mib: int,
        *,
        ledger: Ledger,
        faults: Faults,
        name: str | None = None,
        owned: bool = True,
        exists: bool = False,
        create_leaves_volume: bool = False,
    ):
        super().__init__(role, size_mib, owned=owned)
        self.ledger = ledger
        self.faults = faults
        self.name = name or f"vol-{role.value}"
        self.exists = exists
        self.deleted = False
        self.host: str | None = None
        self.create_leaves_volume = create_leaves_volume  # a failed create still made the volume
        self.wiped = False
        ledger.volumes[self.name] = self

    @property
    def id(self) -> str:
        return self.name

    @property
    def device(self) -> Path:
        return Path(f"/dev/fake/{self.name}")

    def _op(self, op: str) -> None:
        self.ledger.record(f"{op}:{self.role.value}")

    def create(self, *, deadline: Deadline | None = None) -> None:
        self._op("create")
        if self.deleted:
            raise self.ledger.misuse(f"create {self.id} after it was deleted")
        if not self.owned and not self.exists:
            raise self.ledger.misuse(f"create of the supplied volume {self.id}, which does not exist")
        try:
            self.faults.check("create", f"create:{self.role.value}")
        except BaseException:
            if self.create_leaves_volume:
                self.exists = True
            raise
        self.exists = True

    def attach(self, host: str | None = None, *, deadline: Deadline | None = None) -> Path | None:
        target = host or WORKER
        self._op(f"attach@{target}")
        if not self.exists or self.deleted:
            raise self.ledger.misuse(f"attach {self.id} before create (or after delete)")
        if self.host is not None and self.host != target:
            raise self.ledger.misuse(f"attach {self.id} to {target} while it is attached to {self.host}")
        self.faults.check("attach", f"attach:{self.role.value}", f"attach:{self.role.value}@{target}")
        self.host = target
        return self.device if target == WORKER else None

    def detach(self, *, deadline: Deadline | None = None) -> None:
        self._op("detach")
        self.faults.check("detach", f"detach:{self.role.value}")
        self.host = None

    def delete(self) -> None:
        self._op("delete")
        if not self.owned:
            raise self.ledger.misuse(f"delete of {self.id}, which we do not own")
        if self.host is not None:
            raise self.ledger.misuse(f"delete of {self.id} while attached to {self.host}")
        self.faults.check("delete", f"delete:{self.role.value}")
        if self.exists:
            self.deleted = True
            self.exists = False

    def state(self) -> VolumeState:
        if not self.exists:
            return VolumeState.ABSENT
        if self.host is None:
            return VolumeState.AVAILABLE
        return VolumeState.ATTACHED if self.host == WORKER else VolumeState.IN_USE

    def wipe(self, device: Path) -> None:
        self._op("wipe")
        self.wiped = True


class MemoryBackend(Backend):
    """A backend whose machine is a function: it attaches the volumes to "builder", returns `result`."""

    name: ClassVar[str] = "memory"

    def __init__(
        self,
        options: VmOptions | None = None,
        *,
        ledger: Ledger | None = None,
        faults: Faults | None = None,
        result: BootResult | None = None,
        channel: ResultChannel = "swap",
        swap: bool = True,
        supplied: tuple[Role, ...] = (),
        create_leaves_volume: bool = False,
    ):
        super().__init__(options or VmOptions(vm_type="kvm"))
        self.ledger = ledger or Ledger()
        self.faults = faults or Faults()
        self.result = result or BootResult(ExitReason.POWERED_OFF)
        self.channel = channel  # type: ignore[misc]  # per instance here, a class attribute in real backends
        self.with_swap = swap
        self.supplied = supplied
        self.create_leaves_volume = create_leaves_volume
        self.pair: VolumePair | None = None
        self.cleanup_calls = 0
        self.kill_calls = 0
        self.console_bytes = b"booting...\nbuild ok\n"

    def _volume(self, role: Role, size: int) -> MemoryVolume:
        owned = role not in self.supplied
        return MemoryVolume(
            role,
            size,
            ledger=self.ledger,
            faults=self.faults,
            owned=owned,
            exists=not owned,
            name=f"{'user' if not owned else 'vol'}-{role.value}",
            create_leaves_volume=self.create_leaves_volume,
        )

    def verify(self) -> None:
        self.ledger.record("verify")
        self.faults.check("verify")

    def volumes(self, slot: BuildSlot) -> VolumePair:
        self.ledger.record("volumes")
        self.faults.check("volumes")
        root = self._volume(Role.ROOT, self.options.disk_size)
        swap = self._volume(Role.SWAP, self.options.swap_size) if self.with_swap else None
        self.pair = VolumePair(root, swap)
        return self.pair

    def boot_and_wait(
        self, pair: VolumePair, slot: BuildSlot, *, timeout: float | None, console: Console
    ) -> BootResult:
        self.ledger.record("boot")
        if self.channel == "swap":
            for volume in pair:
                if volume.state() != VolumeState.AVAILABLE:
                    raise self.ledger.misuse(f"boot with {volume.id} {volume.state().value}, not available")
            for volume in pair:
                volume.attach("builder")
        console.write(self.console_bytes)
        try:
            self.faults.check("boot")
        finally:
            if self.channel == "swap":
                for volume in pair:
                    volume.detach()
        return self.result

    def kill(self) -> None:
        self.ledger.record("kill")
        self.kill_calls += 1

    def cleanup(self) -> None:
        self.ledger.record("backend.cleanup")
        self.cleanup_calls += 1
        self.faults.check("backend.cleanup")


class MemorySteps:
    """HostSteps over the ledger: checks every device it is given is attached here and of the right role."""

    def __init__(self, ledger: Ledger, faults: Faults | None = None, *, status: int | None = 0):
        self.ledger = ledger
        self.faults = faults or Faults()
        self.status = status
        self.extracted_to: Path | None = None

    def _volume(self, device: Path, role: Role) -> MemoryVolume:
        volume = self.ledger.attached_here(device)
        if volume.role != role:
            raise self.ledger.misuse(f"{device} is the {volume.role.value} volume, expected {role.value}")
        return volume

    def prepare_root(self, device: Path, backend: Backend, deadline: Deadline) -> None:
        self.ledger.record("prepare_root")
        self._volume(device, Role.ROOT)
        self.faults.check("prepare_root")

    def reset_swap(self, device: Path, deadline: Deadline) -> None:
        self.ledger.record("reset_swap")
        self._volume(device, Role.SWAP)
        self.faults.check("reset_swap")

    def read_status(self, device: Path) -> int | None:
        self.ledger.record("read_status")
        self._volume(device, Role.SWAP)
        self.faults.check("read_status")
        return self.status

    def extract_statistics(self, root: Path, swap: Path | None, dest: Path, deadline: Deadline) -> None:
        self.ledger.record("extract_statistics")

    def extract(self, root: Path, swap: Path | None, dest: Path, deadline: Deadline) -> None:
        self.ledger.record("extract")
        self._volume(root, Role.ROOT)
        if swap is not None:
            self._volume(swap, Role.SWAP)
        self.faults.check("extract")
        self.extracted_to = dest
