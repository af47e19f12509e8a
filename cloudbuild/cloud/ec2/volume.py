"""EbsVolume: one EBS volume of a build, and attaching several at once.

Created in the worker's zone (gp3, encrypted, tagged) or supplied (`--vm-volumes`: wiped before
use by the orchestrator and after use here, never deleted). Attach picks a device name under the host lock and resolves the
real node by volume id (`devices.py`); waits are `retry.wait_for` with the deadlines of `Ec2Limits`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from cloudbuild import runner
from cloudbuild.cloud.base import host_lock
from cloudbuild.cloud.ec2.api import CAPACITY, NOT_FOUND, Ec2Context, Ec2Error, ec2_tags
from cloudbuild.cloud.ec2.devices import (
    pick_device_name,
    resolve_device,
    serial_of,
)
from cloudbuild.deadline import Deadline, PhaseExpired
from cloudbuild.disk.image import device_size, is_block_device
from cloudbuild.errors import DeadlineExceeded, InfraError, UsageError
from cloudbuild.log import bound, get_logger
from cloudbuild.retry import wait_for
from cloudbuild.volume import Role, Volume, VolumeState

log = get_logger(__name__)

T = TypeVar("T")

# --- EBS volumes ------------------------------------------------------------------------------

GIB = 1024


class EbsVolume(Volume):
    """An EBS volume: created in the worker's zone (gp3, encrypted, tagged), or supplied (`owned`
    False: wiped before and after use, never deleted)."""

    def __init__(
        self,
        ctx: Ec2Context,
        role: Role,
        size_mib: int,
        *,
        volume_id: str | None = None,
        owned: bool = True,
        tags: Mapping[str, str] | None = None,
        client_token: str | None = None,
    ):
        super().__init__(role, size_mib, owned=owned, tags=tags)
        self.ctx = ctx
        self._id = volume_id
        self._client_token = client_token
        self._device_name: str | None = None  # the name EC2 attached it under, on the current machine
        self._creating = False
        self._attach_requested = 0.0
        self.partner: EbsVolume | None = None  # the other volume of the build's pair

    @property
    def id(self) -> str:
        return self._id or f"<new {self.role.value} volume>"

    @property
    def volume_id(self) -> str:
        if self._id is None:
            raise InfraError(f"{self!r} was not created")
        return self._id

    # - describe -

    def describe(self) -> dict[str, Any] | None:
        """The volume as EC2 sees it now; None when it does not exist (any more)."""
        if self._id is None:
            return None
        return self.ctx.watch.describe([self._id])[self._id].info

    def _known(self) -> dict[str, Any] | None:
        """The volume as EC2 last described it after our last request on it (asked only when no
        such answer exists: our own finished waits leave one behind); None when it does not exist."""
        if self._id is None:
            return None
        return self.ctx.watch.current(self._id).info

    @staticmethod
    def _attachment(info: Mapping[str, Any] | None) -> dict[str, Any] | None:
        for att in (info or {}).get("Attachments", []):
            if att.get("State") in ("attaching", "attached", "detaching", "busy"):
                return dict(att)
        return None

    def state(self) -> VolumeState:
        info = self.describe()
        if info is None:
            return VolumeState.ABSENT
        att = self._attachment(info)
        if att is not None:
            if att["State"] == "attaching":
                return VolumeState.ATTACHING
            if att["State"] == "detaching":
                return VolumeState.DETACHING
            here = att.get("InstanceId") == self.ctx.identity.instance_id
            return VolumeState.ATTACHED if here else VolumeState.IN_USE
        return {
            "creating": VolumeState.CREATING,
            "available": VolumeState.AVAILABLE,
            "deleting": VolumeState.ABSENT,
            "deleted": VolumeState.ABSENT,
        }.get(str(info.get("State")), VolumeState.ERROR)

    # - create / delete -

    def create(self, *, deadline: Deadline | None = None) -> None:
        # nothing waits here (see below): the deadline reaches the wait in the first attach
        if self._id is not None:
            info = self.describe()
            if info is None:
                raise (InfraError if self.owned else UsageError)(f"EBS volume {self._id} does not exist")
            zone = info.get("AvailabilityZone")
            if zone != self.ctx.identity.availability_zone:
                raise UsageError(
                    f"EBS volume {self._id} is in {zone}, this worker in "
                    f"{self.ctx.identity.availability_zone}: volumes attach only within their zone"
                )
            return
        params: dict[str, Any] = {
            "AvailabilityZone": self.ctx.identity.availability_zone,
            "Size": max(1, math.ceil(self.size_mib / GIB)),
            "VolumeType": "gp3",
            "Encrypted": True,
            "TagSpecifications": [{"ResourceType": "volume", "Tags": ec2_tags(self.tags)}],
        }
        if self._client_token:
            params["ClientToken"] = self._client_token  # a retried create returns the same volume
        created = self.ctx.api.must("create_volume", **params)
        self._id = str(created["VolumeId"])
        self.ctx.watch.changed(self._id)
        # no wait here: the volume becomes available while the next one is created; the first
        # operation that needs it (attach, delete) waits (`_ready`)
        self._creating = True
        log.info("volume created", volume=self._id, size_gib=params["Size"], zone=params["AvailabilityZone"])

    def _ready(self) -> None:
        """Wait until a volume we just created is available (once)."""
        if self._creating:
            with bound(volume=self._id):
                self._wait_state("available", self.ctx.limits.create)
            self._creating = False

    def _wait_state(self, want: str, timeout: float) -> dict[str, Any]:
        # a volume absent from an answer right after its creation is not visible yet: keep waiting
        def probe(info: dict[str, Any] | None) -> dict[str, Any] | None:
            state = (info or {}).get("State")
            if state == "error":
                raise InfraError(f"EBS volume {self._id} went into state 'error'")
            return info if info is not None and state == want and self._attachment(info) is None else None

        return self._watch(probe, what=f"EBS volume {self._id} to be {want}", timeout=timeout)

    def _watch(self, probe: Callable[[dict[str, Any] | None], T | None], *, what: str, timeout: float) -> T:
        """Wait until `probe` accepts an answer about this volume: the first answer may be one
        already at hand (given after our last request), every further one is newer than the last,
        and one DescribeVolumes answers every volume of this worker being waited for."""
        volume_id = self.volume_id
        seen = [0.0]

        def poll() -> T | None:
            answer = self.ctx.watch.current(volume_id, newer_than=seen[0])
            seen[0] = answer.taken
            return probe(answer.info)

        with self.ctx.watch.waiting(volume_id):
            return wait_for(
                poll,
                what=what,
                timeout=timeout,
                interval=self.ctx.limits.poll,
                max_interval=self.ctx.limits.poll_max,
                jitter=self.ctx.limits.poll_jitter,
                deadline=self._deadline,
            )

    def delete(self) -> None:
        if self._id is None or not self.owned:
            return
        self._ready()
        self.ctx.api.call("delete_volume", VolumeId=self._id, missing_ok=NOT_FOUND)
        self.ctx.watch.forget(self._id)
        log.info("volume deleted", volume=self._id)

    # - attach / detach -

    def attach(self, host: str | None = None, *, deadline: Deadline | None = None) -> Path | None:
        target = host or self.ctx.identity.instance_id
        here = target == self.ctx.identity.instance_id
        with bound(volume=self.volume_id, attach_to=target), self._within(deadline):
            try:
                if not self._prepare_attach(target):
                    self._attach_with_flip(target, attempts=2)
            except PhaseExpired:
                raise  # slow within the phase, not a broken host
            except InfraError as exc:
                if here and not (isinstance(exc, Ec2Error) and exc.code in CAPACITY):
                    raise self.ctx.health.failed(
                        InfraError(f"attaching EBS volume {self._id} to this worker failed: {exc}")
                    ) from exc
                raise
            if not here:
                return None
            node = self._local_node()
            self.ctx.health.ok()
            return node

    def _prepare_attach(self, target: str) -> bool:
        """Make the volume attachable to `target`; True when it is attached there already."""
        self._ready()
        info = self._known()
        if info is None:
            raise InfraError(f"EBS volume {self._id} vanished")
        att = self._attachment(info)
        if att is not None and att.get("InstanceId") == target and att["State"] in ("attached", "attaching"):
            self._device_name = str(att.get("Device"))
            return True
        if att is not None:
            self.detach()
        return False

    def _attach_with_flip(self, target: str, *, attempts: int) -> None:
        """Attach and wait; a volume that flips back to `available` is attached once more."""
        for attempt in range(1, attempts + 1):
            self._request_attach(target)
            if self._wait_attached(target):
                return
            log.warning("volume flipped back to available after attach", attempt=attempt)
        raise InfraError(f"EBS volume {self._id} flipped back to available twice after attaching to {target}")

    def _request_attach(self, target: str, taken: set[str] | None = None) -> None:
        """Attach under a free device name; `taken`: the names in use on `target` when the caller
        knows them (attach_all: asked once for all its volumes), updated with the name picked."""
        # under the host lock: the name is taken in EC2's view before the next slot picks one
        with host_lock(self.ctx.lock_file):
            if taken is None:
                taken = self._names_in_use(target)
            name = pick_device_name(taken)
            taken.add(name)
            self.ctx.api.must(
                "attach_volume",
                VolumeId=self.volume_id,
                InstanceId=target,
                Device=name,
                eventual=("IncorrectState", "InvalidVolume.NotFound", "InvalidInstanceID.NotFound"),
            )
        self.ctx.watch.changed(self.volume_id)
        self._device_name = name
        self._attach_requested = time.monotonic()
        log.info("volume attaching", volume=self._id, device_name=name, attach_to=target)

    def _wait_attached(self, target: str) -> bool:
        """Wait for the requested attachment: True attached, False flipped back to available."""
        limits = self.ctx.limits
        started = self._attach_requested
        seen = False

        def probe(info: dict[str, Any] | None) -> str | None:
            nonlocal seen
            if info is None:
                raise InfraError(f"EBS volume {self._id} vanished while attaching")
            att = self._attachment(info)
            if att is not None and att.get("InstanceId") == target:
                seen = True
                return "attached" if att["State"] == "attached" else None
            if info.get("State") == "available" and (seen or time.monotonic() - started >= limits.flip_grace):
                return "flipped"
            return None

        outcome = self._watch(
            probe, what=f"EBS volume {self._id} to attach to {target}", timeout=limits.attach
        )
        return outcome == "attached"

    def _names_in_use(self, instance_id: str) -> set[str]:
        """Device names taken on an instance: its block device mappings, which list attachments in
        progress too (EbsInstanceBlockDevice.Status attaching/attached/detaching), so no
        DescribeVolumes is needed besides."""
        used: set[str] = set()
        reservations = self.ctx.api.must(
            "describe_instances", InstanceIds=[instance_id], eventual=("InvalidInstanceID.NotFound",)
        ).get("Reservations", [])
        for reservation in reservations:
            for instance in reservation.get("Instances", []):
                used.add(str(instance.get("RootDeviceName", "")))
                used.update(str(m.get("DeviceName")) for m in instance.get("BlockDeviceMappings", []))
        used.discard("")
        return used

    def _local_node(self) -> Path:
        def probe() -> Path | None:
            return resolve_device(self.volume_id, self._device_name, self.ctx.paths)

        try:
            node = wait_for(
                probe,
                what=f"the device node of EBS volume {self._id} (NVMe serial {serial_of(self.volume_id)})",
                timeout=self.ctx.limits.device,
                interval=0.05,
                max_interval=1.0,
                deadline=self._deadline,
            )
        except PhaseExpired:
            raise
        except DeadlineExceeded as exc:
            raise self.ctx.health.failed(InfraError(str(exc))) from exc
        log.info("volume attached here", device=str(node), device_name=self._device_name)
        return node

    def detach(self, *, deadline: Deadline | None = None) -> None:
        with self._within(deadline):
            if self._request_detach(force=False):
                self._wait_detached()

    def _request_detach(self, *, force: bool) -> bool:
        """Ask EC2 to detach; False when the volume is attached nowhere."""
        att = self._attachment(self._known())
        if att is None:
            self._device_name = None
            return False
        if att["State"] == "detaching" and not force:
            return True  # asked already (by a partner's release): just wait
        self.ctx.api.call(
            "detach_volume",
            VolumeId=self.volume_id,
            InstanceId=att["InstanceId"],
            Force=force,
            missing_ok=("IncorrectState", "InvalidAttachment.NotFound"),
        )
        self.ctx.watch.changed(self.volume_id)
        log.info("volume detaching", volume=self._id, detach_from=att.get("InstanceId"), force=force)
        return True

    def _wait_detached(self) -> None:
        """Wait until available; a detach stuck past its deadline is forced once."""
        with bound(volume=self.volume_id):
            try:
                self._wait_state("available", self.ctx.limits.detach)
            except PhaseExpired:
                raise  # slow, not stuck: no force within a phase that ran out
            except DeadlineExceeded:
                log.warning("volume stuck detaching, forcing")
                if self._request_detach(force=True):
                    self._wait_state("available", self.ctx.limits.detach)
        self._device_name = None

    # - wipe / release -

    def wipe(self, device: Path) -> None:
        """Discard everything on a reused volume: `blkdiscard` (EBS: instant, reads back zeros), else
        `blkdiscard --zeroout` (write-zeroes); an image file (tests, emulation) gets its blocks punched."""
        with bound(volume=self._id, device=str(device)):
            timeout = self.ctx.limits.create
            if is_block_device(device):
                try:
                    runner.run(["blkdiscard", device], timeout=timeout)
                    log.info("volume wiped (discard)")
                except runner.CommandError as exc:
                    log.info("discard unsupported, zeroing", error=str(exc))
                    runner.run(["blkdiscard", "--zeroout", device], timeout=None)
                    log.info("volume wiped (zeroed)")
            else:
                runner.run(
                    [
                        "fallocate",
                        "--punch-hole",
                        "--keep-size",
                        "--offset",
                        "0",
                        "--length",
                        str(device_size(device)),
                        device,
                    ],
                    timeout=timeout,
                )
                log.info("volume wiped (image file, holes punched)")

    def release(self) -> None:
        """Detach (and delete what we own); a supplied volume still attached here is wiped first.

        The partner volume of the pair (root for swap and the other way round), when it is owned
        and attached here too, is asked to detach at the same time, so its detach runs while this
        one's is waited for (the orchestrator releases the volumes one after the other)."""
        partner = self.partner
        if self.owned and partner is not None and partner.owned and partner._id is not None:
            with contextlib.suppress(InfraError):
                partner._request_detach(force=False)
        if not self.owned and self._id is not None:
            att = self._attachment(self._known())
            if att is not None and att.get("InstanceId") == self.ctx.identity.instance_id:
                node = resolve_device(self.volume_id, att.get("Device"), self.ctx.paths)
                if node is not None:
                    self.wipe(node)
        super().release()


def attach_all(volumes: Sequence[EbsVolume], host: str) -> None:
    """Attach volumes to another machine (the builder): every request first, then the waits, so
    the attachments progress together. A volume that flips back gets one more attach of its own."""
    requested: list[EbsVolume] = []
    taken: set[str] | None = None  # the names in use on `host`: asked once for all the volumes
    for volume in volumes:
        with bound(volume=volume.volume_id, attach_to=host):
            if not volume._prepare_attach(host):
                if taken is None:
                    taken = volume._names_in_use(host)
                volume._request_attach(host, taken)
                requested.append(volume)
    for volume in requested:
        with bound(volume=volume.volume_id, attach_to=host):
            if not volume._wait_attached(host):
                log.warning("volume flipped back to available after attach", attempt=1)
                volume._attach_with_flip(host, attempts=1)


def detach_all(volumes: Sequence[EbsVolume]) -> None:
    """Detach volumes: every request first, then the waits."""
    requested = [volume for volume in volumes if volume._request_detach(force=False)]
    for volume in requested:
        volume._wait_detached()
