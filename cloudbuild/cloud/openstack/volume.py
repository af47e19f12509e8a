"""CinderVolume: a Cinder volume attached through Nova's volume-attachment API.

obs-build's version polls `nova volume-show` tables and, when the device Nova names does not
show up, takes "the last /dev/vd? device". Here the node is found by what the hypervisor puts on
the disk itself: the virtio serial (the volume id, cut to 20 characters by virtio-blk), then the
virtio-scsi name, and only then the device Nova reports, and only once it is a block device.

States are read from Cinder (`GET /volumes/{id}`, the one call whose answer advances a transition);
every wait goes through `cloudbuild.retry.wait_for` with a deadline. A volume stuck in
`attaching` or `detaching` past its deadline is an infrastructure error (exit 3), and a host
problem (exit 4) when it happens again on the same worker (`AttachHealth`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openstack.exceptions as os_exc

from cloudbuild.cloud.base import AttachHealth
from cloudbuild.cloud.openstack.api import Api
from cloudbuild.cloud.openstack.devices import find_device
from cloudbuild.deadline import Deadline, PhaseExpired
from cloudbuild.disk.image import device_size
from cloudbuild.errors import DeadlineExceeded, InfraError, UsageError
from cloudbuild.log import get_logger
from cloudbuild.retry import wait_for
from cloudbuild.runner import CommandError, run
from cloudbuild.volume import TAG_BUILD, TAG_OWNER, TAG_ROLE, TAG_SLOT, Role, Volume, VolumeState

log = get_logger(__name__)

GIB = 1024
SETTLING = ("creating", "attaching", "detaching", "reserved", "downloading", "maintenance")
FAILED = ("error", "error_deleting", "error_restoring", "error_extending", "error_managing")


def size_gib(size_mib: int) -> int:
    """Cinder sizes are whole GiB: round up."""
    return max(1, math.ceil(size_mib / GIB))


@dataclass(frozen=True)
class Snapshot:
    """What one `GET /volumes/{id}` said."""

    status: str
    attached_to: tuple[str, ...]  # server ids
    device: str | None  # the device Nova reported for the attachment to the worker

    @staticmethod
    def of(volume: Any, worker: str) -> Snapshot:
        attachments = list(getattr(volume, "attachments", None) or [])
        servers = tuple(str(a.get("server_id")) for a in attachments if a.get("server_id"))
        device = next((a.get("device") for a in attachments if a.get("server_id") == worker), None)
        return Snapshot(str(getattr(volume, "status", "") or ""), servers, device)


class CinderVolume(Volume):
    """One Cinder volume of a build slot. See cloudbuild/volume.py for the contract."""

    def __init__(
        self,
        api: Api,
        role: Role,
        size_mib: int,
        *,
        worker: str,
        name: str,
        owned: bool = True,
        ref: str | None = None,
        tags: Mapping[str, str] | None = None,
        dev_root: Path = Path("/dev"),
        health: AttachHealth | None = None,
    ):
        super().__init__(role, size_mib, owned=owned, tags=tags)
        self.api = api
        self.worker = worker
        self.name = name
        self.ref = ref  # the user's name or id of a supplied volume
        self.dev_root = dev_root
        self.health = health  # None: stuck operations are not counted against a worker (gc)
        self._id: str | None = None
        self._stuck_counted = False
        self.log = log.bind(role=role.value)

    @property
    def id(self) -> str:
        return self._id or self.ref or self.name

    @classmethod
    def existing(cls, api: Api, volume_id: str) -> CinderVolume:
        """A volume known only by its id (gc): detach from whatever holds it, delete."""
        volume = cls(api, Role.ROOT, 0, worker="", name=volume_id, owned=True)
        volume._id = volume_id
        volume.log = volume.log.bind(volume=volume_id)
        return volume

    def _stuck(self, message: str) -> Exception:
        """The error for a stuck transition; counted against the worker once per volume."""
        if self.health is None or self._stuck_counted:
            return InfraError(message)
        self._stuck_counted = True
        return self.health.failed(message)

    def _ok(self) -> None:
        if self.health is not None:
            self.health.ok()

    # -- reading -------------------------------------------------------------------------------
    def _get(self) -> Snapshot | None:
        if self._id is None:
            return None
        volume_id = self._id
        found = self.api.find(
            f"get volume {volume_id}", lambda: self.api.conn.block_storage.get_volume(volume_id)
        )
        return None if found is None else Snapshot.of(found, self.worker)

    def state(self) -> VolumeState:
        snap = self._get()
        if snap is None or snap.status == "deleting":
            return VolumeState.ABSENT
        if snap.status == "in-use":
            return VolumeState.ATTACHED if self.worker in snap.attached_to else VolumeState.IN_USE
        return {
            "creating": VolumeState.CREATING,
            "available": VolumeState.AVAILABLE,
            "attaching": VolumeState.ATTACHING,
            "reserved": VolumeState.ATTACHING,
            "detaching": VolumeState.DETACHING,
        }.get(snap.status, VolumeState.ERROR)

    def _wait(self, what: str, timeout: float, done: Callable[[Snapshot], bool]) -> Snapshot:
        """Poll the volume until `done(snapshot)` is true; a failed or vanished volume ends the wait."""
        t = self.api.timeouts

        def probe() -> Snapshot | None:
            snap = self._get()
            if snap is None:
                raise InfraError(f"volume {self.id} vanished while waiting for it to be {what}")
            if snap.status in FAILED:
                raise InfraError(f"volume {self.id} went to status '{snap.status}' while waiting for {what}")
            return snap if done(snap) else None

        return wait_for(
            probe,
            what=f"volume {self.id} {what}",
            timeout=timeout,
            interval=t.poll,
            max_interval=t.poll_max,
            deadline=self._deadline,
        )

    def _wait_settled(self, what: str, timeout: float) -> Snapshot:
        """Wait until no transition is in progress; a volume stuck past `timeout` is counted."""
        try:
            return self._wait(what, timeout, lambda s: s.status not in SETTLING)
        except PhaseExpired:
            raise  # slow within the phase, not stuck: not counted against the worker
        except DeadlineExceeded as exc:
            snap = self._get()
            status = snap.status if snap else "gone"
            raise self._stuck(f"volume {self.id} stuck in '{status}' for {timeout:g}s ({what})") from exc

    # -- lifecycle -----------------------------------------------------------------------------
    def create(self, *, deadline: Deadline | None = None) -> None:
        with self._within(deadline):
            self._create()

    def _create(self) -> None:
        if self._id is not None:
            return
        if not self.owned:
            self._use_supplied()
            return
        volumes = self.api.conn.block_storage
        attempts = 0

        def find_or_create() -> str:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                # a create whose answer was lost may have happened: adopt it instead of leaking it
                existing = self._find_own()
                if existing is not None:
                    return existing
            created = volumes.create_volume(
                size=size_gib(self.size_mib),
                name=self.name,
                metadata=dict(self.tags),
                description="cloudbuild build volume",
            )
            return str(created.id)

        self._id = self.api.call(f"create volume {self.name}", find_or_create)
        self.log = self.log.bind(volume=self._id)
        self.log.info("volume created", size_gib=size_gib(self.size_mib))
        self._wait("available", self.api.timeouts.volume_ready, lambda s: s.status == "available")

    def _find_own(self) -> str | None:
        wanted = {k: self.tags[k] for k in (TAG_OWNER, TAG_BUILD, TAG_SLOT, TAG_ROLE) if k in self.tags}
        if not wanted:
            return None
        found = list(self.api.conn.block_storage.volumes(details=False, properties=json.dumps(wanted)))
        return str(found[0].id) if found else None

    def _use_supplied(self) -> None:
        ref = self.ref or self.name
        found = self.api.call(
            f"find volume {ref}",
            lambda: self.api.conn.block_storage.find_volume(ref, ignore_missing=True),
        )
        if found is None:
            raise UsageError(f"--vm-volumes: no volume named or with id '{ref}' in this project")
        snap = Snapshot.of(found, self.worker)
        foreign = [s for s in snap.attached_to if s != self.worker]
        if foreign:
            # refused before it became ours: the cleanup's release() must not detach it from them
            raise InfraError(
                f"supplied volume {ref} ({found.id}) is attached to server {', '.join(foreign)}; "
                "it must be free before a build uses it"
            )
        self._id = str(found.id)
        self.log = self.log.bind(volume=self._id)
        self.log.info("using supplied volume", status=snap.status)

    def attach(self, host: str | None = None, *, deadline: Deadline | None = None) -> Path | None:
        with self._within(deadline):
            return self._attach(host)

    def _attach(self, host: str | None) -> Path | None:
        server = host or self.worker
        if self._id is None:
            raise InfraError(f"{self!r}: attach before create")
        snap = self._attach_to(server)
        if server != self.worker:
            return None
        t = self.api.timeouts
        dev_root, volume_id = self.dev_root, self._id
        nova_device = snap.device
        device = wait_for(
            lambda: find_device(dev_root, volume_id, nova_device),
            what=f"device node of volume {volume_id} (/dev/disk/by-id/virtio-{volume_id[:20]})",
            timeout=t.device,
            interval=0.05,
            max_interval=1.0,
            deadline=self._deadline,
        )
        self.log.info("volume attached here", device=str(device))
        return device

    def _attach_to(self, server: str) -> Snapshot:
        t = self.api.timeouts
        volume_id = str(self._id)
        snap = self._wait_settled("settled before attaching", t.attach)
        if snap.status == "in-use" and server in snap.attached_to:
            self._ok()
            return snap
        if snap.status == "in-use":
            # still held by a builder that is going away: its deletion frees the volume
            self._wait(
                "free of other servers", t.detach, lambda s: s.status != "in-use" or server in s.attached_to
            )
            snap = self._wait_settled("released by the other server", t.detach)
            if snap.status == "in-use" and server in snap.attached_to:
                self._ok()
                return snap
        # obs-build re-attaches once when the volume flips back to available (Nova rolled back)
        for attempt in (1, 2):
            self.log.info("attaching volume", server=server, attempt=attempt)
            self.api.call(
                f"attach volume {volume_id} to server {server}",
                self._once(
                    lambda: self.api.conn.compute.create_volume_attachment(server, volume_id),
                    done=lambda s: (
                        s is not None
                        and (
                            s.status in ("attaching", "reserved")
                            or (s.status == "in-use" and server in s.attached_to)
                        )
                    ),
                ),
            )
            snap = self._wait_settled("attaching", t.attach)
            if snap.status == "in-use" and server in snap.attached_to:
                self._ok()
                return snap
            self.log.warning("volume did not attach", server=server, status=snap.status, attempt=attempt)
        raise InfraError(
            f"volume {volume_id} did not attach to server {server}: it went back to '{snap.status}' twice"
        )

    def _once(
        self, request: Callable[[], object], *, done: Callable[[Snapshot | None], bool]
    ) -> Callable[[], None]:
        """`request` for `Api.call`: when retried, first look whether the lost try already took effect."""
        tried = False

        def attempt() -> None:
            nonlocal tried
            if tried:
                try:
                    current: Snapshot | None = Snapshot.of(
                        self.api.conn.block_storage.get_volume(str(self._id)), self.worker
                    )
                except os_exc.NotFoundException:
                    current = None
                if done(current):
                    return
            tried = True
            request()

        return attempt

    def detach(self, *, deadline: Deadline | None = None) -> None:
        with self._within(deadline):
            self._detach()

    def _detach(self) -> None:
        if self._id is None:
            return
        volume_id = self._id
        t = self.api.timeouts
        snap = self._get()
        if snap is None or snap.status in ("available", "deleting"):
            return
        if snap.status in FAILED and not snap.attached_to:
            return  # nothing holds it; an errored volume can still be deleted
        if snap.status in SETTLING:
            snap = self._wait_settled("settled before detaching", t.detach)
        for server in snap.attached_to if snap.status == "in-use" else ():
            self.log.info("detaching volume", server=server)
            self.api.find(
                f"detach volume {volume_id} from server {server}",
                self._once(
                    lambda server=server: self.api.conn.compute.delete_volume_attachment(  # type: ignore[misc]
                        server, volume_id, ignore_missing=False
                    ),
                    done=lambda s, server=server: (
                        s is None or s.status != "in-use" or server not in s.attached_to
                    ),  # type: ignore[misc]
                ),
            )
        try:
            self._wait("available", t.detach, lambda s: s.status == "available")
        except PhaseExpired:
            raise
        except DeadlineExceeded as exc:
            now = self._get()
            status = now.status if now else "gone"
            raise self._stuck(
                f"volume {volume_id} stuck in '{status}' for {t.detach:g}s (detaching)"
            ) from exc
        self._ok()
        self.log.info("volume detached")

    def delete(self) -> None:
        if self._id is None or not self.owned:
            return
        volume_id = self._id
        self.log.info("deleting volume")
        self.api.find(
            f"delete volume {volume_id}",
            self._once(
                lambda: self.api.conn.block_storage.delete_volume(volume_id, ignore_missing=False),
                done=lambda s: s is None or s.status == "deleting",
            ),
        )
        t = self.api.timeouts

        def gone() -> bool:
            snap = self._get()
            if snap is not None and snap.status in FAILED:
                raise InfraError(f"volume {volume_id} went to '{snap.status}' while being deleted")
            return snap is None

        wait_for(
            gone,
            what=f"volume {volume_id} deleted",
            timeout=t.delete,
            interval=t.poll,
            max_interval=t.poll_max,
        )
        self.log.info("volume deleted")

    def wipe(self, device: Path) -> None:
        """A supplied volume carries a previous build's data: discard it, else write zeros over it."""
        self.log.info("wiping supplied volume", device=str(device))
        try:
            run(["blkdiscard", device], timeout=600)
            return
        except CommandError as exc:
            self.log.info("blkdiscard failed, zeroing instead", error=str(exc))
        size = device_size(device)
        run(
            [
                "dd",
                "if=/dev/zero",
                f"of={device}",
                "bs=4M",
                f"count={size}",
                "iflag=count_bytes",
                "conv=notrunc,fsync",
                "status=none",
            ],
            timeout=None,
        )
