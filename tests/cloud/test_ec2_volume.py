"""EbsVolume against moto: create, attach here (device by volume id), detach, delete, and the
ways EC2 misbehaves (throttling, eventual consistency, slow or lost attachments, stuck detach)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from cloudbuild.backend import BuildSlot
from cloudbuild.build import BuildJob, run_build
from cloudbuild.cloud.common import parse_time
from cloudbuild.cloud.ec2.api import Ec2Limits
from cloudbuild.cloud.ec2.volume import EbsVolume
from cloudbuild.deadline import Deadline, PhaseExpired
from cloudbuild.errors import ExitCode, HostBroken, InfraError
from cloudbuild.volume import TAG_BUILD, TAG_EXPIRES, TAG_OWNER, TAG_ROLE, TAG_SLOT, VolumeState
from tests.fakes import timings
from tests.fakes.console import RecordingConsole
from tests.fakes.hoststeps import FakeHostSteps
from tests.fakes.moto_server import ZONE, BuilderRun, Ec2World, Faults, fake_build, moto_backend


def pair(world: Ec2World, build_id: str = "b1", slot: int = 0, **changes: Any) -> tuple[EbsVolume, EbsVolume]:
    backend = world.backend(**changes)
    volumes = backend.volumes(BuildSlot(build_id, slot, world.tmp / build_id))
    assert isinstance(volumes.root, EbsVolume) and isinstance(volumes.swap, EbsVolume)
    world.cleanups.append(backend.cleanup)
    return volumes.root, volumes.swap


@pytest.fixture(autouse=True)
def _release_backends(ec2_world: Ec2World) -> Any:
    ec2_world.cleanups = []
    yield
    for cleanup in ec2_world.cleanups:
        cleanup()


def test_created_in_the_worker_zone_gp3_encrypted_and_tagged(ec2_world: Ec2World):
    root, _ = pair(ec2_world, slot=3, build_timeout=600.0)
    root.create()
    try:
        info = ec2_world.ec2.describe_volumes(VolumeIds=[root.id])["Volumes"][0]
        assert (info["AvailabilityZone"], info["VolumeType"], info["Encrypted"]) == (ZONE, "gp3", True)
        tags = {t["Key"]: t["Value"] for t in info["Tags"]}
        assert tags[TAG_OWNER] == ec2_world.worker_id
        assert (tags[TAG_BUILD], tags[TAG_SLOT], tags[TAG_ROLE]) == ("b1", "3", "root")
        assert parse_time(tags[TAG_EXPIRES]) is not None and tags[TAG_EXPIRES].endswith("Z")
        assert root.state() == VolumeState.AVAILABLE
    finally:
        root.release()
    assert root.state() == VolumeState.ABSENT
    root.release()  # idempotent


def test_attach_here_returns_the_node_of_this_volume_and_detach_waits(ec2_world: Ec2World):
    root, swap = pair(ec2_world)
    root.create()
    swap.create()
    try:
        root_dev = root.attach()
        swap_dev = swap.attach()
        assert root_dev == ec2_world.images / f"{root.id}.img"
        assert swap_dev == ec2_world.images / f"{swap.id}.img"
        assert root.state() == VolumeState.ATTACHED
        assert root.attach() == root_dev  # idempotent
        devices = {
            a["Device"]
            for v in (root, swap)
            for a in ec2_world.ec2.describe_volumes(VolumeIds=[v.id])["Volumes"][0]["Attachments"]
        }
        assert devices == {"/dev/sdf", "/dev/sdg"}
        root.detach()
        assert root.state() == VolumeState.AVAILABLE
        root.detach()  # idempotent
    finally:
        root.release()
        swap.release()


def test_device_names_skip_what_the_instance_already_uses(ec2_world: Ec2World):
    other = ec2_world.ec2.create_volume(AvailabilityZone=ZONE, Size=1)["VolumeId"]
    ec2_world.ec2.attach_volume(VolumeId=other, InstanceId=ec2_world.worker_id, Device="/dev/sdf")
    root, _ = pair(ec2_world)
    root.create()
    try:
        root.attach()
        att = ec2_world.ec2.describe_volumes(VolumeIds=[root.id])["Volumes"][0]["Attachments"][0]
        assert att["Device"] == "/dev/sdg"
    finally:
        root.release()
        ec2_world.ec2.detach_volume(VolumeId=other, InstanceId=ec2_world.worker_id)
        ec2_world.ec2.delete_volume(VolumeId=other)


def test_parallel_slots_never_share_a_device_name(ec2_world: Ec2World):
    volumes = [v for slot in range(3) for v in pair(ec2_world, build_id=f"b{slot}", slot=slot)]
    for v in volumes:
        v.create()
    errors: list[BaseException] = []

    def attach(v: EbsVolume) -> None:
        try:
            v.attach()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=attach, args=(v,)) for v in volumes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert errors == []
        names = [
            a["Device"]
            for v in volumes
            for a in ec2_world.ec2.describe_volumes(VolumeIds=[v.id])["Volumes"][0]["Attachments"]
        ]
        assert len(names) == len(set(names)) == 6
    finally:
        for v in volumes:
            v.release()


def test_throttling_is_retried(ec2_world: Ec2World):
    faults = Faults(ec2_world.ec2)
    faults.fail("CreateVolume", "RequestLimitExceeded", times=2)
    faults.fail("AttachVolume", "Throttling", times=2)
    root, _ = pair(ec2_world)
    root.create()
    try:
        assert root.attach() is not None
        assert faults.count("CreateVolume") == 3 and faults.count("AttachVolume") == 3
    finally:
        root.release()


def test_not_found_right_after_create_and_incorrect_state_while_attaching_are_retried(ec2_world: Ec2World):
    faults = Faults(ec2_world.ec2)
    faults.fail("DescribeVolumes", "InvalidVolume.NotFound", times=2)
    faults.fail("AttachVolume", "IncorrectState", times=2)
    root, _ = pair(ec2_world)
    root.create()
    try:
        assert root.attach() is not None
    finally:
        root.release()


def test_quota_on_create_is_exit_3(ec2_world: Ec2World):
    Faults(ec2_world.ec2).fail("CreateVolume", "VolumeLimitExceeded", times=5)
    root, _ = pair(ec2_world)
    with pytest.raises(InfraError) as info:
        root.create()
    assert info.value.exit_code == ExitCode.INFRA and "VolumeLimitExceeded" in str(info.value)


def test_slow_attach_is_waited_for(ec2_world: Ec2World):
    faults = Faults(ec2_world.ec2)

    def slow(parsed: dict[str, Any]) -> None:
        volume = moto_backend().volumes[parsed["VolumeId"]]
        volume.attachment.status = "attaching"
        threading.Timer(0.3, lambda: setattr(volume.attachment, "status", "attached")).start()

    faults.after("AttachVolume", slow)
    root, _ = pair(ec2_world)
    root.create()
    try:
        assert root.attach() is not None
        assert faults.count("DescribeVolumes") > 3  # it polled through "attaching"
    finally:
        root.release()


def lost_attach(world: Ec2World, times: int) -> Faults:
    faults = Faults(world.ec2)
    faults.swallow("AttachVolume", {"State": "attaching"}, times=times)
    return faults


def test_attach_that_never_lands_is_exit_3_then_host_broken_after_three(ec2_world: Ec2World):
    limits = Ec2Limits(**{**timings.EC2.__dict__, "attach": 0.3, "flip_grace": 10.0})
    lost_attach(ec2_world, times=10)
    codes = []
    for i in range(3):
        root, _ = pair(ec2_world, build_id=f"b{i}", limits=limits)
        root.create()
        try:
            with pytest.raises((InfraError, HostBroken)) as info:
                root.attach()
            codes.append(info.value.exit_code)
        finally:
            root.release()
    assert codes == [ExitCode.INFRA, ExitCode.INFRA, ExitCode.HOST_BROKEN]
    assert isinstance(info.value, HostBroken)


def test_a_good_attach_resets_the_failure_count(ec2_world: Ec2World):
    limits = Ec2Limits(**{**timings.EC2.__dict__, "attach": 0.3, "flip_grace": 10.0})
    lost_attach(ec2_world, times=2)
    for i in range(3):
        root, _ = pair(ec2_world, build_id=f"b{i}", limits=limits)
        root.create()
        try:
            if i < 2:
                with pytest.raises(InfraError) as info:
                    root.attach()
                assert not isinstance(info.value, HostBroken)
            else:
                assert root.attach() is not None
        finally:
            root.release()
    root, _ = pair(ec2_world, build_id="b9", limits=limits)
    assert (ec2_world.state_dir / "attach-failures.json").read_text().startswith('{"failures": 0')


def flip_back(parsed: dict[str, Any]) -> None:
    """The attachment EC2 accepted evaporates: the volume is `available` again."""
    backend = moto_backend()
    backend.detach_volume(parsed["VolumeId"], parsed["InstanceId"], parsed["Device"])


def test_volume_that_flips_back_to_available_is_attached_once_more(ec2_world: Ec2World):
    faults = Faults(ec2_world.ec2)
    faults.after("AttachVolume", flip_back, times=1)
    root, _ = pair(ec2_world)
    root.create()
    try:
        assert root.attach() is not None
        assert faults.count("AttachVolume") == 2
        assert root.state() == VolumeState.ATTACHED
    finally:
        root.release()


def test_volume_that_flips_back_twice_is_exit_3(ec2_world: Ec2World):
    faults = Faults(ec2_world.ec2)
    faults.after("AttachVolume", flip_back, times=2)
    root, _ = pair(ec2_world)
    root.create()
    try:
        with pytest.raises(InfraError, match="flipped back"):
            root.attach()
        assert faults.count("AttachVolume") == 2
    finally:
        root.release()


def test_stuck_detach_is_forced(ec2_world: Ec2World):
    limits = Ec2Limits(**{**timings.EC2.__dict__, "detach": 0.3})
    root, _ = pair(ec2_world, limits=limits)
    root.create()
    root.attach()
    faults = Faults(ec2_world.ec2)
    faults.swallow(
        "DetachVolume", {"State": "detaching"}, times=5, when=lambda body: body.get("Force") != "true"
    )
    try:
        root.detach()
        assert root.state() == VolumeState.AVAILABLE
        forced = [p for op, p in faults.params if op == "DetachVolume"]
        assert [p.get("Force") for p in forced] == [False, True]
    finally:
        root.release()


def test_supplied_volumes_are_wiped_before_use_and_never_deleted(ec2_world: Ec2World):
    ids = [ec2_world.ec2.create_volume(AvailabilityZone=ZONE, Size=1)["VolumeId"] for _ in range(2)]
    residue = 256 * 1024  # past what the fake host steps and the fake build write
    for vid in ids:  # a previous build's residue
        with open(ec2_world.emulator.image(vid), "r+b") as f:
            f.seek(residue)
            f.write(b"OLD BUILD RESIDUE")
    seen: list[bytes] = []

    def play(run: BuilderRun) -> None:
        for image in (run.root_image, run.swap_image):
            with open(image, "rb") as f:
                f.seek(residue)
                seen.append(f.read(17))
        fake_build(0)(run)

    ec2_world.emulator.play = play
    job = BuildJob("b1", ec2_world.tmp / "dest", ec2_world.tmp / "work")
    backend = ec2_world.backend(vm_volume_root=ids[0], vm_volume_swap=ids[1])
    outcome = run_build(job, backend, FakeHostSteps(), RecordingConsole())
    assert outcome.exit_code == ExitCode.OK, outcome.message
    assert seen == [b"\0" * 17] * 2  # the builder never saw the residue
    remaining = {v["VolumeId"] for v in ec2_world.ec2.describe_volumes(VolumeIds=ids)["Volumes"]}
    assert remaining == set(ids)
    with open(ec2_world.images / f"{ids[0]}.img", "rb") as f:
        assert f.read(4) == b"\0" * 4  # this build's root wiped again at release
    for vid in ids:
        ec2_world.ec2.delete_volume(VolumeId=vid)


def test_supplied_volume_in_another_zone_is_a_usage_error(ec2_world: Ec2World):
    vid = ec2_world.ec2.create_volume(AvailabilityZone="us-east-1b", Size=1)["VolumeId"]
    root, _ = pair(ec2_world, vm_volume_root=vid, vm_volume_swap=vid)
    with pytest.raises(Exception) as info:
        root.create()
    assert getattr(info.value, "exit_code", None) == ExitCode.BUILD_FAILED and "us-east-1b" in str(info.value)
    ec2_world.ec2.delete_volume(VolumeId=vid)


def test_releasing_one_volume_starts_the_partners_detach(ec2_world: Ec2World):
    root, swap = pair(ec2_world)
    root.create()
    swap.create()
    root.attach()
    swap.attach()
    faults = Faults(ec2_world.ec2)
    root.release()
    detached = [p["VolumeId"] for op, p in faults.params if op == "DetachVolume"]
    assert detached == [swap.id, root.id]  # the swap's detach was asked for first, not waited for
    assert root.state() == VolumeState.ABSENT
    swap.release()
    assert swap.state() == VolumeState.ABSENT


def test_the_test_setup_honours_client_tokens_as_ec2_does(ec2_world: Ec2World):
    ec2 = ec2_world.ec2
    first = ec2.create_volume(AvailabilityZone=ZONE, Size=1, ClientToken="token-1")["VolumeId"]
    again = ec2.create_volume(AvailabilityZone=ZONE, Size=1, ClientToken="token-1")["VolumeId"]
    other = ec2.create_volume(AvailabilityZone=ZONE, Size=1, ClientToken="token-2")["VolumeId"]
    assert first == again != other
    for volume in (first, other):
        ec2.delete_volume(VolumeId=volume)


def test_a_create_whose_answer_was_lost_is_retried_without_a_second_volume(ec2_world: Ec2World):
    faults = Faults(ec2_world.ec2)
    faults.lose_answer("CreateVolume")  # EC2 created it; the worker saw a 500 and retries
    root, _ = pair(ec2_world)
    root.create()
    try:
        assert faults.count("CreateVolume") == 2
        mine = ec2_world.ec2.describe_volumes(Filters=[{"Name": f"tag:{TAG_BUILD}", "Values": ["b1"]}])
        assert [v["VolumeId"] for v in mine["Volumes"]] == [root.id]
    finally:
        root.release()


def test_the_phase_deadline_ends_a_slow_attach_without_charging_the_host(ec2_world: Ec2World):
    # the volume's own limit is long; the phase's deadline is what ends the wait, each time,
    # and a phase running out is slowness, not a broken host: three in a row stay exit 3
    limits = Ec2Limits(**{**timings.EC2.__dict__, "attach": 60.0, "flip_grace": 60.0})
    lost_attach(ec2_world, times=10)
    for i in range(3):
        root, _ = pair(ec2_world, build_id=f"b{i}", limits=limits)
        root.create()
        try:
            with pytest.raises(PhaseExpired) as info:
                root.attach(deadline=Deadline("prepare", 0.3))
            assert info.value.exit_code == ExitCode.INFRA and not isinstance(info.value, HostBroken)
            assert "prepare took longer than its deadline of 0.3s" in str(info.value)
        finally:
            root.release()
