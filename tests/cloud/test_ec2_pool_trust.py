"""Warm-pool trust rules (docs/ec2.md): a pooled builder is reused only by builds of the same
`--trust-domain`, at most `--ec2-pool-max-uses` times, and never after a failed build."""

from __future__ import annotations

from typing import Any

from cloudbuild.build import run_build
from cloudbuild.cloud.common import TAG_POOL
from cloudbuild.errors import ExitCode
from tests.cloud.test_ec2_flow import job
from tests.fakes.console import RecordingConsole
from tests.fakes.hoststeps import FakeHostSteps
from tests.fakes.moto_server import Ec2World, fake_build


def build(world: Ec2World, build_id: str, **options: Any) -> ExitCode:
    backend = world.backend(ec2_pool=1, **options)
    return run_build(job(world, build_id), backend, FakeHostSteps(), RecordingConsole()).exit_code


def builders(world: Ec2World) -> list[str]:
    return [r.instance_id for r in world.emulator.runs]


def pooled(world: Ec2World) -> list[str]:
    found = world.ec2.describe_instances(
        Filters=[
            {"Name": f"tag:{TAG_POOL}", "Values": [world.worker_id]},
            {"Name": "instance-state-name", "Values": ["stopped"]},
        ]
    )
    return [i["InstanceId"] for r in found["Reservations"] for i in r["Instances"]]


def drain(world: Ec2World) -> None:
    if ids := pooled(world):
        world.ec2.terminate_instances(InstanceIds=ids)


def test_a_pooled_builder_serves_only_its_trust_domain(ec2_world: Ec2World) -> None:
    ec2_world.aws.allow_pool = True
    assert build(ec2_world, "a1", trust_domain="team-a") == ExitCode.OK
    assert build(ec2_world, "b1", trust_domain="team-b") == ExitCode.OK
    assert build(ec2_world, "a2", trust_domain="team-a") == ExitCode.OK
    first, second, third = builders(ec2_world)
    assert second != first  # team-b never gets team-a's builder
    assert third == first  # team-a gets its own back
    drain(ec2_world)


def test_a_pooled_builder_is_terminated_after_max_uses(ec2_world: Ec2World) -> None:
    ec2_world.aws.allow_pool = True
    for n in range(3):
        assert build(ec2_world, f"m{n}", ec2_pool_max_uses=2) == ExitCode.OK
    first, second, third = builders(ec2_world)
    assert second == first and third != first  # two uses, then a fresh builder
    state = ec2_world.ec2.describe_instances(InstanceIds=[first])["Reservations"][0]["Instances"][0]["State"]
    assert state["Name"] in ("shutting-down", "terminated")
    drain(ec2_world)


def test_a_builder_whose_build_failed_is_never_pooled(ec2_world: Ec2World) -> None:
    ec2_world.aws.allow_pool = True
    ec2_world.emulator.play = fake_build(1)
    assert build(ec2_world, "f1") == ExitCode.BUILD_FAILED
    assert pooled(ec2_world) == []
    ec2_world.emulator.play = fake_build(0)
    assert build(ec2_world, "f2") == ExitCode.OK
    assert builders(ec2_world)[1] != builders(ec2_world)[0]
    drain(ec2_world)
