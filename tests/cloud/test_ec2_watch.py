"""VolumeWatch against moto: one DescribeVolumes answers every volume asked about, and an answer
from before a change is never taken for the state after it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from cloudbuild.cloud.ec2.api import Ec2Api
from cloudbuild.cloud.ec2.watch import HostAnswers, VolumeWatch
from cloudbuild.volume import TAG_OWNER
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
    assert after.taken > first.taken and faults.count("DescribeVolumes") == 2
    # a waiter that saw an answer gets a newer one, not the same one again
    assert watch.current(a, newer_than=after.taken).taken > after.taken
    assert faults.count("DescribeVolumes") == 3


def test_a_deleted_volume_is_absent_without_failing_the_others(ec2_world: Ec2World) -> None:
    a, b = volumes(ec2_world, 2)
    watch = VolumeWatch(Ec2Api(ec2_world.ec2))
    ec2_world.ec2.delete_volume(VolumeId=b)
    answers = watch.describe([a, b])
    assert answers[a].info is not None and answers[a].info["VolumeId"] == a
    assert answers[b].info is None


def test_four_slots_waiting_cost_one_describe_per_interval(ec2_world: Ec2World, tmp_path: Path) -> None:
    # four slots of one worker host (each its own process in production: its own VolumeWatch),
    # sharing the host's answer file; each round is one poll interval in which every slot needs
    # an answer newer than the round's start
    owner = ec2_world.worker_id
    vols = [
        str(
            ec2_world.ec2.create_volume(
                AvailabilityZone=ZONE,
                Size=1,
                TagSpecifications=[{"ResourceType": "volume", "Tags": [{"Key": TAG_OWNER, "Value": owner}]}],
            )["VolumeId"]
        )
        for _ in range(4)
    ]
    slots = [VolumeWatch(Ec2Api(ec2_world.ec2), HostAnswers(tmp_path, owner)) for _ in vols]
    faults = Faults(ec2_world.ec2)
    rounds = 3
    barrier = threading.Barrier(len(slots))
    errors: list[BaseException] = []

    def slot(watch: VolumeWatch, volume_id: str) -> None:
        try:
            for _ in range(rounds):
                started = time.time()
                barrier.wait()
                answer = watch.current(volume_id, newer_than=started)
                assert answer.info is not None and answer.info["VolumeId"] == volume_id
                assert answer.taken > started
                barrier.wait()  # the interval ends for everybody before the next one starts
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=slot, args=(w, v)) for w, v in zip(slots, vols, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for volume_id in vols:
        ec2_world.ec2.delete_volume(VolumeId=volume_id)
    assert not errors, errors
    assert faults.count("DescribeVolumes") == rounds  # one per interval for the host, not one per slot
