"""The contract every cloud package passes: one test module, run for EC2 (moto server), OpenStack
(the HTTP fake) and the in-memory example cloud (tests/cloud/example_cloud.py, the template for a
third cloud). A new cloud adds one `Harness` below and must pass every test unchanged.

What is asserted is only what the core relies on: the volume lifecycle and `Volume.state()`, a
device that is the volume's data, a whole build that leaves nothing tagged behind, `cloudbuild
kill` from another process, a stale kill marker, leases on everything created, the seen-twice gc
and the mapping of cloud faults to exit codes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from cloudbuild.backend import KILL_MARKER, BuildSlot
from cloudbuild.build import BuildJob, BuildOutcome, run_build
from cloudbuild.cloud.base import BuildLocks, CloudBackend
from cloudbuild.cloud.common import GcAdapter, build_tags, lease_expiry, parse_time, sweep, utcnow
from cloudbuild.cloud.ec2.api import Ec2Api, ec2_tags
from cloudbuild.cloud.ec2.gc import Ec2GcAdapter
from cloudbuild.cloud.openstack.gc import OpenStackGc
from cloudbuild.commands.kill import kill_slot
from cloudbuild.disk import buildstatus
from cloudbuild.errors import ExitCode
from cloudbuild.options import parse
from cloudbuild.volume import TAG_BUILD, TAG_EXPIRES, TAG_OWNER, VolumeState
from tests.cloud.example_cloud import ExampleBackend, ExampleCloud, ExampleGc, QuotaExceeded, Throttled
from tests.cloud.openstack_emulation import Emulation, make_backend
from tests.fakes.console import RecordingConsole
from tests.fakes.hoststeps import FakeHostSteps
from tests.fakes.moto_server import ZONE, BuilderRun, Ec2World, Faults, fake_build
from tests.fakes.openstack import FakeOpenStack

BUILD_TIMEOUT = 600.0


class Harness(Protocol):
    """How the contract drives one cloud and looks into it (never through the code under test)."""

    state_dir: Path

    def backend(self) -> CloudBackend: ...

    def guest(self, status: int, *, hold: threading.Event | None = None) -> threading.Event:
        """The next builders write BUILDSTATUS<status> (after `hold` is set, if given); the
        returned event is set once a builder runs."""
        ...

    def tagged(self) -> dict[str, dict[str, str]]:
        """Every cloudbuild-tagged resource (volumes, machines) now, with its tags."""
        ...

    def leak_volume(self, tags: dict[str, str]) -> str: ...

    def dead_owner(self) -> str: ...

    def gc(self) -> GcAdapter: ...

    def fail_create_volume(self, kind: str) -> None:
        """The next volume create fails: "transient" (retried) or "quota" (exit 3)."""
        ...

    def forget(self, volume_id: str) -> None:
        """Delete a volume the test made itself."""
        ...


# -- EC2 ----------------------------------------------------------------------------------------------
class Ec2Harness:
    def __init__(self, world: Ec2World):
        self.world = world
        self.state_dir = world.state_dir

    def backend(self) -> CloudBackend:
        return self.world.backend(build_timeout=BUILD_TIMEOUT)

    def guest(self, status: int, *, hold: threading.Event | None = None) -> threading.Event:
        running = threading.Event()

        def play(run: BuilderRun) -> None:
            running.set()
            if hold is not None:
                hold.wait(30)
                instance = self.world.aws.client().describe_instances(InstanceIds=[run.instance_id])
                if instance["Reservations"][0]["Instances"][0]["State"]["Name"] != "running":
                    run.outcome = "hang"  # killed meanwhile: a stopped machine does nothing more
                    return
            fake_build(status)(run)

        self.world.emulator.play = play
        return running

    def tagged(self) -> dict[str, dict[str, str]]:
        ec2 = self.world.aws.client()
        found: dict[str, dict[str, str]] = {}
        for vol in ec2.describe_volumes()["Volumes"]:
            found[vol["VolumeId"]] = {t["Key"]: t["Value"] for t in vol.get("Tags", [])}
        for res in ec2.describe_instances()["Reservations"]:
            for inst in res["Instances"]:
                if inst["State"]["Name"] != "terminated":
                    found[inst["InstanceId"]] = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
        return {rid: tags for rid, tags in found.items() if TAG_OWNER in tags or TAG_BUILD in tags}

    def leak_volume(self, tags: dict[str, str]) -> str:
        spec = [{"ResourceType": "volume", "Tags": ec2_tags(tags)}]
        volume: str = self.world.ec2.create_volume(AvailabilityZone=ZONE, Size=1, TagSpecifications=spec)[
            "VolumeId"
        ]
        return volume

    def dead_owner(self) -> str:
        ec2 = self.world.ec2
        dead: str = ec2.run_instances(ImageId=self.world.ami, MinCount=1, MaxCount=1)["Instances"][0][
            "InstanceId"
        ]
        ec2.terminate_instances(InstanceIds=[dead])
        return dead

    def gc(self) -> GcAdapter:
        return Ec2GcAdapter(
            Ec2Api(self.world.ec2), local_worker=self.world.worker_id, state_dir=self.state_dir
        )

    def fail_create_volume(self, kind: str) -> None:
        code = "RequestLimitExceeded" if kind == "transient" else "VolumeLimitExceeded"
        Faults(self.world.ec2).fail("CreateVolume", code)

    def forget(self, volume_id: str) -> None:
        self.world.ec2.delete_volume(VolumeId=volume_id)


# -- OpenStack ------------------------------------------------------------------------------------------
class OpenStackHarness:
    def __init__(self, emu: Emulation, fake: FakeOpenStack, tmp: Path):
        self.emu = emu
        self.fake = fake
        self.tmp = tmp
        self.state_dir = tmp / "state"

    def backend(self) -> CloudBackend:
        return make_backend(
            self.fake.metadata_url, self.emu.dev_root, self.state_dir, build_timeout=BUILD_TIMEOUT
        )

    def guest(self, status: int, *, hold: threading.Event | None = None) -> threading.Event:
        running = threading.Event()

        def run(server_id: str, disks: list[Path], emu: Emulation) -> str:
            running.set()
            if hold is not None:
                hold.wait(30)
            buildstatus.write(disks[1], status)
            return f"BUILDSTATUS{status} written\n"

        self.emu.guest = run
        return running

    def tagged(self) -> dict[str, dict[str, str]]:
        with self.fake.lock:
            items = [*self.fake.cloud.servers.values(), *self.fake.cloud.volumes.values()]
            return {
                i.id: dict(i.metadata) for i in items if TAG_OWNER in i.metadata or TAG_BUILD in i.metadata
            }

    def _conn(self) -> Any:
        return self.backend().api.conn  # type: ignore[attr-defined]

    def leak_volume(self, tags: dict[str, str]) -> str:
        volume = self._conn().block_storage.create_volume(size=1, name="leaked", metadata=tags)
        self.fake.settle()
        return str(volume.id)

    def dead_owner(self) -> str:
        return str(uuid.uuid4())  # a server that no longer exists

    def gc(self) -> GcAdapter:
        backend = self.backend()
        return OpenStackGc(backend.api, local_worker=backend.worker_id, state_dir=self.state_dir)  # type: ignore[attr-defined]

    def fail_create_volume(self, kind: str) -> None:
        path = r"/volume/v3/[^/]+/volumes$"
        if kind == "transient":
            self.fake.inject("POST", path, status=503)
        else:
            self.fake.inject_quota("POST", path)

    def forget(self, volume_id: str) -> None:
        self._conn().block_storage.delete_volume(volume_id)
        self.fake.settle()


# -- the in-memory example cloud ---------------------------------------------------------------------------
class ExampleHarness:
    def __init__(self, tmp: Path):
        self.cloud = ExampleCloud(tmp / "example")
        self.state_dir = tmp / "state"

    def backend(self) -> CloudBackend:
        options = parse(
            ["--vm-disk-size", "4", "--vm-swap-size", "4", "--build-timeout", str(int(BUILD_TIMEOUT))]
        )
        return ExampleBackend(options, example=self.cloud, state_dir=self.state_dir)

    def guest(self, status: int, *, hold: threading.Event | None = None) -> threading.Event:
        running = threading.Event()

        def run(disks: list[Path]) -> None:
            running.set()
            if hold is not None:
                hold.wait(30)
            with contextlib.suppress(FileNotFoundError):  # killed meanwhile: its volumes are gone
                buildstatus.write(disks[1], status)

        self.cloud.guest = run
        return running

    def tagged(self) -> dict[str, dict[str, str]]:
        with self.cloud.lock:
            items: list[Any] = [*self.cloud.machines.values(), *self.cloud.volumes.values()]
            return {i.id: dict(i.tags) for i in items if TAG_OWNER in i.tags or TAG_BUILD in i.tags}

    def leak_volume(self, tags: dict[str, str]) -> str:
        from tests.cloud.example_cloud import Disk

        image = self.cloud.base / "leaked.img"
        image.write_bytes(b"")
        volume_id = self.cloud.new_id("vol")
        self.cloud.volumes[volume_id] = Disk(volume_id, image, dict(tags))
        return volume_id

    def dead_owner(self) -> str:
        return "worker-gone"

    def gc(self) -> GcAdapter:
        backend = ExampleBackend(parse([]), example=self.cloud, state_dir=self.state_dir)
        return ExampleGc(backend.api, local_worker=self.cloud.worker, state_dir=self.state_dir)

    def fail_create_volume(self, kind: str) -> None:
        self.cloud.fail_next(
            "create_volume", Throttled() if kind == "transient" else QuotaExceeded("volumes")
        )

    def forget(self, volume_id: str) -> None:
        self.cloud.volumes.pop(volume_id, None)


@pytest.fixture(params=["ec2", "openstack", "example"])
def cloud(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    if request.param == "ec2":
        yield Ec2Harness(request.getfixturevalue("ec2_world"))
    elif request.param == "openstack":
        request.getfixturevalue("fast_sleeps")
        emu = request.getfixturevalue("emu")
        yield OpenStackHarness(emu, request.getfixturevalue("openstack_fake"), tmp_path)
    else:
        harness = ExampleHarness(tmp_path)
        yield harness
        assert harness.tagged() == {}, "the example cloud has resources left"


def build(cloud: Harness, tmp: Path, build_id: str = "b1") -> BuildOutcome:
    job = BuildJob(build_id, tmp / f"dest-{build_id}", tmp / f"work-{build_id}")
    return run_build(job, cloud.backend(), FakeHostSteps(), RecordingConsole())


# -- the contract -------------------------------------------------------------------------------------------


def test_volume_lifecycle_and_state(cloud: Harness, tmp_path: Path) -> None:
    backend = cloud.backend()
    try:
        backend.verify()
        root = backend.volumes(BuildSlot("b1", 0, tmp_path)).root
        assert root.state() == VolumeState.ABSENT
        root.create()
        assert root.state() == VolumeState.AVAILABLE
        device = root.attach()
        assert device is not None and root.state() == VolumeState.ATTACHED
        with open(device, "r+b") as f:  # device resolution: the node is this volume's data
            f.write(b"contract data")
        root.detach()
        assert root.state() == VolumeState.AVAILABLE
        again = root.attach()
        assert again is not None
        with open(again, "rb") as f:
            assert f.read(13) == b"contract data"
        root.release()
        assert root.state() == VolumeState.ABSENT
    finally:
        backend.cleanup()
    assert cloud.tagged() == {}


def test_a_build_runs_and_leaves_nothing_tagged(cloud: Harness, tmp_path: Path) -> None:
    cloud.guest(0)
    outcome = build(cloud, tmp_path)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    assert cloud.tagged() == {}
    cloud.guest(1)
    assert build(cloud, tmp_path, "b2").exit_code == ExitCode.BUILD_FAILED
    assert cloud.tagged() == {}


def test_everything_created_carries_owner_build_and_a_lease(cloud: Harness, tmp_path: Path) -> None:
    seen: dict[str, dict[str, str]] = {}
    hold = threading.Event()
    running = cloud.guest(0, hold=hold)
    outcomes: list[BuildOutcome] = []
    thread = threading.Thread(target=lambda: outcomes.append(build(cloud, tmp_path)))
    thread.start()
    try:
        assert running.wait(30)
        seen = cloud.tagged()
    finally:
        hold.set()
        thread.join(60)
    assert outcomes[0].exit_code == ExitCode.OK, outcomes[0].message
    assert len(seen) >= 3  # root, swap, the builder
    soon = utcnow() + dt.timedelta(seconds=BUILD_TIMEOUT)
    for tags in seen.values():
        assert tags[TAG_BUILD] == "b1" and tags[TAG_OWNER]
        lease = parse_time(tags[TAG_EXPIRES])
        assert lease is not None and lease > soon


def test_cloudbuild_kill_from_another_process_fails_the_build(cloud: Harness, tmp_path: Path) -> None:
    hold = threading.Event()
    running = cloud.guest(0, hold=hold)
    outcomes: list[BuildOutcome] = []
    (tmp_path / "work-b1").mkdir()  # as `cloudbuild build` makes it: the kill marker goes there
    thread = threading.Thread(target=lambda: outcomes.append(build(cloud, tmp_path)))
    thread.start()
    try:
        assert running.wait(30)
        killer = cloud.backend()  # as `cloudbuild kill` builds it: the build lock is held elsewhere
        kill_slot(killer, BuildSlot("b1", 0, tmp_path / "work-b1"))
        killer.cleanup()
        thread.join(60)
    finally:
        hold.set()
        thread.join(60)
    assert outcomes[0].exit_code == ExitCode.BUILD_FAILED, outcomes[0].message
    assert cloud.tagged() == {}


def test_a_stale_kill_marker_does_not_fail_the_next_build(cloud: Harness, tmp_path: Path) -> None:
    (tmp_path / "work-b1").mkdir()
    (tmp_path / "work-b1" / KILL_MARKER).write_text("killed\n")
    cloud.guest(0)
    outcome = build(cloud, tmp_path)
    assert outcome.exit_code == ExitCode.OK, outcome.message


def test_gc_deletes_a_leak_on_the_second_sweep_and_keeps_a_running_build(
    cloud: Harness, tmp_path: Path
) -> None:
    expires = lease_expiry(3600)
    leaked = cloud.leak_volume(build_tags(owner=cloud.dead_owner(), build="gone", slot=0, expires=expires))
    gc = cloud.gc()
    worker = cloud.backend().worker_id
    running = cloud.leak_volume(build_tags(owner=worker, build="running", slot=0, expires=expires))
    crashed = cloud.leak_volume(build_tags(owner=worker, build="crashed", slot=0, expires=expires))
    with BuildLocks(cloud.state_dir / "builds").hold("running"):
        first = sweep(gc, min_age=0)
        assert sorted(first.marked) == sorted([leaked, crashed]) and first.deleted == []
        assert set(cloud.tagged()) == {leaked, running, crashed}
        second = sweep(gc, min_age=0)
    assert sorted(second.deleted) == sorted([leaked, crashed])
    assert set(cloud.tagged()) == {running}
    cloud.forget(running)


@pytest.mark.parametrize(("fault", "exit_code"), [("transient", ExitCode.OK), ("quota", ExitCode.INFRA)])
def test_cloud_faults_map_to_exit_codes(
    cloud: Harness, tmp_path: Path, fault: str, exit_code: ExitCode
) -> None:
    cloud.guest(0)
    cloud.fail_create_volume(fault)
    outcome = build(cloud, tmp_path)
    assert outcome.exit_code == exit_code, outcome.message
    assert cloud.tagged() == {}
