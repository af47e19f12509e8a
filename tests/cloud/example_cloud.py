"""An in-memory cloud written the way a third cloud package is (docs/new-cloud.md): the template.

`cloudbuild/cloud/<name>/` has one module per role; here each role is one class in this file,
named after its module: `ExampleApi` (api: every call, retries, error -> exit code), `worker`
(identity), `ExampleVolume` (volume), `find_device` (devices), `ExampleBuilder` (builder),
`ExampleGc` (gc) and `ExampleBackend` (backend, a `CloudBackend`). `ExampleCloud` is the "remote"
side: volumes are image files, "attached here" is a by-id link, a builder is a thread running a
guest on the volume images. tests/cloud/test_contract.py runs this cloud with EC2 and OpenStack,
so the template cannot drift from what the contract asks.
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cloudbuild.backend import BootResult, BuildSlot, Console, ExitReason
from cloudbuild.cloud.base import (
    BuilderState,
    BuildLocks,
    CloudBackend,
    RunningElsewhere,
    mark_swap_killed,
)
from cloudbuild.cloud.common import GcAdapter, Resource, build_tags, format_time, lease_expiry
from cloudbuild.deadline import Deadline
from cloudbuild.errors import DeadlineExceeded, InfraError, UsageError
from cloudbuild.options import VmOptions
from cloudbuild.retry import Policy, call_with_retries, wait_for
from cloudbuild.volume import TAG_BUILD, TAG_GC_SEEN, TAG_OWNER, Role, Volume, VolumePair, VolumeState

T = TypeVar("T")
MIB = 1024 * 1024
FAST_API = Policy(deadline=5.0, initial=0.001, maximum=0.01, attempts=5)
Guest = Callable[[list[Path]], None]  # runs the build on the images of [root, swap]


class Throttled(Exception):
    """The cloud is busy: worth another try."""


class QuotaExceeded(Exception):
    """The project is out of volumes: exit 3, run the build elsewhere or later."""


@dataclass
class Disk:
    id: str
    image: Path
    tags: dict[str, str]
    attached_to: str | None = None


@dataclass
class Machine:
    id: str
    tags: dict[str, str]
    disks: list[str]
    state: str = "running"  # running -> stopped; "gone" once deleted
    killed: bool = False


@dataclass
class ExampleCloud:
    """The cloud's side, shared by every backend and gc of one test."""

    base: Path
    worker: str = "worker-1"
    guest: Guest | None = None
    volumes: dict[str, Disk] = field(default_factory=dict)
    machines: dict[str, Machine] = field(default_factory=dict)
    alive: set[str] = field(default_factory=set)
    faults: dict[str, list[Exception]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ids: Iterator[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.alive.add(self.worker)
        self.dev = self.base / "dev"
        (self.dev / "by-id").mkdir(parents=True, exist_ok=True)

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self.ids)}"

    def fail_next(self, op: str, *errors: Exception) -> None:
        self.faults.setdefault(op, []).extend(errors)

    def check(self, op: str) -> None:
        pending = self.faults.get(op)
        if pending:
            raise pending.pop(0)

    def boot(self, machine: Machine) -> None:
        images = [self.volumes[d].image for d in machine.disks]

        def run() -> None:
            if self.guest is not None:
                self.guest(images)
            with self.lock:
                if machine.state == "running":
                    machine.state = "stopped"

        threading.Thread(target=run, daemon=True).start()


# -- api --------------------------------------------------------------------------------------------
class ExampleApi:
    """Every call to the cloud: retried while throttled, a quota refusal is an InfraError (exit 3)."""

    def __init__(self, cloud: ExampleCloud):
        self.cloud = cloud

    def call(self, op: str, fn: Callable[[], T]) -> T:
        def attempt() -> T:
            with self.cloud.lock:
                self.cloud.check(op)
                return fn()

        try:
            return call_with_retries(
                attempt, is_transient=lambda exc: isinstance(exc, Throttled), what=op, policy=FAST_API
            )
        except QuotaExceeded as exc:
            raise InfraError(f"{op}: quota exceeded ({exc})") from exc
        except Throttled as exc:
            raise InfraError(f"{op}: still throttled after retries") from exc


# -- devices ----------------------------------------------------------------------------------------
def find_device(dev: Path, volume_id: str) -> Path | None:
    """The node an attached volume has here, by its id (never by an attach order)."""
    link = dev / "by-id" / volume_id
    return link if link.exists() else None


# -- volume -----------------------------------------------------------------------------------------
class ExampleVolume(Volume):
    def __init__(self, api: ExampleApi, role: Role, size_mib: int, *, tags: dict[str, str]):
        super().__init__(role, size_mib, owned=True, tags=tags)
        self.api = api
        self._id: str | None = None

    @property
    def id(self) -> str:
        return self._id or f"<{self.role.value}, not created>"

    def create(self, *, deadline: Deadline | None = None) -> None:
        cloud = self.api.cloud

        def create() -> str:
            volume_id = cloud.new_id("vol")
            image = cloud.base / f"{volume_id}.img"
            image.write_bytes(b"")
            with open(image, "r+b") as f:
                f.truncate(self.size_mib * MIB)
            cloud.volumes[volume_id] = Disk(volume_id, image, dict(self.tags))
            return volume_id

        self._id = self.api.call("create_volume", create)

    def _disk(self) -> Disk | None:
        return self.api.cloud.volumes.get(self._id or "")

    def attach(self, host: str | None = None, *, deadline: Deadline | None = None) -> Path | None:
        cloud = self.api.cloud
        target = host or cloud.worker

        def attach() -> None:
            disk = cloud.volumes[str(self._id)]
            if disk.attached_to not in (None, target):
                raise InfraError(f"volume {disk.id} is attached to {disk.attached_to}")
            disk.attached_to = target
            if target == cloud.worker:
                link = cloud.dev / "by-id" / disk.id
                link.unlink(missing_ok=True)
                link.symlink_to(disk.image)

        self.api.call("attach_volume", attach)
        if target != cloud.worker:
            return None
        return wait_for(
            lambda: find_device(cloud.dev, str(self._id)), what=f"device of {self._id}", timeout=5.0
        )

    def detach(self, *, deadline: Deadline | None = None) -> None:
        cloud = self.api.cloud

        def detach() -> None:
            disk = self._disk()
            if disk is not None:
                disk.attached_to = None
                (cloud.dev / "by-id" / disk.id).unlink(missing_ok=True)

        self.api.call("detach_volume", detach)

    def delete(self) -> None:
        def delete() -> None:
            disk = self.api.cloud.volumes.pop(str(self._id), None)
            if disk is not None:
                disk.image.unlink(missing_ok=True)

        if self._id is not None:
            self.api.call("delete_volume", delete)

    def state(self) -> VolumeState:
        with self.api.cloud.lock:
            disk = self._disk()
            if disk is None:
                return VolumeState.ABSENT
            if disk.attached_to is None:
                return VolumeState.AVAILABLE
            return VolumeState.ATTACHED if disk.attached_to == self.api.cloud.worker else VolumeState.IN_USE


# -- builder ----------------------------------------------------------------------------------------
class ExampleBuilder:
    """The machine of one build: created with the volumes, watched until it stops, deleted."""

    def __init__(self, api: ExampleApi):
        self.api = api
        self.id: str | None = None

    def create(self, disks: list[str], tags: dict[str, str]) -> None:
        cloud = self.api.cloud

        def create() -> Machine:
            machine = Machine(cloud.new_id("vm"), dict(tags), disks)
            for disk in disks:
                cloud.volumes[disk].attached_to = machine.id
            cloud.machines[machine.id] = machine
            return machine

        machine = self.api.call("create_machine", create)
        self.id = machine.id
        cloud.boot(machine)

    def state(self) -> str:
        machine = self.api.cloud.machines.get(self.id or "")
        return "gone" if machine is None else machine.state

    def run(self, *, timeout: float | None, killed: Callable[[], bool]) -> BootResult:
        try:
            state = wait_for(
                lambda: s if (s := self.state()) != "running" else None,
                what=f"builder {self.id} to stop",
                timeout=timeout if timeout is not None else 3600.0,
                interval=0.005,
                max_interval=0.02,
            )
        except DeadlineExceeded:
            self.stop(killed=True)
            return BootResult(ExitReason.TIMEOUT, detail="no power-off before the deadline")
        machine = self.api.cloud.machines.get(self.id or "")
        if killed() or (machine is not None and machine.killed):
            return BootResult(ExitReason.KILLED)
        if state != "stopped":
            return BootResult(ExitReason.CRASHED, detail=f"builder {self.id} {state}")
        return BootResult(ExitReason.POWERED_OFF)

    def stop(self, *, killed: bool) -> None:
        def stop() -> None:
            machine = self.api.cloud.machines.get(self.id or "")
            if machine is not None:
                machine.killed = machine.killed or killed
                machine.state = "stopped"

        self.api.call("stop_machine", stop)

    def delete(self) -> None:
        cloud = self.api.cloud

        def delete() -> None:
            machine = cloud.machines.pop(str(self.id), None)
            for disk in machine.disks if machine else []:
                if disk in cloud.volumes:
                    cloud.volumes[disk].attached_to = None

        if self.id is not None:
            self.api.call("delete_machine", delete)
            self.id = None


# -- gc ---------------------------------------------------------------------------------------------
class ExampleGc(GcAdapter):
    def __init__(self, api: ExampleApi, *, local_worker: str | None, state_dir: Path):
        self.api = api
        self.local_worker = local_worker
        self.locks = BuildLocks(state_dir / "builds")

    def list_resources(self) -> Iterable[Resource]:
        cloud = self.api.cloud
        with cloud.lock:
            machines = [Resource("machine", m.id, dict(m.tags), 0) for m in cloud.machines.values()]
            return machines + [Resource("volume", v.id, dict(v.tags), 1) for v in cloud.volumes.values()]

    def owner_alive(self, owner: str) -> bool:
        return owner in self.api.cloud.alive

    def build_alive(self, resource: Resource) -> bool | None:
        build = resource.tags.get(TAG_BUILD)
        if not build or self.local_worker is None or resource.owner != self.local_worker:
            return None
        return self.locks.alive(build)

    def tag_seen(self, resource: Resource, when: dt.datetime | None) -> None:
        cloud = self.api.cloud

        def stamp() -> None:
            item: Any = cloud.machines.get(resource.id) or cloud.volumes.get(resource.id)
            if item is None:
                return
            if when is None:
                item.tags.pop(TAG_GC_SEEN, None)
            else:
                item.tags[TAG_GC_SEEN] = format_time(when)

        self.api.call("tag", stamp)

    def delete_resource(self, resource: Resource) -> None:
        if resource.kind == "machine":
            builder = ExampleBuilder(self.api)
            builder.id = resource.id
            builder.delete()
            return

        def delete() -> None:
            disk = self.api.cloud.volumes.pop(resource.id, None)
            if disk is not None:
                disk.image.unlink(missing_ok=True)

        self.api.call("delete_volume", delete)


# -- backend ----------------------------------------------------------------------------------------
class ExampleBackend(CloudBackend):
    name = "example-cloud"
    cloud = "example"

    def __init__(self, options: VmOptions, *, example: ExampleCloud, state_dir: Path):
        super().__init__(options, state_dir=state_dir)
        self.api = ExampleApi(example)
        self.builder: ExampleBuilder | None = None

    @property
    def worker_id(self) -> str:
        return self.api.cloud.worker

    def verify(self) -> None:
        if self.options.vm_volume_root:
            raise UsageError("--vm-volumes: the example cloud has no supplied volumes")

    def _tags(self, slot: BuildSlot, role: str) -> dict[str, str]:
        return build_tags(
            owner=self.worker_id,
            build=slot.build_id,
            slot=slot.slot,
            expires=lease_expiry(self.options.build_timeout),
            role=role,
        )

    def volumes(self, slot: BuildSlot) -> VolumePair:
        if not self.acquire_build_lock(slot):
            self.pair = VolumePair(RunningElsewhere(Role.ROOT, slot.build_id))
            return self.pair
        o = self.options
        self.pair = VolumePair(
            ExampleVolume(self.api, Role.ROOT, o.disk_size, tags=self._tags(slot, "root")),
            ExampleVolume(self.api, Role.SWAP, o.swap_size, tags=self._tags(slot, "swap")),
        )
        return self.pair

    def boot_and_wait(
        self, pair: VolumePair, slot: BuildSlot, *, timeout: float | None, console: Console
    ) -> BootResult:
        if pair.swap is None:
            raise InfraError("the example cloud needs a swap volume")
        builder = self.builder = ExampleBuilder(self.api)
        builder.create([pair.root.id, pair.swap.id], self._tags(slot, "builder"))
        self.builder_state = BuilderState.RUNNING
        console.write(f"builder {builder.id} running\n".encode())
        result = builder.run(timeout=timeout, killed=lambda: self.killed(slot))
        self.builder_state = BuilderState.STOPPED
        builder.delete()  # the volumes are free once the machine is gone
        if result.reason == ExitReason.KILLED:
            mark_swap_killed(pair.swap)
        return result

    def kill(self) -> None:
        if self.builder is not None:
            self.builder.stop(killed=True)
            return
        if self.running_elsewhere is None:
            return
        for machine in list(self.api.cloud.machines.values()):  # another process' build
            if (
                machine.tags.get(TAG_BUILD) == self.running_elsewhere
                and machine.tags.get(TAG_OWNER) == self.worker_id
            ):
                other = ExampleBuilder(self.api)
                other.id = machine.id
                other.stop(killed=True)

    def release_builder(self) -> None:
        if self.builder is not None:
            self.builder.delete()
            self.builder = None
        self.builder_state = BuilderState.NONE
