"""Auto Scaling group membership of a worker on EC2: what makes scale-in, spot reclaims and broken
hosts lose nothing.

Detected at start-up: IMDS names the instance (through the one IMDSv2 client,
cloudbuild.cloud.ec2.identity) and DescribeAutoScalingInstances its group. A worker without IMDS
(`AWS_EC2_METADATA_DISABLED=true`, on premises) or outside a group runs without any of this.

- scale-in protection on while any slot is busy, off when idle (SetInstanceProtection), so the
  group always picks idle instances to remove;
- the termination lifecycle hook: IMDS `autoscaling/target-lifecycle-state` polled every 5 s; on
  `Terminated` the worker drains as on SIGTERM, sends RecordLifecycleActionHeartbeat while builds
  run, and CompleteLifecycleAction(CONTINUE) once it is done (jobs past --drain-timeout are
  released by the supervisor first);
- --idle-exit: TerminateInstanceInAutoScalingGroup(ShouldDecrementDesiredCapacity) once, and not
  when the group is at its minimum (a refused call keeps the worker running);
- spot `spot/instance-action`: stop claiming and stop the builds at once (their jobs are released);
  `events/recommendations/rebalance`: drain;
- a broken host (exit 4): SetInstanceHealth(Unhealthy) so the group replaces it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from botocore.exceptions import ClientError

from cloudbuild.cloud.ec2.api import transient
from cloudbuild.cloud.ec2.identity import Imds, imds_disabled
from cloudbuild.log import get_logger
from cloudbuild.retry import CLOUD_API, call_with_retries
from cloudbuild.worker import aws

log = get_logger(__name__)

POLL_SECONDS = 5.0  # IMDS lifecycle state, spot and rebalance notices
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
LIFECYCLE_STATE = "autoscaling/target-lifecycle-state"
SPOT_ACTION = "spot/instance-action"
REBALANCE = "events/recommendations/rebalance"

Drain = Callable[[bool, str], None]  # (stop the builds now?, why)


class Fleet:
    def __init__(self, imds: Imds, asg: Any, instance_id: str, group: str, *, poll: float = POLL_SECONDS):
        self.imds = imds
        self.asg = asg
        self.instance_id = instance_id
        self.group = group
        self.poll = poll
        self.hook, self.heartbeat_every = self._termination_hook()
        self.terminating = False  # the group is removing this instance (lifecycle hook pending)
        self.asked_to_leave = False  # this worker asked the group to terminate it (only ever once)
        self._protected: bool | None = None
        self._noticed: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._heartbeat = 0.0

    @classmethod
    def detect(cls) -> Fleet | None:
        """This instance's group membership, or None (no IMDS, not in a group)."""
        if imds_disabled():
            log.info("no instance metadata (AWS_EC2_METADATA_DISABLED): running without group features")
            return None
        imds = Imds()
        if not imds.answers():
            log.info("no instance metadata service: running without group features")
            return None
        instance_id = imds.get("instance-id")
        asg = aws.client("autoscaling")
        found = _call(lambda: asg.describe_auto_scaling_instances(InstanceIds=[instance_id]), "describe")
        groups = found.get("AutoScalingInstances", [])
        if not groups:
            log.info("not in an Auto Scaling group", instance=instance_id)
            return None
        return cls(imds, asg, instance_id, groups[0]["AutoScalingGroupName"])

    def _termination_hook(self) -> tuple[str | None, float]:
        hooks = _call(lambda: self.asg.describe_lifecycle_hooks(AutoScalingGroupName=self.group), "hooks")
        for hook in hooks.get("LifecycleHooks", []):
            if hook.get("LifecycleTransition") == TERMINATING:
                return hook["LifecycleHookName"], max(1.0, float(hook.get("HeartbeatTimeout", 3600)) / 3)
        return None, 0.0

    # -- supervisor hooks ---------------------------------------------------------------------
    def busy(self, busy: bool) -> None:
        """Scale-in protection follows whether any slot is busy (set before a build starts)."""
        if busy == self._protected:
            return
        self._guard(
            lambda: self.asg.set_instance_protection(
                AutoScalingGroupName=self.group, InstanceIds=[self.instance_id], ProtectedFromScaleIn=busy
            ),
            "SetInstanceProtection",
        )
        self._protected = busy
        log.info("scale-in protection", protected=busy)

    def idle_exit(self) -> bool:
        """Ask the group to remove this idle instance; True when it will (the worker exits)."""
        if self.asked_to_leave:
            return True
        groups = _call(
            lambda: self.asg.describe_auto_scaling_groups(AutoScalingGroupNames=[self.group]), "describe"
        )["AutoScalingGroups"]
        if groups and groups[0]["DesiredCapacity"] <= groups[0]["MinSize"]:
            log.info("idle, but the group is at its minimum size: keeping this worker", group=self.group)
            return False
        try:
            _call(
                lambda: self.asg.terminate_instance_in_auto_scaling_group(
                    InstanceId=self.instance_id, ShouldDecrementDesiredCapacity=True
                ),
                "TerminateInstanceInAutoScalingGroup",
            )
        except ClientError as exc:
            log.info("idle, but the group refused to remove this worker: keeping it", error=str(exc)[:300])
            return False
        self.asked_to_leave = True
        log.info("idle: asked the group to terminate this instance", group=self.group)
        return True

    def watch(self, drain: Drain, busy: Callable[[], int]) -> None:
        self._thread = threading.Thread(target=self._watch, args=(drain, busy), name="fleet", daemon=True)
        self._thread.start()

    def leave(self, *, broken: bool) -> None:
        """The supervisor is done: report a broken host, then let a pending termination go on."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.busy(False)
        if broken:
            self._guard(
                lambda: self.asg.set_instance_health(
                    InstanceId=self.instance_id, HealthStatus="Unhealthy", ShouldRespectGracePeriod=False
                ),
                "SetInstanceHealth",
            )
            log.info("reported this instance unhealthy to its group", group=self.group)
        if (self.terminating or self.asked_to_leave) and self.hook:
            self._guard(
                lambda: self.asg.complete_lifecycle_action(
                    AutoScalingGroupName=self.group,
                    LifecycleHookName=self.hook,
                    InstanceId=self.instance_id,
                    LifecycleActionResult="CONTINUE",
                ),
                "CompleteLifecycleAction",
            )
            log.info("lifecycle action completed", hook=self.hook)

    # -- the watcher --------------------------------------------------------------------------
    def _watch(self, drain: Drain, busy: Callable[[], int]) -> None:
        while not self._stop.is_set():
            try:
                self._tick(drain, busy)
            except Exception as exc:  # IMDS or the API hiccuped: the next tick tries again
                log.warning("fleet watch failed", error=str(exc)[:300])
            self._stop.wait(self.poll)

    def _tick(self, drain: Drain, busy: Callable[[], int]) -> None:
        if not self.terminating and self.imds.find(LIFECYCLE_STATE) == "Terminated":
            self.terminating = True
            log.info("the group is terminating this instance: draining", hook=self.hook)
            drain(False, "lifecycle hook: Terminated")
        if self.terminating and self.hook and busy() and time.monotonic() - self._heartbeat >= self.heartbeat_every:
            self._guard(
                lambda: self.asg.record_lifecycle_action_heartbeat(
                    AutoScalingGroupName=self.group, LifecycleHookName=self.hook, InstanceId=self.instance_id
                ),
                "RecordLifecycleActionHeartbeat",
            )
            self._heartbeat = time.monotonic()
        if SPOT_ACTION not in self._noticed and self.imds.find(SPOT_ACTION) is not None:
            self._noticed.add(SPOT_ACTION)
            log.warning("spot interruption notice: stopping the builds, releasing their jobs")
            drain(True, "spot interruption")
        if REBALANCE not in self._noticed and self.imds.find(REBALANCE) is not None:
            self._noticed.add(REBALANCE)
            log.info("spot rebalance recommendation: draining")
            drain(False, "spot rebalance recommendation")

    def _guard(self, fn: Callable[[], Any], what: str) -> None:
        """A group call whose failure must not stop the worker (logged; the group's own timeouts
        and health checks are the fallback)."""
        try:
            _call(fn, what)
        except Exception as exc:
            log.warning("Auto Scaling call failed", call=what, error=str(exc)[:300])


def _call(fn: Callable[[], Any], what: str) -> Any:
    return call_with_retries(fn, is_transient=_transient, what=f"autoscaling: {what}", policy=CLOUD_API)


_transient = transient()
