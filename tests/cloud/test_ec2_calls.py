"""API calls per build (issue 17): a whole build against moto, every EC2 call counted through
botocore's `provide-client-params` event. EC2 throttles per account and region (docs/scale.md),
so the counts are a budget: a change that adds calls fails here, not in a fleet.

moto answers instantly, so every wait succeeds on its first look: these are the counts of a build
whose every state change is already done when asked, the floor of what a real build makes.
"""

from __future__ import annotations

from collections import Counter

from cloudbuild.build import BuildJob, run_build
from cloudbuild.errors import ExitCode
from tests.fakes.console import RecordingConsole
from tests.fakes.hoststeps import FakeHostSteps
from tests.fakes.moto_server import Ec2World, Faults

# The orchestrator's flow (build.py) attaches each volume here twice and to the builder once:
# 6 AttachVolume + 6 DetachVolume + 2 CreateVolume + 2 DeleteVolume are the floor of any build.
VOLUME_CHANGES = {"AttachVolume": 6, "DetachVolume": 6, "CreateVolume": 2, "DeleteVolume": 2}
DESCRIBE_VOLUMES_BUDGET = 11  # was 34 before the VolumeWatch (one describe for both volumes)
COLD_BUDGET = 39  # was 63
WARM_BUDGET = 44  # was 68


def build(world: Ec2World, build_id: str, **options: int) -> Counter[str]:
    faults = Faults(world.ec2)
    the_job = BuildJob(build_id, world.tmp / f"dest-{build_id}", world.tmp / f"work-{build_id}")
    outcome = run_build(the_job, world.backend(**options), FakeHostSteps(), RecordingConsole())
    world.ec2.meta.events.unregister("provide-client-params.ec2", faults._record)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    return Counter(faults.calls)


def test_cold_build_stays_within_its_call_budget(ec2_world: Ec2World) -> None:
    calls = build(ec2_world, "cold")
    assert {op: calls[op] for op in VOLUME_CHANGES} == VOLUME_CHANGES
    assert calls["DescribeVolumes"] <= DESCRIBE_VOLUMES_BUDGET, calls
    assert sum(calls.values()) <= COLD_BUDGET, calls


def test_warm_build_stays_within_its_call_budget(ec2_world: Ec2World) -> None:
    ec2_world.aws.allow_pool = True
    build(ec2_world, "fill", ec2_pool=1)  # launches the builder the pool keeps
    calls = build(ec2_world, "warm", ec2_pool=1)
    assert calls["StartInstances"] == 1 and calls["RunInstances"] == 0, calls
    assert calls["DescribeVolumes"] <= DESCRIBE_VOLUMES_BUDGET, calls
    assert sum(calls.values()) <= WARM_BUDGET, calls
