"""`--vm-type ec2`: EBS volumes as root and swap, a builder instance that runs the build over them.

obs-build's EC2 type snapshots the volumes, registers an AMI per build and runs it. Here the
volumes move instead: the worker creates (or reuses) two EBS volumes in its own availability zone,
attaches the root here so the host steps can mkfs and stage it, hands both to a builder instance
(launched from `--ec2-builder-ami`, or a stopped one from this worker's warm pool), streams the
builder's console until it powers off, and takes the volumes back. No snapshot, no image, no
kernel id, no fixed device name.

This module is the Backend: options, volumes, and the build's phases around the builder; the
builder instance's own life (launch or claim, run, console, release) is `Ec2Builder` in
`builder.py`. The adapter is thin (see ARCHITECTURE.md): every EC2 call goes through `Ec2Api.call`, which retries
throttling and eventual consistency through `cloudbuild.retry` and maps everything else to an exit
code (capacity and quota: 3; bad AMI/subnet/group: 1). Waiting is `retry.wait_for` with a deadline.
The leak sweep is `cloudbuild.cloud.common.sweep`; `Ec2GcAdapter` only lists, stamps and deletes.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from cloudbuild.backend import BootResult, BuildSlot, Console, ExitReason, register
from cloudbuild.cloud.base import BuilderState, CloudBackend, RunningElsewhere, mark_swap_killed
from cloudbuild.cloud.ec2.api import Ec2Api, Ec2Context, Ec2Limits, client
from cloudbuild.cloud.ec2.builder import Ec2Builder, instance_tags, kill_builders_of
from cloudbuild.cloud.ec2.devices import BY_ID_PREFIX, HostPaths, serial_of
from cloudbuild.cloud.ec2.identity import Imds, WorkerIdentity
from cloudbuild.cloud.ec2.volume import EbsVolume, detach_all
from cloudbuild.errors import InfraError, UsageError
from cloudbuild.log import bound, get_logger
from cloudbuild.options import VmOptions
from cloudbuild.volume import Role, VolumePair
from cloudbuild.watchdog import Watchdog, watchdog_timeout

log = get_logger(__name__)


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
        self._builder: Ec2Builder | None = None  # before super(): it sets builder_state
        super().__init__(options, state_dir=state_dir)
        self._api = api
        self._identity = identity
        self._paths = paths or HostPaths()
        self._limits = limits or Ec2Limits()
        self._ctx: Ec2Context | None = None
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

    @property
    def builder(self) -> Ec2Builder:
        if self._builder is None:
            self._builder = Ec2Builder(self.ctx, self.options, nonce=self._nonce)
        return self._builder

    @property  # the builder's own state, not a copy of it
    def builder_state(self) -> BuilderState:
        return self._builder.state if self._builder is not None else BuilderState.NONE

    @builder_state.setter
    def builder_state(self, value: BuilderState) -> None:
        if self._builder is not None:
            self._builder.state = value

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
                tags=instance_tags(self.ctx, o, slot, role.value),
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

    # - the builder (its life is Ec2Builder's) -

    def boot_and_wait(
        self, pair: VolumePair, slot: BuildSlot, *, timeout: float | None, console: Console
    ) -> BootResult:
        if pair.swap is None:
            raise InfraError("--vm-type ec2 needs a swap volume for status and results")
        root, swap = pair.root, pair.swap
        if not isinstance(root, EbsVolume) or not isinstance(swap, EbsVolume):
            raise InfraError("--vm-type ec2 runs builds on EBS volumes only")
        started = time.monotonic()
        builder = self.builder
        if builder.id is None:  # not started early by fixup()
            builder.start(slot, root, swap)
        with bound(builder=builder.id, pool=builder.from_pool):
            # attach as soon as EC2 accepts it (pending -> running); the boot hook waits for the volumes
            never_ran = builder.wait_running()
            if never_ran is not None:
                return never_ran
            builder.attach([root, swap])
            log.info("builder started", seconds=round(time.monotonic() - started, 3))
            remaining = None if timeout is None else max(1.0, timeout - (time.monotonic() - started))
            watchdog = Watchdog(
                console, timeout=watchdog_timeout() if self.options.watchdog else None, on_fire=self.kill
            )
            watchdog.open()
            try:
                result = builder.stream_until_stopped(watchdog, remaining, killed=lambda: self.killed(slot))
            finally:
                watchdog.close()
            if watchdog.fired:
                builder.powered_off = False  # the watchdog stopped it: never pooled
                return BootResult(
                    ExitReason.WATCHDOG, detail=f"watchdog marker open for {watchdog.timeout:g}s"
                )
            if result is not None and result.reason == ExitReason.KILLED:
                # a killed build reports "failed" (BUILDSTATUS1 on swap, as obs-build's kill), so
                # nothing is extracted: once the builder let go of the swap, mark it here
                builder.wait_stopped()
                swap.detach()
                mark_swap_killed(swap)
                return result
            if result is not None:
                return result
            detach_all([root, swap])
            return BootResult(ExitReason.POWERED_OFF)

    def fixup(self, buildroot: Path) -> None:
        """The root is staged: start the builder now, so that it boots while the host unmounts and
        detaches the root and clears the swap (its boot hook waits for the volumes to appear)."""
        pair = self.pair
        if self.builder.id is not None or self.slot is None or pair is None or pair.swap is None:
            return
        if isinstance(pair.root, EbsVolume) and isinstance(pair.swap, EbsVolume):
            self.builder.start(self.slot, pair.root, pair.swap)

    def kill(self) -> None:
        if self._builder is not None and self._builder.id is not None:
            self._builder.kill()
        elif self.running_elsewhere is not None:
            kill_builders_of(self.ctx, self.running_elsewhere)

    def build_finished(self, status: int) -> None:
        if self._builder is not None:
            self._builder.build_finished(status)

    def release_builder(self) -> None:
        """Terminate the builder, or stop it and hand it back to the pool; idempotent."""
        if self._builder is not None:
            self._builder.release()
