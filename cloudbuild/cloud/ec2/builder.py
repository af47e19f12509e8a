"""The EC2 builder instance of one build: its boot hook and its life.

`Ec2Builder` launches a builder (or claims a stopped one from this worker's warm pool), waits for
it to run, attaches the build's volumes, streams its console until it powers off, and terminates
it or hands it back to the pool. Its `state` (a `BuilderState`) says where it is; a builder that
vanished, timed out or failed under our feet is LOST and never pooled. The boot hook (`user_data`)
is the contract with the builder AMI (docs/ec2.md).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Collection, Mapping
from typing import Any

from cloudbuild.backend import BootResult, BuildSlot, Console, ExitReason
from cloudbuild.cloud.base import BuilderState, host_lock
from cloudbuild.cloud.common import TAG_POOL, build_tags, format_time, lease_expiry
from cloudbuild.cloud.ec2.api import NOT_FOUND, Ec2Context, Ec2Error, ec2_tags, tag_dict
from cloudbuild.cloud.ec2.console import ConsoleTail, decode_console
from cloudbuild.cloud.ec2.devices import serial_of
from cloudbuild.cloud.ec2.volume import EbsVolume, attach_all
from cloudbuild.errors import DeadlineExceeded, InfraError, UsageError
from cloudbuild.log import bound, get_logger
from cloudbuild.options import VmOptions
from cloudbuild.retry import wait_for
from cloudbuild.volume import TAG_BUILD, TAG_EXPIRES, TAG_OWNER

log = get_logger(__name__)

ENDED = ("terminated", "vanished", "shutting-down")
"""Instance states after which no wait for another state makes sense."""
POWERED_OFF = ("stopped", *ENDED)

HOOK_MARKER = "# cloudbuild-builder-hook v1"


def user_data(*, build_id: str, root: str, swap: str, device_timeout: int = 3600) -> str:
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
root="${{by_id}}{serial_of(root)}"
swap="${{by_id}}{serial_of(swap)}"
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


def instance_tags(
    ctx: Ec2Context, options: VmOptions, slot: BuildSlot, role: str, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The tags of everything one build creates: owner, build, slot, role and a lease."""
    return build_tags(
        owner=ctx.identity.instance_id,
        build=slot.build_id,
        slot=slot.slot,
        expires=lease_expiry(options.build_timeout),
        role=role,
        extra=extra,
    )


# A pooled builder ran earlier builds as root on its own disk, so it is reused only by builds of
# the same trust domain, at most --ec2-pool-max-uses times, and only after a clean build.
TAG_TRUST = "cloudbuild:trust-domain"
TAG_USES = "cloudbuild:uses"
REUSABLE_STATUS = (0, 2)


def pool_uses(tags: Mapping[str, str]) -> int:
    """Builds a pooled builder has served; an unreadable count counts as used up."""
    text = tags.get(TAG_USES, "")
    return int(text) if text.isdigit() else 1 << 30


class Ec2Builder:
    """The builder instance of one build slot: none, starting, running, stopped or lost."""

    def __init__(self, ctx: Ec2Context, options: VmOptions, *, nonce: str):
        self.ctx = ctx
        self.options = options
        self.nonce = nonce  # makes RunInstances idempotent across retries of one call
        self.id: str | None = None
        self.state = BuilderState.NONE
        self.from_pool = False
        self.powered_off = False  # the guest powered it off itself: the only end that may pool it
        self.uses = 0  # builds this builder served, this one included
        self.clean = False  # the build's status said ok/unchanged: the builder may be pooled

    @property
    def api(self) -> Any:
        return self.ctx.api

    @property
    def pooling(self) -> bool:
        return self.options.ec2_pool > 0

    # - looking at it -

    def describe(self) -> dict[str, Any] | None:
        if self.id is None:
            return None
        result = self.api.call("describe_instances", InstanceIds=[self.id], missing_ok=NOT_FOUND)
        for reservation in (result or {}).get("Reservations", []):
            for instance in reservation.get("Instances", []):
                return dict(instance)
        return None

    def instance_state(self) -> str:
        info = self.describe()
        return str(info["State"]["Name"]) if info else "vanished"

    def wait(
        self, states: Collection[str], timeout: float, what: str, *, give_up: Collection[str] = ENDED
    ) -> str:
        """Wait until the builder is in one of `states`; a state in `give_up` ends the wait too."""

        def probe() -> str | None:
            state = self.instance_state()
            return state if state in states or state in give_up else None

        return wait_for(
            probe,
            what=what,
            timeout=timeout,
            interval=self.ctx.limits.poll,
            max_interval=self.ctx.limits.poll_max,
        )

    # - launch or claim -

    def start(self, slot: BuildSlot, root: EbsVolume, swap: EbsVolume) -> None:
        """Claim a pool builder and start it, or launch a new one; the volumes attach later."""
        hook = user_data(build_id=slot.build_id, root=root.volume_id, swap=swap.volume_id)
        builder = self._claim_from_pool(slot, hook)
        self.from_pool = builder is not None
        if builder is None:
            builder = self._launch(slot, hook)
        self.id = builder
        self.state = BuilderState.STARTING
        self.powered_off = False
        self.clean = False
        if self.from_pool:
            self.api.must("start_instances", InstanceIds=[builder], eventual=("IncorrectState",))
            log.info("pool builder starting", builder=builder)

    def _claim_from_pool(self, slot: BuildSlot, hook: str) -> str | None:
        """A stopped builder of this worker's pool, claimed for this build under the host lock."""
        if not self.pooling:
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
            self.uses = pool_uses(tag_dict(chosen.get("Tags"))) + 1
            tags = instance_tags(self.ctx, self.options, slot, "builder", {TAG_USES: str(self.uses)})
            self.api.must("create_tags", Resources=[instance_id], Tags=ec2_tags(tags))
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
        self.uses = 1
        extra = (
            {TAG_POOL: self.ctx.identity.instance_id, TAG_TRUST: o.trust_domain, TAG_USES: "1"}
            if self.pooling
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
                {
                    "ResourceType": "instance",
                    "Tags": ec2_tags(instance_tags(self.ctx, o, slot, "builder", extra)),
                }
            ],
            # idempotent across retries of this call, not across builds that reuse a build id
            "ClientToken": f"cloudbuild-{self.nonce}-builder",  # at most 64 characters
        }
        if o.ec2_subnet:
            params["SubnetId"] = o.ec2_subnet
        if o.ec2_security_group:
            params["SecurityGroupIds"] = [o.ec2_security_group]
        result = self.api.must("run_instances", **params)
        instance_id = str(result["Instances"][0]["InstanceId"])
        log.info("builder launched", builder=instance_id, instance_type=params["InstanceType"])
        return instance_id

    # - running the build -

    def wait_running(self) -> BootResult | None:
        """Wait for pending -> running (the boot hook waits for the volumes); a BootResult if it never ran."""
        state = self.wait(
            ("running",),
            self.ctx.limits.running,
            f"builder {self.id} to run",
            # stopped already: its boot hook gave up waiting for the volumes
            give_up=POWERED_OFF,
        )
        return None if state == "running" else self.lost(state)

    def attach(self, volumes: list[EbsVolume]) -> None:
        assert self.id is not None
        attach_all(volumes, self.id)
        self.state = BuilderState.RUNNING

    def lost(self, state: str) -> BootResult:
        self.state = BuilderState.LOST
        log.error("builder vanished", state=state)
        return BootResult(ExitReason.CRASHED, detail=f"builder instance {self.id} {state} unexpectedly")

    def stream_until_stopped(
        self, console: Console, timeout: float | None, *, killed: Callable[[], bool]
    ) -> BootResult | None:
        """Copy new console output to `console` until the builder stops; a BootResult when it did not."""
        tail = ConsoleTail()
        latest = [True]

        def pump() -> None:
            params: dict[str, Any] = {"InstanceId": self.id}
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
            state = self.instance_state()
            return state if state in POWERED_OFF else None

        try:
            state = wait_for(
                probe,
                what=f"builder {self.id} to power off",
                timeout=timeout if timeout is not None else float("inf"),
                interval=self.ctx.limits.poll,
                max_interval=self.ctx.limits.console_poll_max,
            )
        except DeadlineExceeded:
            log.error("build timed out, stopping the builder", timeout=timeout)
            self.kill()
            self.state = BuilderState.LOST  # a builder that ran past its deadline is never pooled
            return BootResult(ExitReason.TIMEOUT, detail=f"no power-off within {timeout:g}s")
        if killed():
            log.info("builder killed by `cloudbuild kill`", state=state)
            return BootResult(ExitReason.KILLED)
        if state != "stopped":
            return self.lost(state)
        pump()
        self.state = BuilderState.STOPPED
        self.powered_off = True
        return None

    def wait_stopped(self) -> None:
        """After a kill: wait until the builder let go of the volumes."""
        self.wait(
            ("stopped", "terminated", "vanished"), self.ctx.limits.stop, f"killed builder {self.id} to stop"
        )
        self.state = BuilderState.STOPPED

    # - the end -

    def kill(self) -> None:
        if self.id is None:
            return
        if self.from_pool or self.pooling:
            self.api.call("stop_instances", InstanceIds=[self.id], Force=True, missing_ok=NOT_FOUND)
        else:
            self.api.call("terminate_instances", InstanceIds=[self.id], missing_ok=NOT_FOUND)
        log.info("builder killed", builder=self.id)

    def release(self) -> None:
        """Terminate the builder, or stop it and hand it back to the pool; idempotent.

        Only a builder the guest powered off itself goes back to the pool: after a timeout, a
        kill or a crash its state is unknown, so it is terminated."""
        if self.id is None:
            return
        builder = self.id
        with bound(builder=builder):
            state = self.instance_state()
            if state == "vanished":
                self.id = None
                self.state = BuilderState.NONE
                return
            keep = (
                self.pooling
                and self.powered_off
                and self.clean
                and self.uses < self.options.ec2_pool_max_uses
                and self.state != BuilderState.LOST
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
            self.id = None
            self.state = BuilderState.NONE
            self.clean = False

    def build_finished(self, status: int) -> None:
        """The orchestrator read the build's status: only ok/unchanged builds leave a reusable builder."""
        self.clean = status in REUSABLE_STATUS

    def _return_to_pool(self, builder: str, state: str) -> bool:
        if state != "stopped":
            self.api.must("stop_instances", InstanceIds=[builder])
            if self.wait(("stopped",), self.ctx.limits.stop, f"builder {builder} to stop") != "stopped":
                return False
        info = self.describe() or {}
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
                Tags=ec2_tags({TAG_POOL: owner, TAG_BUILD: "", TAG_EXPIRES: format_time(lease_expiry(None))}),
            )
        log.info("builder returned to the pool", pool_size=len(members))
        return True


def kill_builders_of(ctx: Ec2Context, build_id: str) -> None:
    """`cloudbuild kill`: stop the builder that another process on this worker runs `build_id` on."""
    result = ctx.api.must(
        "describe_instances",
        Filters=[
            {"Name": f"tag:{TAG_OWNER}", "Values": [ctx.identity.instance_id]},
            {"Name": f"tag:{TAG_BUILD}", "Values": [build_id]},
            {"Name": "instance-state-name", "Values": ["pending", "running"]},
        ],
    )
    for reservation in result.get("Reservations", []):
        for instance in reservation.get("Instances", []):
            instance_id = instance["InstanceId"]
            if TAG_POOL in tag_dict(instance.get("Tags")):
                ctx.api.call("stop_instances", InstanceIds=[instance_id], Force=True, missing_ok=NOT_FOUND)
            else:
                ctx.api.call("terminate_instances", InstanceIds=[instance_id], missing_ok=NOT_FOUND)
            log.info("builder of a running build killed", builder=instance_id, build=build_id)
