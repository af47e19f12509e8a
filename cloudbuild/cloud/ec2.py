"""`--vm-type ec2`: EBS volumes as root and swap, a builder instance that runs the build over them.

obs-build's EC2 type snapshots the volumes, registers an AMI per build and runs it. Here the
volumes move instead: the worker creates (or reuses) two EBS volumes in its own availability zone,
attaches the root here so the host steps can mkfs and stage it, hands both to a builder instance
(launched from `--ec2-builder-ami`, or a stopped one from this worker's warm pool), streams the
builder's console until it powers off, and takes the volumes back. No snapshot, no image, no
kernel id, no fixed device name.

The adapter is thin (see ARCHITECTURE.md): every EC2 call goes through `Ec2Api.call`, which retries
throttling and eventual consistency through `cloudbuild.retry` and maps everything else to an exit
code (capacity and quota: 3; bad AMI/subnet/group: 1). Waiting is `retry.wait_for` with a deadline.
The leak sweep is `cloudbuild.cloud.common.sweep`; `Ec2GcAdapter` only lists, stamps and deletes.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.session
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from cloudbuild import runner
from cloudbuild.backend import Backend, BootResult, BuildSlot, Console, ExitReason, register
from cloudbuild.cloud.common import (
    TAG_GC_SEEN,
    TAG_POOL,
    BuildLocks,
    GcAdapter,
    Resource,
    build_tags,
    format_time,
    is_cloudbuild_tagged,
    lease_expiry,
)
from cloudbuild.cloud.ec2_imds import Imds, WorkerIdentity
from cloudbuild.cloud.ec2_nvme import (
    BY_ID_PREFIX,
    HostPaths,
    host_lock,
    pick_device_name,
    resolve_device,
    serial_of,
)
from cloudbuild.disk.image import device_size, is_block_device
from cloudbuild.errors import DeadlineExceeded, HostBroken, InfraError, UsageError
from cloudbuild.log import bound, get_logger
from cloudbuild.options import VmOptions
from cloudbuild.retry import call_with_retries, wait_for
from cloudbuild.volume import TAG_BUILD, TAG_EXPIRES, TAG_OWNER, Role, Volume, VolumePair, VolumeState

log = get_logger(__name__)

# --- errors and the transient predicate -------------------------------------------------------

THROTTLING = frozenset(
    {
        "RequestLimitExceeded",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "Unavailable",
    }
)
"""Codes that mean "the API is busy": always worth another try."""

CAPACITY = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientVolumeCapacity",
        "InsufficientCapacity",
        "VolumeLimitExceeded",
        "InstanceLimitExceeded",
        "VcpuLimitExceeded",
        "MaxIOPSLimitExceeded",
        "SnapshotLimitExceeded",
    }
)
"""Out of capacity or quota here and now: exit 3, the job goes elsewhere (or later)."""

USAGE_PREFIXES = ("InvalidAMIID.", "InvalidSubnetID.", "InvalidGroup.", "InvalidKeyPair.")
"""The options name something that does not exist: running elsewhere fails the same way (exit 1)."""

NOT_FOUND = frozenset(
    {
        "InvalidVolume.NotFound",
        "InvalidInstanceID.NotFound",
        "InvalidSnapshot.NotFound",
        "InvalidAMIID.NotFound",
    }
)


def error_code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def transient(*eventual: str) -> Callable[[BaseException], bool]:
    """The retry predicate of one call: throttling and connection trouble always, plus the
    eventual-consistency codes that call may see (`InvalidVolume.NotFound` right after create,
    `IncorrectState` while attaching)."""
    codes = THROTTLING | frozenset(eventual)

    def is_transient(exc: BaseException) -> bool:
        if isinstance(exc, BotoConnectionError | HTTPClientError):
            return True
        if isinstance(exc, ClientError):
            if error_code(exc) in codes:
                return True
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return isinstance(status, int) and status >= 500
        return False

    return is_transient


class Ec2Error(InfraError):
    """An EC2 call failed for good; `code` is EC2's error code."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code


class Ec2UsageError(UsageError):
    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code


def translate(exc: ClientError, op: str) -> Ec2Error | Ec2UsageError:
    code = error_code(exc)
    message = str(exc.response.get("Error", {}).get("Message", "")) or str(exc)
    if code in CAPACITY:
        return Ec2Error(
            f"EC2 {op}: out of capacity or quota ({code}): {message}; retry later or elsewhere", code
        )
    if code.startswith(USAGE_PREFIXES):
        return Ec2UsageError(f"EC2 {op}: {code}: {message}; check the --ec2-* options", code)
    return Ec2Error(f"EC2 {op}: {code}: {message}", code)


class Ec2Api:
    """The EC2 client behind one retry/translate door. Botocore's own retries are off (see client())."""

    def __init__(self, client: Any):
        self.client = client
        self.calls: list[str] = []

    def call(
        self,
        op: str,
        /,
        *,
        eventual: Collection[str] = (),
        missing_ok: Collection[str] = (),
        **params: Any,
    ) -> dict[str, Any] | None:
        """Call `op` (snake_case); None when it failed with a code in `missing_ok`."""
        fn = getattr(self.client, op)
        try:
            result: dict[str, Any] = call_with_retries(
                lambda: fn(**params), is_transient=transient(*eventual), what=f"EC2 {op}"
            )
            return result
        except ClientError as exc:
            if error_code(exc) in missing_ok:
                return None
            raise translate(exc, op) from exc
        except BotoCoreError as exc:
            raise Ec2Error(f"EC2 {op}: {exc}") from exc

    def must(self, op: str, /, **kwargs: Any) -> dict[str, Any]:
        result = self.call(op, **kwargs)
        assert result is not None  # no missing_ok given
        return result


def client(region: str | None = None, *, session: boto3.Session | None = None) -> Any:
    """An EC2 client that honours botocore's endpoint settings (`AWS_ENDPOINT_URL_EC2`, profiles)
    and leaves all retrying to cloudbuild.retry (one place, one policy, logged)."""
    config = botocore.config.Config(
        retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=10, read_timeout=60
    )
    s = session or boto3.Session()
    return s.client("ec2", region_name=region or s.region_name, config=config)


def ec2_tags(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def tag_dict(tags: Iterable[Mapping[str, str]] | None) -> dict[str, str]:
    return {t["Key"]: t.get("Value", "") for t in tags or ()}


# --- settings shared by the volumes and the backend of one worker -----------------------------


@dataclass(frozen=True)
class Ec2Limits:
    """Seconds every wait may take (tests shorten them)."""

    create: float = 300.0
    attach: float = 180.0
    detach: float = 180.0
    device: float = 60.0
    flip_grace: float = (
        10.0  # an attachment not seen after this long, with the volume available: flipped back
    )
    running: float = 600.0
    stop: float = 600.0
    terminate: float = 600.0
    poll: float = 1.0  # first poll interval of a wait; grows by half to poll_max
    poll_max: float = 10.0
    console_poll_max: float = 5.0  # while a build runs: how late a power-off is noticed, at most
    broken_after: int = 3  # attach failures in a row on this worker before it declares itself broken


DEFAULT_STATE_DIR = Path("/var/lib/cloudbuild/ec2")


@dataclass
class Ec2Context:
    """What every EbsVolume and the backend of one worker share."""

    api: Ec2Api
    identity: WorkerIdentity
    paths: HostPaths = field(default_factory=HostPaths)
    state_dir: Path = DEFAULT_STATE_DIR
    limits: Ec2Limits = field(default_factory=Ec2Limits)

    @property
    def lock_file(self) -> Path:
        return self.state_dir / "devices.lock"

    @property
    def health_file(self) -> Path:
        return self.state_dir / "attach-failures.json"

    @property
    def build_locks(self) -> BuildLocks:
        return BuildLocks(self.state_dir / "builds")


class AttachHealth:
    """Counts attach failures on this worker across builds (a small state file, under the host lock).

    One failure is the cloud's problem (exit 3); `broken_after` in a row are this host's (exit 4).
    """

    def __init__(self, ctx: Ec2Context):
        self.ctx = ctx

    def _read(self) -> int:
        try:
            data = json.loads(self.ctx.health_file.read_text())
            return int(data.get("failures", 0)) if isinstance(data, dict) else 0
        except (OSError, ValueError, TypeError):
            return 0

    def _write(self, failures: int) -> None:
        self.ctx.state_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.ctx.state_dir, delete=False) as tmp:
            json.dump({"failures": failures, "worker": self.ctx.identity.instance_id}, tmp)
        os.replace(tmp.name, self.ctx.health_file)

    def failures(self) -> int:
        return self._read()

    def succeeded(self) -> None:
        with host_lock(self.ctx.lock_file):
            if self._read():
                self._write(0)

    def failed(self, error: InfraError) -> InfraError | HostBroken:
        """Record a failure; the error to raise (HostBroken once the count reaches the limit)."""
        with host_lock(self.ctx.lock_file):
            count = self._read() + 1
            self._write(count)
        if count >= self.ctx.limits.broken_after:
            return HostBroken(
                f"{count} volume attach failures in a row on worker {self.ctx.identity.instance_id} "
                f"(last: {error}); take this host out of service"
            )
        return error


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
        self._wiped = False
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
        result = self.ctx.api.call("describe_volumes", VolumeIds=[self._id], missing_ok=NOT_FOUND)
        volumes = (result or {}).get("Volumes", [])
        return volumes[0] if volumes else None

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

    def create(self) -> None:
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
        def probe() -> dict[str, Any] | None:
            result = self.ctx.api.call(
                "describe_volumes", VolumeIds=[self.volume_id], eventual=("InvalidVolume.NotFound",)
            )
            info: dict[str, Any] = (result or {}).get("Volumes", [{}])[0]
            state = info.get("State")
            if state == "error":
                raise InfraError(f"EBS volume {self._id} went into state 'error'")
            return info if state == want and self._attachment(info) is None else None

        return wait_for(
            probe,
            what=f"EBS volume {self._id} to be {want}",
            timeout=timeout,
            interval=self.ctx.limits.poll,
            max_interval=self.ctx.limits.poll_max,
        )

    def delete(self) -> None:
        if self._id is None or not self.owned:
            return
        self._ready()
        self.ctx.api.call("delete_volume", VolumeId=self._id, missing_ok=NOT_FOUND)
        log.info("volume deleted", volume=self._id)

    # - attach / detach -

    def attach(self, host: str | None = None) -> Path | None:
        target = host or self.ctx.identity.instance_id
        here = target == self.ctx.identity.instance_id
        with bound(volume=self.volume_id, attach_to=target):
            try:
                if not self._prepare_attach(target):
                    self._attach_with_flip(target, attempts=2)
            except InfraError as exc:
                if here and not (isinstance(exc, Ec2Error) and exc.code in CAPACITY):
                    raise AttachHealth(self.ctx).failed(
                        InfraError(f"attaching EBS volume {self._id} to this worker failed: {exc}")
                    ) from exc
                raise
            if not here:
                return None
            node = self._local_node()
            AttachHealth(self.ctx).succeeded()
            if not self.owned and not self._wiped:
                self.wipe(node)
            return node

    def _prepare_attach(self, target: str) -> bool:
        """Make the volume attachable to `target`; True when it is attached there already."""
        self._ready()
        info = self.describe()
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

    def _request_attach(self, target: str) -> None:
        # under the host lock: the name is taken in EC2's view before the next slot picks one
        with host_lock(self.ctx.lock_file):
            name = pick_device_name(self._names_in_use(target))
            self.ctx.api.must(
                "attach_volume",
                VolumeId=self.volume_id,
                InstanceId=target,
                Device=name,
                eventual=("IncorrectState", "InvalidVolume.NotFound", "InvalidInstanceID.NotFound"),
            )
        self._device_name = name
        self._attach_requested = time.monotonic()
        log.info("volume attaching", volume=self._id, device_name=name, attach_to=target)

    def _wait_attached(self, target: str) -> bool:
        """Wait for the requested attachment: True attached, False flipped back to available."""
        limits = self.ctx.limits
        started = self._attach_requested
        seen = False

        def probe() -> str | None:
            nonlocal seen
            info = self.describe()
            if info is None:
                raise InfraError(f"EBS volume {self._id} vanished while attaching")
            att = self._attachment(info)
            if att is not None and att.get("InstanceId") == target:
                seen = True
                return "attached" if att["State"] == "attached" else None
            if info.get("State") == "available" and (seen or time.monotonic() - started >= limits.flip_grace):
                return "flipped"
            return None

        outcome = wait_for(
            probe,
            what=f"EBS volume {self._id} to attach to {target}",
            timeout=limits.attach,
            interval=limits.poll,
            max_interval=limits.poll_max,
        )
        return outcome == "attached"

    def _names_in_use(self, instance_id: str) -> set[str]:
        """Device names taken on an instance: its block device mappings and attachments in progress."""
        used: set[str] = set()
        reservations = self.ctx.api.must(
            "describe_instances", InstanceIds=[instance_id], eventual=("InvalidInstanceID.NotFound",)
        ).get("Reservations", [])
        for reservation in reservations:
            for instance in reservation.get("Instances", []):
                used.add(str(instance.get("RootDeviceName", "")))
                used.update(str(m.get("DeviceName")) for m in instance.get("BlockDeviceMappings", []))
        volumes = self.ctx.api.must(
            "describe_volumes", Filters=[{"Name": "attachment.instance-id", "Values": [instance_id]}]
        ).get("Volumes", [])
        for vol in volumes:
            used.update(
                str(a.get("Device")) for a in vol.get("Attachments", []) if a.get("InstanceId") == instance_id
            )
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
            )
        except DeadlineExceeded as exc:
            raise AttachHealth(self.ctx).failed(InfraError(str(exc))) from exc
        log.info("volume attached here", device=str(node), device_name=self._device_name)
        return node

    def detach(self) -> None:
        if self._request_detach(force=False):
            self._wait_detached()

    def _request_detach(self, *, force: bool) -> bool:
        """Ask EC2 to detach; False when the volume is attached nowhere."""
        att = self._attachment(self.describe())
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
        log.info("volume detaching", volume=self._id, detach_from=att.get("InstanceId"), force=force)
        return True

    def _wait_detached(self) -> None:
        """Wait until available; a detach stuck past its deadline is forced once."""
        with bound(volume=self.volume_id):
            try:
                self._wait_state("available", self.ctx.limits.detach)
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
        self._wiped = True

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
            att = self._attachment(self.describe())
            if att is not None and att.get("InstanceId") == self.ctx.identity.instance_id:
                node = resolve_device(self.volume_id, att.get("Device"), self.ctx.paths)
                if node is not None:
                    self.wipe(node)
        super().release()


def attach_all(
    volumes: Sequence[EbsVolume], host: str, *, meanwhile: Callable[[], object] | None = None
) -> None:
    """Attach volumes to another machine (the builder): every request first, then the waits, so
    the attachments progress together; `meanwhile` runs between the requests and the waits (a
    pool builder is started while its volumes attach: its boot hook waits for them anyway).
    A volume that flips back gets one more attach of its own."""
    requested: list[EbsVolume] = []
    for volume in volumes:
        with bound(volume=volume.volume_id, attach_to=host):
            if not volume._prepare_attach(host):
                volume._request_attach(host)
                requested.append(volume)
    if meanwhile is not None:
        meanwhile()
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


# --- console ------------------------------------------------------------------------------------

CONSOLE_KEEP = 256 * 1024


class ConsoleTail:
    """Turns EC2's repeated console snapshots (the last ~64 KiB each time) into the new bytes only."""

    def __init__(self) -> None:
        self._seen = b""

    def feed(self, snapshot: bytes) -> bytes:
        if not snapshot:
            return b""
        if not self._seen:
            new = snapshot
        elif snapshot.startswith(self._seen):
            new = snapshot[len(self._seen) :]
        else:
            new = snapshot[self._overlap(snapshot) :]
        self._seen = (self._seen + new)[-CONSOLE_KEEP:]
        return new

    def _overlap(self, snapshot: bytes) -> int:
        """Length of the longest prefix of `snapshot` that is a suffix of what we saw (0: a gap)."""
        anchor = self._seen[-min(len(self._seen), 512) :]
        best = 0
        start = snapshot.find(anchor)
        while start != -1:
            end = start + len(anchor)
            if self._seen.endswith(snapshot[:end]):
                best = end
            start = snapshot.find(anchor, start + 1)
        return best


def decode_console(output: str | None) -> bytes:
    """The console text as bytes. botocore already base64-decoded `Output` (its after-call handler
    `decode_console_output`, undecodable bytes replaced), so this must not decode again."""
    if not output:
        return b""
    return output.encode("utf-8", errors="replace")


# --- the builder's boot hook (user-data) -------------------------------------------------------

HOOK_MARKER = "# cloudbuild-builder-hook v1"


def user_data(*, build_id: str, root: str, swap: str, device_timeout: int = 300) -> str:
    """The boot hook shipped as user-data (see docs/ec2.md for the contract with the builder AMI).

    It finds the volumes by id through udev's NVMe links (never by device name), runs the guest
    agent, which writes BUILDSTATUS and the manifest to swap and powers the builder off. Only ids
    go in; nothing from the build itself (the recipe travels on the root volume).
    """
    for value in (build_id, root, swap):
        if not value.replace("-", "").replace("_", "").isalnum():
            raise UsageError(f"refusing to put {value!r} into the builder boot hook")
    return f"""#!/bin/sh
{HOOK_MARKER}
# build {build_id}: run the cloudbuild guest agent on root {root}, swap {swap}, then power off.
set -u
by_id=/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_
root="$by_id{serial_of(root)}"
swap="$by_id{serial_of(swap)}"
i=0
while [ ! -e "$root" ] || [ ! -e "$swap" ]; do
    i=$((i + 1))
    if [ "$i" -gt {device_timeout} ]; then
        echo "cloudbuild: volumes {root} {swap} did not appear" >/dev/console
        poweroff -f
    fi
    sleep 1
done
exec python3 -m cloudbuild.guest.agent --root "$(readlink -f "$root")" --swap "$(readlink -f "$swap")"
"""


# --- the backend --------------------------------------------------------------------------------

INSTANCE_ORDER = 10
IMAGE_ORDER = 20
VOLUME_ORDER = 30
SNAPSHOT_ORDER = 40


@register
class Ec2Backend(Backend):
    """One build slot on an EC2 worker. Injectable for tests: api, identity, host paths, state dir, limits."""

    name = "ec2"
    channel = "swap"

    def __init__(
        self,
        options: VmOptions,
        *,
        api: Ec2Api | None = None,
        identity: WorkerIdentity | None = None,
        paths: HostPaths | None = None,
        state_dir: Path | None = None,
        limits: Ec2Limits | None = None,
    ):
        super().__init__(options)
        self._api = api
        self._identity = identity
        self._paths = paths or HostPaths()
        self._state_dir = state_dir or state_dir_from_env()
        self._limits = limits or Ec2Limits()
        self._ctx: Ec2Context | None = None
        self.builder: str | None = None  # instance id of the current builder
        self._builder_from_pool = False
        self._builder_lost = False
        self._slot: BuildSlot | None = None
        self._build_lock: int | None = None
        self.pair: VolumePair | None = None

    @property
    def ctx(self) -> Ec2Context:
        if self._ctx is None:
            identity = self._identity or Imds().identity()
            api = self._api or Ec2Api(client(identity.region))
            self._ctx = Ec2Context(api, identity, self._paths, self._state_dir, self._limits)
        return self._ctx

    @property
    def api(self) -> Ec2Api:
        return self.ctx.api

    # - verify / volumes -

    def verify(self) -> None:
        o = self.options
        if not o.ec2_builder_ami:
            raise UsageError(
                "--vm-type ec2 needs --ec2-builder-ami AMI (an image with the boot hook, see docs/ec2.md)"
            )
        if o.vm_volume_root and not o.vm_volume_swap:
            raise UsageError("--vm-volumes: give both ROOT and SWAP volume ids")
        ctx = self.ctx  # IMDS: fails here, before anything is created, when this is no EC2 worker
        if o.ec2_subnet:
            subnets = self.api.must("describe_subnets", SubnetIds=[o.ec2_subnet]).get("Subnets", [])
            zone = subnets[0].get("AvailabilityZone") if subnets else None
            if zone != ctx.identity.availability_zone:
                raise UsageError(
                    f"--ec2-subnet {o.ec2_subnet} is in {zone}, this worker in {ctx.identity.availability_zone}: "
                    "builders must run in the zone of the volumes"
                )
        log.info(
            "ec2 worker",
            worker=ctx.identity.instance_id,
            zone=ctx.identity.availability_zone,
            region=ctx.identity.region,
        )

    def _tags(self, slot: BuildSlot, role: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return build_tags(
            owner=self.ctx.identity.instance_id,
            build=slot.build_id,
            slot=slot.slot,
            expires=lease_expiry(self.options.build_timeout),
            role=role,
            extra=extra,
        )

    def volumes(self, slot: BuildSlot) -> VolumePair:
        o = self.options
        self._slot = slot
        if self._build_lock is None:
            # held until cleanup(): `cloudbuild gc` on this worker sweeps a build whose process died
            self._build_lock = self.ctx.build_locks.acquire(slot.build_id)
        if o.vm_volume_root:
            self.pair = VolumePair(
                EbsVolume(self.ctx, Role.ROOT, o.disk_size, volume_id=o.vm_volume_root, owned=False),
                EbsVolume(self.ctx, Role.SWAP, o.swap_size, volume_id=o.vm_volume_swap, owned=False),
            )
            return self.pair
        created = [
            EbsVolume(
                self.ctx,
                role,
                size,
                tags=self._tags(slot, role.value),
                client_token=f"cloudbuild-{slot.build_id}-{role.value}",
            )
            for role, size in ((Role.ROOT, o.disk_size), (Role.SWAP, o.swap_size))
        ]
        created[0].partner, created[1].partner = created[1], created[0]
        self.pair = VolumePair(created[0], created[1])
        return self.pair

    @property
    def guest_swap_device(self) -> str | None:
        """VM_SWAP in build.data: the swap as the builder's udev names it (by EBS volume id)."""
        if self.pair is None or self.pair.swap is None or self.pair.swap.id.startswith("<"):
            return None
        return f"/dev/disk/by-id/{BY_ID_PREFIX}{serial_of(self.pair.swap.id)}"

    # - the builder -

    def _describe_builder(self) -> dict[str, Any] | None:
        if self.builder is None:
            return None
        result = self.api.call("describe_instances", InstanceIds=[self.builder], missing_ok=NOT_FOUND)
        for reservation in (result or {}).get("Reservations", []):
            for instance in reservation.get("Instances", []):
                return dict(instance)
        return None

    def _builder_state(self) -> str:
        info = self._describe_builder()
        return str(info["State"]["Name"]) if info else "vanished"

    def _wait_builder(self, states: Collection[str], timeout: float, what: str) -> str:
        def probe() -> str | None:
            state = self._builder_state()
            if state in states:
                return state
            if state in ("terminated", "vanished", "shutting-down") and state not in states:
                return state
            return None

        return wait_for(
            probe,
            what=what,
            timeout=timeout,
            interval=self.ctx.limits.poll,
            max_interval=self.ctx.limits.poll_max,
        )

    def _claim_from_pool(self, slot: BuildSlot, hook: str) -> str | None:
        """A stopped builder of this worker's pool, claimed for this build under the host lock."""
        if self.options.ec2_pool <= 0:
            return None
        owner = self.ctx.identity.instance_id
        with host_lock(self.ctx.lock_file):
            result = self.api.must(
                "describe_instances",
                Filters=[
                    {"Name": f"tag:{TAG_POOL}", "Values": [owner]},
                    {"Name": "instance-state-name", "Values": ["stopped"]},
                    {"Name": "image-id", "Values": [str(self.options.ec2_builder_ami)]},
                ],
            )
            free = [
                i
                for r in result.get("Reservations", [])
                for i in r.get("Instances", [])
                if not tag_dict(i.get("Tags")).get(TAG_BUILD)
            ]
            if not free:
                return None
            instance_id = str(sorted(free, key=lambda i: str(i["InstanceId"]))[0]["InstanceId"])
            self.api.must("create_tags", Resources=[instance_id], Tags=ec2_tags(self._tags(slot, "builder")))
        # unlike RunInstances, ModifyInstanceAttribute wants the user data base64-encoded by the caller
        self.api.must(
            "modify_instance_attribute",
            InstanceId=instance_id,
            UserData={"Value": base64.b64encode(hook.encode())},
        )
        log.info("builder claimed from the pool", builder=instance_id)
        return instance_id

    def _launch(self, slot: BuildSlot, hook: str) -> str:
        o = self.options
        extra = {TAG_POOL: self.ctx.identity.instance_id} if o.ec2_pool > 0 else None
        params: dict[str, Any] = {
            "ImageId": o.ec2_builder_ami,
            "InstanceType": o.ec2_instance_type or "t3.medium",
            "MinCount": 1,
            "MaxCount": 1,
            "UserData": hook,
            "Placement": {"AvailabilityZone": self.ctx.identity.availability_zone},
            # the guest powers off when done: stop, so we can detach and read the volumes
            "InstanceInitiatedShutdownBehavior": "stop",
            "MetadataOptions": {"HttpTokens": "required"},
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": ec2_tags(self._tags(slot, "builder", extra))}
            ],
            "ClientToken": f"cloudbuild-{slot.build_id}-builder",
        }
        if o.ec2_subnet:
            params["SubnetId"] = o.ec2_subnet
        if o.ec2_security_group:
            params["SecurityGroupIds"] = [o.ec2_security_group]
        result = self.api.must("run_instances", **params)
        instance_id = str(result["Instances"][0]["InstanceId"])
        log.info("builder launched", builder=instance_id, instance_type=params["InstanceType"])
        return instance_id

    def boot_and_wait(
        self, pair: VolumePair, slot: BuildSlot, *, timeout: float | None, console: Console
    ) -> BootResult:
        if pair.swap is None:
            raise InfraError("--vm-type ec2 needs a swap volume for status and results")
        root, swap = pair.root, pair.swap
        if not isinstance(root, EbsVolume) or not isinstance(swap, EbsVolume):
            raise InfraError("--vm-type ec2 runs builds on EBS volumes only")
        hook = user_data(build_id=slot.build_id, root=root.id, swap=swap.id)
        started = time.monotonic()
        builder = self._claim_from_pool(slot, hook)
        self._builder_from_pool = builder is not None
        if builder is None:
            builder = self._launch(slot, hook)
        self.builder = builder
        with bound(builder=builder, pool=self._builder_from_pool):
            if self._builder_from_pool:
                # stopped: ask for the attachments, start, then wait for them; the hook finds the
                # volumes by id when they appear
                attach_all(
                    [root, swap],
                    builder,
                    meanwhile=lambda: self.api.must(
                        "start_instances", InstanceIds=[builder], eventual=("IncorrectState",)
                    ),
                )
            else:
                # a new instance boots at once; attach as soon as EC2 accepts it (pending -> running),
                # the hook waits for the volumes to appear
                state = self._wait_builder(
                    ("running", "stopped"), self.ctx.limits.running, "the builder to run"
                )
                if state not in ("running", "stopped"):
                    return self._lost(state)
                attach_all([root, swap], builder)
            log.info("builder started", seconds=round(time.monotonic() - started, 3))
            remaining = None if timeout is None else max(1.0, timeout - (time.monotonic() - started))
            result = self._stream_until_stopped(console, remaining)
            if result is not None:
                return result
            detach_all([root, swap])
            return BootResult(ExitReason.POWERED_OFF)

    def _lost(self, state: str) -> BootResult:
        self._builder_lost = True
        log.error("builder vanished", state=state)
        return BootResult(ExitReason.CRASHED, detail=f"builder instance {self.builder} {state} unexpectedly")

    def _stream_until_stopped(self, console: Console, timeout: float | None) -> BootResult | None:
        """Copy new console output to `console` until the builder stops; a BootResult when it did not."""
        tail = ConsoleTail()
        latest = [True]

        def pump() -> None:
            params: dict[str, Any] = {"InstanceId": self.builder}
            if latest[0]:
                params["Latest"] = True
            try:
                result = self.api.call("get_console_output", **params, missing_ok=NOT_FOUND)
            except Ec2Error as exc:
                if latest[0] and exc.code in (
                    "UnsupportedOperation",
                    "InvalidParameterValue",
                    "InvalidParameter",
                ):
                    latest[0] = False  # Xen instances: only the buffered output
                    return
                raise
            new = tail.feed(decode_console((result or {}).get("Output")))
            if new:
                console.write(new)

        def probe() -> str | None:
            pump()
            state = self._builder_state()
            return state if state in ("stopped", "terminated", "shutting-down", "vanished") else None

        try:
            state = wait_for(
                probe,
                what=f"builder {self.builder} to power off",
                timeout=timeout if timeout is not None else float("inf"),
                interval=self.ctx.limits.poll,
                max_interval=self.ctx.limits.console_poll_max,
            )
        except DeadlineExceeded:
            log.error("build timed out, stopping the builder", timeout=timeout)
            self.kill()
            return BootResult(ExitReason.TIMEOUT, detail=f"no power-off within {timeout:g}s")
        if state != "stopped":
            return self._lost(state)
        pump()
        return None

    def kill(self) -> None:
        if self.builder is None:
            return
        if self._builder_from_pool or self.options.ec2_pool > 0:
            self.api.call("stop_instances", InstanceIds=[self.builder], Force=True, missing_ok=NOT_FOUND)
        else:
            self.api.call("terminate_instances", InstanceIds=[self.builder], missing_ok=NOT_FOUND)
        log.info("builder killed", builder=self.builder)

    def cleanup(self) -> None:
        """Terminate the builder, or stop it and hand it back to the pool; idempotent."""
        try:
            self._release_builder()
        finally:
            if self._build_lock is not None and self._slot is not None:
                self.ctx.build_locks.release(self._slot.build_id, self._build_lock)
                self._build_lock = None

    def _release_builder(self) -> None:
        if self.builder is None:
            return
        builder = self.builder
        with bound(builder=builder):
            state = self._builder_state()
            if state == "vanished":
                self.builder = None
                return
            keep = (
                self.options.ec2_pool > 0
                and not self._builder_lost
                and state in ("stopped", "stopping", "running")
            )
            if keep:
                try:
                    keep = self._return_to_pool(builder, state)
                except InfraError as exc:
                    log.warning("could not return the builder to the pool, terminating it", error=str(exc))
                    keep = False
            if not keep:
                # no wait for "terminated": the volumes were taken back already, and a builder
                # stuck in shutting-down is still swept by gc (its tags stay)
                self.api.call("terminate_instances", InstanceIds=[builder], missing_ok=NOT_FOUND)
                log.info("builder terminating")
            self.builder = None

    def _return_to_pool(self, builder: str, state: str) -> bool:
        if state != "stopped":
            self.api.must("stop_instances", InstanceIds=[builder])
            if self._wait_builder(("stopped",), self.ctx.limits.stop, "the builder to stop") != "stopped":
                return False
        info = self._describe_builder() or {}
        attached = [
            m
            for m in info.get("BlockDeviceMappings", [])
            if m.get("DeviceName") != info.get("RootDeviceName")
        ]
        if attached:
            log.warning("builder still has volumes attached, not pooling it", count=len(attached))
            return False
        owner = self.ctx.identity.instance_id
        with host_lock(self.ctx.lock_file):
            pooled = self.api.must(
                "describe_instances",
                Filters=[
                    {"Name": f"tag:{TAG_POOL}", "Values": [owner]},
                    {"Name": "instance-state-name", "Values": ["stopped", "stopping", "pending", "running"]},
                ],
            )
            members = [i for r in pooled.get("Reservations", []) for i in r.get("Instances", [])]
            if len(members) > self.options.ec2_pool:
                return False
            self.api.must(
                "create_tags",
                Resources=[builder],
                Tags=ec2_tags(
                    {
                        TAG_POOL: owner,
                        TAG_BUILD: "",
                        TAG_EXPIRES: format_time(lease_expiry(None)),
                    }
                ),
            )
        log.info("builder returned to the pool", pool_size=len(members))
        return True


# --- GC adapter ---------------------------------------------------------------------------------


def _tag_filters() -> Iterator[list[dict[str, Any]]]:
    for key in (TAG_OWNER, TAG_BUILD):
        yield [{"Name": "tag-key", "Values": [key]}]


class Ec2GcAdapter(GcAdapter):
    """Lists, stamps and deletes cloudbuild's EC2 resources; `cloudbuild.cloud.common.sweep` decides."""

    def __init__(
        self,
        api: Ec2Api,
        *,
        limits: Ec2Limits | None = None,
        local_worker: str | None = None,
        state_dir: Path | None = None,
    ):
        self.api = api
        self.limits = limits or Ec2Limits()
        self.local_worker = local_worker  # this host's instance id, when gc runs on a worker
        self.locks = BuildLocks((state_dir or DEFAULT_STATE_DIR) / "builds")

    def build_alive(self, resource: Resource) -> bool | None:
        """On the owner itself, a build lives while its process holds its lock; elsewhere: unknown."""
        build = resource.tags.get(TAG_BUILD)
        if not build or self.local_worker is None or resource.owner != self.local_worker:
            return None
        return self.locks.alive(build)

    def list_resources(self) -> Iterable[Resource]:
        found: dict[str, Resource] = {}

        def add(kind: str, rid: str, tags: Iterable[Mapping[str, str]] | None, order: int) -> None:
            tagmap = tag_dict(tags)
            if is_cloudbuild_tagged(tagmap):
                found[rid] = Resource(kind, rid, tagmap, order)

        for filters in _tag_filters():
            for page in self._pages("describe_instances", "Reservations", Filters=filters):
                for instance in page.get("Instances", []):
                    if instance["State"]["Name"] != "terminated":
                        add("instance", instance["InstanceId"], instance.get("Tags"), INSTANCE_ORDER)
            for image in self._pages("describe_images", "Images", Owners=["self"], Filters=filters):
                add("image", image["ImageId"], image.get("Tags"), IMAGE_ORDER)
            for volume in self._pages("describe_volumes", "Volumes", Filters=filters):
                add("volume", volume["VolumeId"], volume.get("Tags"), VOLUME_ORDER)
            for snap in self._pages("describe_snapshots", "Snapshots", OwnerIds=["self"], Filters=filters):
                add("snapshot", snap["SnapshotId"], snap.get("Tags"), SNAPSHOT_ORDER)
        return list(found.values())

    def _pages(self, op: str, key: str, **params: Any) -> Iterator[dict[str, Any]]:
        token: str | None = None
        while True:
            call_params = dict(params, **({"NextToken": token} if token else {}))
            result = self.api.must(op, **call_params)
            yield from result.get(key, [])
            token = result.get("NextToken")
            if not token:
                return

    def owner_alive(self, owner: str) -> bool:
        result = self.api.call(
            "describe_instances", InstanceIds=[owner], missing_ok=NOT_FOUND | {"InvalidInstanceID.Malformed"}
        )
        for reservation in (result or {}).get("Reservations", []):
            for instance in reservation.get("Instances", []):
                return str(instance["State"]["Name"]) not in ("terminated", "shutting-down")
        return False

    def tag_seen(self, resource: Resource, when: Any) -> None:
        if when is None:
            self.api.must("delete_tags", Resources=[resource.id], Tags=[{"Key": TAG_GC_SEEN}])
        else:
            self.api.must(
                "create_tags",
                Resources=[resource.id],
                Tags=[{"Key": TAG_GC_SEEN, "Value": format_time(when)}],
            )

    def delete_resource(self, resource: Resource) -> None:
        if resource.kind == "instance":
            self.api.call("terminate_instances", InstanceIds=[resource.id], missing_ok=NOT_FOUND)
            self._wait(lambda: self._instance_gone(resource.id), f"instance {resource.id} to terminate")
        elif resource.kind == "image":
            self.api.call("deregister_image", ImageId=resource.id, missing_ok=NOT_FOUND)
        elif resource.kind == "snapshot":
            self.api.call("delete_snapshot", SnapshotId=resource.id, missing_ok=NOT_FOUND)
        elif resource.kind == "volume":
            result = self.api.call("describe_volumes", VolumeIds=[resource.id], missing_ok=NOT_FOUND)
            volumes = (result or {}).get("Volumes", [])
            for att in volumes[0].get("Attachments", []) if volumes else []:
                self.api.call(
                    "detach_volume",
                    VolumeId=resource.id,
                    InstanceId=att["InstanceId"],
                    Force=True,
                    missing_ok=("IncorrectState", "InvalidAttachment.NotFound"),
                )
            if volumes and volumes[0].get("Attachments"):
                self._wait(lambda: self._volume_available(resource.id), f"volume {resource.id} to detach")
            self.api.call("delete_volume", VolumeId=resource.id, missing_ok=NOT_FOUND)
        else:
            raise InfraError(f"gc: unknown EC2 resource kind {resource.kind!r}")

    def _wait(self, probe: Callable[[], bool], what: str) -> None:
        wait_for(
            probe,
            what=what,
            timeout=self.limits.terminate,
            interval=self.limits.poll,
            max_interval=self.limits.poll_max,
        )

    def _instance_gone(self, instance_id: str) -> bool:
        return not self.owner_alive(instance_id) and self._instance_state(instance_id) in ("terminated", None)

    def _instance_state(self, instance_id: str) -> str | None:
        result = self.api.call("describe_instances", InstanceIds=[instance_id], missing_ok=NOT_FOUND)
        for reservation in (result or {}).get("Reservations", []):
            for instance in reservation.get("Instances", []):
                return str(instance["State"]["Name"])
        return None

    def _volume_available(self, volume_id: str) -> bool:
        result = self.api.call("describe_volumes", VolumeIds=[volume_id], missing_ok=NOT_FOUND)
        volumes = (result or {}).get("Volumes", [])
        return not volumes or (volumes[0].get("State") == "available" and not volumes[0].get("Attachments"))


def state_dir_from_env() -> Path:
    return Path(os.environ.get("CLOUDBUILD_EC2_STATE_DIR") or DEFAULT_STATE_DIR)


def gc_adapter() -> GcAdapter:
    """The adapter `cloudbuild gc --vm-type ec2` uses.

    On a worker, IMDS names this host, so the sweep also finds builds whose process died here;
    elsewhere (an admin box) the region comes from botocore's settings and only dead owners and
    expired leases count.
    """
    region = botocore.session.get_session().get_config_variable("region")
    identity: WorkerIdentity | None = None
    try:
        identity = Imds().identity()
    except InfraError as exc:
        if not region:
            raise InfraError(f"gc: no region configured and no instance metadata ({exc})") from exc
        log.info("gc runs off EC2 (no instance metadata): dead owners and expired leases only")
    region = region or (identity.region if identity else None)
    return Ec2GcAdapter(
        Ec2Api(client(str(region))),
        local_worker=identity.instance_id if identity else None,
        state_dir=state_dir_from_env(),
    )
