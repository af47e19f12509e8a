"""VolumeWatch against moto: one DescribeVolumes answers every volume asked about, and an answer
from before a change is never taken for the state after it."""

from __future__ import annotations

from cloudbuild.cloud.ec2.api import Ec2Api
from cloudbuild.cloud.ec2.watch import VolumeWatch
from tests.fakes.moto_server import ZONE, Ec2World, Faults


def volumes(world: Ec2World, n: int) -> list[str]:
    return [str(world.ec2.create_volume(AvailabilityZone=ZONE, Size=1)["VolumeId"]) for _ in range(n)]


def test_changed_and_waited_for_volumes_are_described_in_one_call(ec2_world: Ec2World) -> None:
    a, b, c = volumes(ec2_world, 3)
    watch = VolumeWatch(Ec2Api(ec2_world.ec2))
    faults = Faults(ec2_world.ec2)
    watch.changed(b)  # e.g. its detach was requested: somebody will ask about it
    with watch.waiting(c):
        answers = watch.describe([a])
    assert set(answers) == {a, b, c} and faults.count("DescribeVolumes") == 1
    assert watch.current(b).info is not None and watch.current(c).info is not None
    assert faults.count("DescribeVolumes") == 1  # both read from the answer at hand


def test_an_answer_from_before_a_change_is_not_reused(ec2_world: Ec2World) -> None:
    (a,) = volumes(ec2_world, 1)
    watch = VolumeWatch(Ec2Api(ec2_world.ec2))
    faults = Faults(ec2_world.ec2)
    first = watch.current(a)
    assert watch.current(a) == first and faults.count("DescribeVolumes") == 1
    watch.changed(a)
    after = watch.current(a)
    assert after.seq > first.seq and faults.count("DescribeVolumes") == 2
    # a waiter that saw an answer gets a newer one, not the same one again
    assert watch.current(a, newer_than=after.seq).seq > after.seq
    assert faults.count("DescribeVolumes") == 3


def test_a_deleted_volume_is_absent_without_failing_the_others(ec2_world: Ec2World) -> None:
    a, b = volumes(ec2_world, 2)
    watch = VolumeWatch(Ec2Api(ec2_world.ec2))
    ec2_world.ec2.delete_volume(VolumeId=b)
    answers = watch.describe([a, b])
    assert answers[a].info is not None and answers[a].info["VolumeId"] == a
    assert answers[b].info is None
