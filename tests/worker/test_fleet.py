"""Auto Scaling membership (cloudbuild.worker.fleet) against moto's server and the fake IMDS."""

from __future__ import annotations

import threading

import pytest

from cloudbuild.retry import wait_for
from cloudbuild.worker.fleet import LIFECYCLE_STATE, REBALANCE, SPOT_ACTION, Fleet
from tests.fakes.moto_server import Aws
from tests.worker.fleetlib import GROUP, HOOK, AsgWorld


def _fleet(world: AsgWorld) -> Fleet:
    fleet = Fleet.detect()
    assert fleet is not None
    assert (fleet.instance_id, fleet.group, fleet.hook) == (world.instance_id, GROUP, HOOK)
    fleet.poll = 0.05
    return fleet


def test_without_imds_or_outside_a_group_there_are_no_group_features(
    asg_world: AsgWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert Fleet.detect() is None
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "false")
    asg_world.imds.metadata["instance-id"] = "i-0123456789abcdef0"  # an instance no group holds
    assert Fleet.detect() is None
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9/")  # nothing listens
    assert Fleet.detect() is None


def test_scale_in_protection_follows_busy_slots(asg_world: AsgWorld) -> None:
    fleet = _fleet(asg_world)
    assert asg_world.instance()["ProtectedFromScaleIn"] is False
    fleet.busy(True)
    assert asg_world.instance()["ProtectedFromScaleIn"] is True
    fleet.busy(False)
    assert asg_world.instance()["ProtectedFromScaleIn"] is False


def test_idle_exit_never_below_the_minimum_and_never_twice(asg_world: AsgWorld) -> None:
    asg_world.shrink_to(1)
    fleet = _fleet(asg_world)
    assert fleet.idle_exit() is False  # at its minimum: keeps running
    assert asg_world.calls("terminate") == [] and asg_world.instance()
    # the pre-check passes on a stale view but the group refuses: still running
    real = fleet.asg.describe_auto_scaling_groups
    fleet.asg.describe_auto_scaling_groups = lambda **kw: {
        "AutoScalingGroups": [{"DesiredCapacity": 2, "MinSize": 1}]
    }
    assert fleet.idle_exit() is False and not fleet.asked_to_leave
    assert asg_world.calls("terminate") == [] and asg_world.instance()
    fleet.asg.describe_auto_scaling_groups = real
    asg_world.shrink_to(2)
    assert fleet.idle_exit() is True
    assert fleet.idle_exit() is True  # asked once; never twice
    assert [c["InstanceId"] for c in asg_world.calls("terminate")] == [asg_world.instance_id]
    assert asg_world.group()["DesiredCapacity"] == 1  # decremented: no replacement launched


def test_a_broken_host_is_reported_unhealthy(asg_world: AsgWorld) -> None:
    fleet = _fleet(asg_world)
    fleet.leave(broken=False)
    assert asg_world.instance()["HealthStatus"].upper() == "HEALTHY"
    fleet.leave(broken=True)
    assert asg_world.instance()["HealthStatus"].upper() == "UNHEALTHY"


def test_lifecycle_termination_drains_heartbeats_while_busy_then_completes(asg_world: AsgWorld) -> None:
    fleet = _fleet(asg_world)
    fleet.heartbeat_every = 0.1
    drains: list[tuple[bool, str]] = []
    running = threading.Event()
    running.set()
    fleet.watch(lambda stop, why: drains.append((stop, why)), lambda: 1 if running.is_set() else 0)
    asg_world.imds.metadata[LIFECYCLE_STATE] = "InService"
    assert drains == []
    asg_world.imds.metadata[LIFECYCLE_STATE] = "Terminated"
    wait_for(
        lambda: len(asg_world.calls("heartbeat")) >= 2 or None, what="heartbeats", timeout=30, interval=0.05
    )
    assert drains == [(False, "lifecycle hook: Terminated")]
    assert asg_world.calls("complete") == []  # not while a build runs
    running.clear()
    fleet.leave(broken=False)
    assert asg_world.calls("complete") == [
        {"AutoScalingGroupName": GROUP, "LifecycleHookName": HOOK, "InstanceId": asg_world.instance_id,
         "LifecycleActionResult": "CONTINUE"}
    ]  # fmt: skip
    assert asg_world.lifecycle[-1][0] == "complete"


def test_spot_notice_stops_at_once_and_rebalance_drains(asg_world: AsgWorld) -> None:
    fleet = _fleet(asg_world)
    drains: list[tuple[bool, str]] = []
    fleet.watch(lambda stop, why: drains.append((stop, why)), lambda: 1)
    asg_world.imds.metadata[REBALANCE] = '{"noticeTime": "2026-11-30T20:00:00Z"}'
    wait_for(lambda: drains or None, what="the rebalance drain", timeout=30, interval=0.05)
    asg_world.imds.metadata[SPOT_ACTION] = '{"action": "terminate", "time": "2026-11-30T20:02:00Z"}'
    wait_for(lambda: len(drains) >= 2 or None, what="the spot stop", timeout=30, interval=0.05)
    fleet.leave(broken=False)
    assert drains == [(False, "spot rebalance recommendation"), (True, "spot interruption")]
    assert asg_world.calls("complete") == []  # no lifecycle action was pending


def test_no_aws_at_all_is_fine(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9/")
    assert Fleet.detect() is None
