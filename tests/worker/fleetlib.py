"""An Auto Scaling group in moto's server with this worker as one of its instances, a fake IMDS
naming it, and what moto lacks, added here on moto's response class (never in the product):

- RecordLifecycleActionHeartbeat and CompleteLifecycleAction (moto answers HTTP 500): recorded in
  `AsgWorld.lifecycle`, in order, with the time each arrived;
- TerminateInstanceInAutoScalingGroup(ShouldDecrementDesiredCapacity) refused with AWS's
  ValidationError when the group's desired capacity is at its minimum (moto terminates anyway).

moto never holds an instance in Terminating:Wait: the tests play the group's side by setting
IMDS `autoscaling/target-lifecycle-state` to `Terminated`, which is what the instance sees.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import pytest

from tests.fakes.imds import FakeImds
from tests.fakes.moto_server import REGION, ZONE, Aws, register_ami

GROUP = "builders"
HOOK = "drain-builds"


@dataclass
class AsgWorld:
    asg: Any
    ec2: Any
    imds: FakeImds
    instance_id: str
    others: list[str]
    lifecycle: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def instance(self) -> dict[str, Any]:
        found = self.asg.describe_auto_scaling_instances(InstanceIds=[self.instance_id])[
            "AutoScalingInstances"
        ]
        return dict(found[0]) if found else {}

    def group(self) -> dict[str, Any]:
        return dict(
            self.asg.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])["AutoScalingGroups"][0]
        )

    def shrink_to(self, desired: int) -> None:
        """Set the desired capacity (moto scales in at once) and stay one of the instances left."""
        self.asg.update_auto_scaling_group(AutoScalingGroupName=GROUP, DesiredCapacity=desired)
        left = sorted(
            i["InstanceId"] for i in self.asg.describe_auto_scaling_instances()["AutoScalingInstances"]
        )
        if self.instance_id not in left:
            self.instance_id = left[0]
            self.imds.metadata["instance-id"] = left[0]

    def calls(self, action: str) -> list[dict[str, str]]:
        return [params for name, params, _ in self.lifecycle if name == action]


def _teach_moto(monkeypatch: pytest.MonkeyPatch, world: AsgWorld) -> None:
    from moto.autoscaling.exceptions import ValidationError
    from moto.autoscaling.responses import AutoScalingResponse
    from moto.core.responses import EmptyResult

    def recorder(action: str) -> Any:
        def handle(self: Any) -> Any:
            params = {
                k: str(self._get_param(k))
                for k in ("AutoScalingGroupName", "LifecycleHookName", "InstanceId", "LifecycleActionResult")
                if self._get_param(k) is not None
            }
            world.lifecycle.append((action, params, time.time()))
            return EmptyResult()

        return handle

    monkeypatch.setattr(
        AutoScalingResponse, "record_lifecycle_action_heartbeat", recorder("heartbeat"), raising=False
    )
    monkeypatch.setattr(AutoScalingResponse, "complete_lifecycle_action", recorder("complete"), raising=False)
    real_terminate = AutoScalingResponse.terminate_instance_in_auto_scaling_group

    def terminate(self: Any) -> Any:
        instance_id = self._get_param("InstanceId")
        if self._get_bool_param("ShouldDecrementDesiredCapacity", False):
            for group in self.autoscaling_backend.autoscaling_groups.values():
                mine = any(s.instance.id == instance_id for s in group.instance_states)
                if mine and group.desired_capacity <= group.min_size:
                    raise ValidationError(
                        f"Currently, desiredSize equals minSize ({group.min_size}). Terminating "
                        "instance without replacement will violate group's min size constraint."
                    )
        world.lifecycle.append(("terminate", {"InstanceId": instance_id}, time.time()))
        return real_terminate(self)

    monkeypatch.setattr(AutoScalingResponse, "terminate_instance_in_auto_scaling_group", terminate)


@pytest.fixture(name="asg_world")
def asg_world_fixture(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> Iterator[AsgWorld]:
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws.url)
    session = boto3.Session()
    ec2 = session.client("ec2", region_name=REGION, endpoint_url=aws.url)
    asg = session.client("autoscaling", region_name=REGION, endpoint_url=aws.url)
    ami = register_ami(ec2, "worker")
    asg.create_launch_configuration(LaunchConfigurationName="lc", ImageId=ami, InstanceType="m5.large")
    asg.create_auto_scaling_group(
        AutoScalingGroupName=GROUP, LaunchConfigurationName="lc", MinSize=1, MaxSize=3, DesiredCapacity=2,
        AvailabilityZones=[ZONE],
    )  # fmt: skip
    asg.put_lifecycle_hook(
        AutoScalingGroupName=GROUP, LifecycleHookName=HOOK,
        LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING", HeartbeatTimeout=3, DefaultResult="CONTINUE",
    )  # fmt: skip
    ids = sorted(i["InstanceId"] for i in asg.describe_auto_scaling_instances()["AutoScalingInstances"])
    imds = FakeImds({"instance-id": ids[0], "placement/availability-zone": ZONE, "placement/region": REGION})
    imds.start()
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.endpoint)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "false")
    world = AsgWorld(asg, ec2, imds, ids[0], ids[1:])
    _teach_moto(monkeypatch, world)
    try:
        yield world
    finally:
        imds.stop()
