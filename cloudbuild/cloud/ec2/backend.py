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
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from cloudbuild.backend import BootResult, BuildSlot, Console, ExitReason, register
from cloudbuild.cloud.base import BuilderState, CloudBackend, RunningElsewhere, host_lock, mark_swap_killed
from cloudbuild.cloud.common import (
    TAG_POOL,
    build_tags,
    format_time,
    lease_expiry,
)
from cloudbuild.cloud.ec2.api import (
    NOT_FOUND,
    Ec2Api,
    Ec2Context,
    Ec2Error,
    Ec2Limits,
    client,
    ec2_tags,
    tag_dict,
)
from cloudbuild.cloud.ec2.builder import user_data
from cloudbuild.cloud.ec2.console import ConsoleTail, decode_console
from cloudbuild.cloud.ec2.devices import (
    BY_ID_PREFIX,
    HostPaths,
    serial_of,
)
from cloudbuild.cloud.ec2.identity import Imds, WorkerIdentity
from cloudbuild.cloud.ec2.volume import EbsVolume, attach_all, detach_all
from cloudbuild.errors import DeadlineExceeded, InfraError, UsageError
from cloudbuild.log import bound, get_logger
from cloudbuild.options import VmOptions
from cloudbuild.retry import wait_for
from cloudbuild.volume import TAG_BUILD, TAG_EXPIRES, TAG_OWNER, Role, VolumePair
from cloudbuild.watchdog import Watchdog, watchdog_timeout

log = get_logger(__name__)

# A pooled builder ran earlier builds as root on its own disk, so it is reused only by builds of
# the same trust domain, at most --ec2-pool-max-uses times, and only after a clean build.
TAG_TRUST = "cloudbuild:trust-domain"
TAG_USES = "cloudbuild:uses"
REUSABLE_STATUS = (0, 2)


def pool_uses(tags: Mapping[str, str]) -> int:
    """Builds a pooled builder has served; an unreadable count counts as used up."""
    text = tags.get(TAG_USES, "")
    return int(text) if text.isdigit() else 1 << 30


# --- the backend --------------------------------------------------------------------------------


@register
class Ec2Backend(CloudBackend):
    """One build slot on an EC2 worker. Injectable for tests: api, identity, host paths, state dir, limits."""

    name = "ec2"
    cloud = "ec2"
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
        super().__init__(options, state_dir=state_dir)
        self._api = api
        self._identity = identity
        self._paths = paths or HostPaths()
        self._limits = limits or Ec2Limits()
        self._ctx: Ec2Context | None = None
        self.builder: str | None = None  # instance id of the current builder
        self._builder_from_pool = False
        self._uses = 0  # builds this builder served, this one included
        self._clean = False  # the build's status said ok/unchanged: the builder may be pooled
        self._nonce = uuid.uuid4().hex[:12]

    @property
    def ctx(self) -> Ec2Context:
        if self._ctx is None:
            identity = self._identity or Imds().identity()
            api = self._api or Ec2Api(client(identity.region))
            self._ctx = Ec2Context(api, identity, self._paths, self.state_dir, self._limits)
        return self._ctx

    @property
    def worker_id(self) -> str:
        return self.ctx.identity.instance_id

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
        if not self.acquire_build_lock(slot):
            self.pair = VolumePair(RunningElsewhere(Role.ROOT, slot.build_id))
            return self.pair
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
                client_token=f"cloudbuild-{self._nonce}-{role.value}",
            )
            for role, size in ((Role.ROOT, o.disk_size), (Role.SWAP, o.swap_size))
        ]
        created[0].partner, created[1].partner = created[1], created[0]
        self.pair = VolumePair(created[0], created[1])
        return self.pair

    @property
    def guest_swap_device(self) -> str | None:
        """VM_SWAP in build.data: the swap as the builder's udev names it (by EBS volume id)."""
        if self.pair is None or self.pair.swap is None or self.running_elsewhere is not None:
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

    def _instance_state(self) -> str:
        info = self._describe_builder()
        return str(info["State"]["Name"]) if info else "vanished"

    def _wait_builder(
        self,
        states: Collection[str],
        timeout: float,
        what: str,
        *,
        give_up: Collection[str] = ("terminated", "vanished", "shutting-down"),
    ) -> str:
        """Wait until the builder is in one of `states`; a state in `give_up` ends the wait too."""

        def probe() -> str | None:
            state = self._instance_state()
            return state if state in states or state in give_up else None

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
                if not (tags := tag_dict(i.get("Tags"))).get(TAG_BUILD)
                and tags.get(TAG_TRUST, "") == self.options.trust_domain
                and pool_uses(tags) < self.options.ec2_pool_max_uses
            ]
            if not free:
                return None
            chosen = sorted(free, key=lambda i: str(i["InstanceId"]))[0]
            instance_id = str(chosen["InstanceId"])
            self._uses = pool_uses(tag_dict(chosen.get("Tags"))) + 1
            extra = {TAG_USES: str(self._uses)}
            self.api.must(
                "create_tags", Resources=[instance_id], Tags=ec2_tags(self._tags(slot, "builder", extra))
            )
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
        self._uses = 1
        extra = (
            {TAG_POOL: self.ctx.identity.instance_id, TAG_TRUST: o.trust_domain, TAG_USES: "1"}
            if o.ec2_pool > 0
            else None
        )
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
            # idempotent across retries of this call, not across builds that reuse a build id
            "ClientToken": f"cloudbuild-{self._nonce}-builder",  # at most 64 characters
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
        started = time.monotonic()
        if self.builder is None:  # not started early by fixup()
            self._start_builder(slot, root, swap)
        builder = self.builder
        assert builder is not None
        with bound(builder=builder, pool=self._builder_from_pool):
            # attach as soon as EC2 accepts it (pending -> running); the boot hook waits for the
            # volumes to appear
            state = self._wait_builder(
                ("running",),
                self.ctx.limits.running,
                f"builder {builder} to run",
                # stopped already: its boot hook gave up waiting for the volumes
                give_up=("stopped", "terminated", "vanished", "shutting-down"),
            )
            if state != "running":
                return self._lost(state)
            attach_all([root, swap], builder)
            self.builder_state = BuilderState.RUNNING
            log.info("builder started", seconds=round(time.monotonic() - started, 3))
            remaining = None if timeout is None else max(1.0, timeout - (time.monotonic() - started))
            watchdog = Watchdog(
                console, timeout=watchdog_timeout() if self.options.watchdog else None, on_fire=self.kill
            )
            watchdog.open()
            try:
                result = self._stream_until_stopped(watchdog, remaining, killed=lambda: self.killed(slot))
            finally:
                watchdog.close()
            if watchdog.fired:
                return BootResult(
                    ExitReason.WATCHDOG, detail=f"watchdog marker open for {watchdog.timeout:g}s"
                )
            if result is not None and result.reason == ExitReason.KILLED:
                self._mark_killed(swap)
                return result
            if result is not None:
                return result
            self.builder_state = BuilderState.STOPPED
            detach_all([root, swap])
            return BootResult(ExitReason.POWERED_OFF)

    def fixup(self, buildroot: Path) -> None:
        """The root is staged: start the builder now, so that it boots while the host unmounts and
        detaches the root and clears the swap (its boot hook waits for the volumes to appear)."""
        pair = self.pair
        if self.builder is not None or self.slot is None or pair is None or pair.swap is None:
            return
        if isinstance(pair.root, EbsVolume) and isinstance(pair.swap, EbsVolume):
            self._start_builder(self.slot, pair.root, pair.swap)

    def _start_builder(self, slot: BuildSlot, root: EbsVolume, swap: EbsVolume) -> None:
        """Claim a pool builder and start it, or launch a new one; the volumes attach later."""
        hook = user_data(build_id=slot.build_id, root=root.volume_id, swap=swap.volume_id)
        builder = self._claim_from_pool(slot, hook)
        self._builder_from_pool = builder is not None
        if builder is None:
            builder = self._launch(slot, hook)
        self.builder = builder
        self.builder_state = BuilderState.STARTING
        if self._builder_from_pool:
            self.api.must("start_instances", InstanceIds=[builder], eventual=("IncorrectState",))
            log.info("pool builder starting", builder=builder)

    def _lost(self, state: str) -> BootResult:
        self.builder_state = BuilderState.LOST
        log.error("builder vanished", state=state)
        return BootResult(ExitReason.CRASHED, detail=f"builder instance {self.builder} {state} unexpectedly")

    def _stream_until_stopped(
        self, console: Console, timeout: float | None, *, killed: Callable[[], bool]
    ) -> BootResult | None:
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
            state = self._instance_state()
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
        if killed():
            log.info("builder killed by `cloudbuild kill`", state=state)
            return BootResult(ExitReason.KILLED)
        if state != "stopped":
            return self._lost(state)
        pump()
        return None

    def _mark_killed(self, swap: EbsVolume) -> None:
        """A killed build reports "failed" (BUILDSTATUS1 on swap, as obs-build's kill), so nothing
        is extracted: once the builder let go of the swap, mark it here."""
        self._wait_builder(
            ("stopped", "terminated", "vanished"),
            self.ctx.limits.stop,
            f"killed builder {self.builder} to stop",
        )
        self.builder_state = BuilderState.STOPPED
        swap.detach()
        mark_swap_killed(swap)

    def kill(self) -> None:
        if self.builder is None and self.running_elsewhere is not None:
            self._kill_elsewhere(self.running_elsewhere)
            return
        if self.builder is None:
            return
        if self._builder_from_pool or self.options.ec2_pool > 0:
            self.api.call("stop_instances", InstanceIds=[self.builder], Force=True, missing_ok=NOT_FOUND)
        else:
            self.api.call("terminate_instances", InstanceIds=[self.builder], missing_ok=NOT_FOUND)
        log.info("builder killed", builder=self.builder)

    def _kill_elsewhere(self, build_id: str) -> None:
        """`cloudbuild kill`: stop the builder that another process on this worker runs `build_id` on."""
        result = self.api.must(
            "describe_instances",
            Filters=[
                {"Name": f"tag:{TAG_OWNER}", "Values": [self.ctx.identity.instance_id]},
                {"Name": f"tag:{TAG_BUILD}", "Values": [build_id]},
                {"Name": "instance-state-name", "Values": ["pending", "running"]},
            ],
        )
        for reservation in result.get("Reservations", []):
            for instance in reservation.get("Instances", []):
                instance_id = instance["InstanceId"]
                if TAG_POOL in tag_dict(instance.get("Tags")):
                    self.api.call(
                        "stop_instances", InstanceIds=[instance_id], Force=True, missing_ok=NOT_FOUND
                    )
                else:
                    self.api.call("terminate_instances", InstanceIds=[instance_id], missing_ok=NOT_FOUND)
                log.info("builder of a running build killed", builder=instance_id, build=build_id)

    def build_finished(self, status: int) -> None:
        self._clean = status in REUSABLE_STATUS

    def release_builder(self) -> None:
        """Terminate the builder, or stop it and hand it back to the pool; idempotent."""
        if self.builder is None:
            return
        builder = self.builder
        with bound(builder=builder):
            state = self._instance_state()
            if state == "vanished":
                self.builder = None
                self.builder_state = BuilderState.NONE
                return
            keep = (
                self.options.ec2_pool > 0
                and self._clean
                and self._uses < self.options.ec2_pool_max_uses
                and self.builder_state != BuilderState.LOST
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
            self.builder_state = BuilderState.NONE
            self._clean = False

    def _return_to_pool(self, builder: str, state: str) -> bool:
        if state != "stopped":
            self.api.must("stop_instances", InstanceIds=[builder])
            if (
                self._wait_builder(("stopped",), self.ctx.limits.stop, f"builder {builder} to stop")
                != "stopped"
            ):
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
