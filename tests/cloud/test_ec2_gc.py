"""`cloudbuild gc --vm-type ec2` against moto: the seen-twice sweep over tagged volumes, instances,
snapshots and images; and a worker killed with SIGKILL mid-build leaves nothing gc cannot remove."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from cloudbuild.cloud.base import BuildLocks
from cloudbuild.cloud.common import TAG_GC_SEEN, build_tags, lease_expiry
from cloudbuild.cloud.ec2.api import Ec2Api, ec2_tags
from cloudbuild.cloud.ec2.gc import Ec2GcAdapter
from cloudbuild.commands import gc
from tests.fakes.moto_server import (
    ZONE,
    BuilderRun,
    Ec2World,
    leftovers,
    register_ami,
)

REPO = Path(__file__).resolve().parents[2]


def tags_for(owner: str, build: str = "b1") -> list[dict[str, str]]:
    return ec2_tags(build_tags(owner=owner, build=build, slot=0, expires=lease_expiry(3600)))


def spec(kind: str, owner: str, build: str = "b1") -> list[dict[str, Any]]:
    return [{"ResourceType": kind, "Tags": tags_for(owner, build)}]


def leak_everything(world: Ec2World) -> dict[str, str]:
    """Resources of a worker that died: one of each kind cloudbuild may leave."""
    ec2 = world.ec2
    dead = ec2.run_instances(ImageId=world.ami, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    ec2.terminate_instances(InstanceIds=[dead])
    volume = ec2.create_volume(AvailabilityZone=ZONE, Size=1, TagSpecifications=spec("volume", dead))[
        "VolumeId"
    ]
    builder = ec2.run_instances(
        ImageId=world.ami, MinCount=1, MaxCount=1, TagSpecifications=spec("instance", dead)
    )["Instances"][0]["InstanceId"]
    attached = ec2.create_volume(AvailabilityZone=ZONE, Size=1, TagSpecifications=spec("volume", dead))[
        "VolumeId"
    ]
    ec2.attach_volume(VolumeId=attached, InstanceId=builder, Device="/dev/sdf")
    snapshot = ec2.create_snapshot(VolumeId=volume, TagSpecifications=spec("snapshot", dead))["SnapshotId"]
    image = register_ami(ec2, "obs-style-build-image")
    ec2.create_tags(Resources=[image], Tags=tags_for(dead))
    return {"volume": volume, "attached": attached, "builder": builder, "snapshot": snapshot, "image": image}


def gc_main(*args: str) -> int:
    return gc.main(["--vm-type", "ec2", "--log-format", "json", *args])


def test_gc_deletes_a_dead_workers_resources_on_the_second_sweep_only(ec2_world: Ec2World):
    leaked = leak_everything(ec2_world)
    foreign = ec2_world.ec2.create_volume(AvailabilityZone=ZONE, Size=1)["VolumeId"]
    live = ec2_world.ec2.create_volume(
        AvailabilityZone=ZONE, Size=1, TagSpecifications=spec("volume", ec2_world.worker_id, "running")
    )["VolumeId"]
    with BuildLocks(ec2_world.state_dir / "builds").hold("running"):
        assert gc_main("--min-age", "0") == 0
        left = set(leftovers(ec2_world.aws.client()))
        assert set(leaked.values()) | {live} <= left  # first sweep only marks
        seen = ec2_world.ec2.describe_volumes(VolumeIds=[leaked["volume"]])["Volumes"][0]["Tags"]
        assert any(t["Key"] == TAG_GC_SEEN for t in seen)
        assert gc_main("--min-age", "0") == 0
    assert leftovers(ec2_world.aws.client()) == [live]
    assert {v["VolumeId"] for v in ec2_world.ec2.describe_volumes(VolumeIds=[foreign])["Volumes"]} == {
        foreign
    }
    untagged = ec2_world.ec2.describe_volumes(VolumeIds=[foreign])["Volumes"][0].get("Tags", [])
    assert untagged == []  # never even marked
    ec2_world.ec2.delete_volume(VolumeId=foreign)
    ec2_world.ec2.delete_volume(VolumeId=live)


def test_gc_waits_min_age_between_sweeps_and_dry_run_changes_nothing(ec2_world: Ec2World):
    leaked = leak_everything(ec2_world)
    assert gc_main("--dry-run", "--min-age", "0") == 0
    tags = ec2_world.ec2.describe_volumes(VolumeIds=[leaked["volume"]])["Volumes"][0]["Tags"]
    assert not any(t["Key"] == TAG_GC_SEEN for t in tags)
    assert gc_main() == 0  # marks
    assert gc_main() == 0  # default --min-age 300: too soon
    assert set(leaked.values()) <= set(leftovers(ec2_world.aws.client()))
    assert gc_main("--min-age", "0") == 0
    assert leftovers(ec2_world.aws.client()) == []


def test_gc_rejects_bad_arguments(ec2_world: Ec2World):
    with pytest.raises(SystemExit):
        gc_main("--min-age", "-1")
    with pytest.raises(SystemExit):
        gc.main(["--vm-type", "kvm"])


def test_gc_adapter_lists_only_tagged_resources(ec2_world: Ec2World):
    leaked = leak_everything(ec2_world)
    ec2_world.ec2.create_volume(AvailabilityZone=ZONE, Size=1)
    adapter = Ec2GcAdapter(Ec2Api(ec2_world.ec2))
    found = {r.id: r.kind for r in adapter.list_resources()}
    assert found == {
        leaked["volume"]: "volume",
        leaked["attached"]: "volume",
        leaked["builder"]: "instance",
        leaked["snapshot"]: "snapshot",
        leaked["image"]: "image",
    }
    assert not adapter.owner_alive("i-00000000000000000")
    assert adapter.owner_alive(ec2_world.worker_id)
    assert gc_main("--min-age", "0") == 0 and gc_main("--min-age", "0") == 0
    for vol in ec2_world.ec2.describe_volumes()["Volumes"]:
        if not vol.get("Tags") and vol["State"] == "available":
            ec2_world.ec2.delete_volume(VolumeId=vol["VolumeId"])


CHILD = """
import sys
from pathlib import Path
from cloudbuild.build import BuildJob, run_build
from cloudbuild.cloud.ec2.backend import Ec2Backend
from cloudbuild.cloud.ec2.api import Ec2Limits
from cloudbuild.cloud.ec2.devices import HostPaths
from cloudbuild.options import VmOptions
from tests.fakes.console import RecordingConsole
from tests.fakes.hoststeps import FakeHostSteps

tmp, ami = Path(sys.argv[1]), sys.argv[2]
options = VmOptions(vm_type="ec2", ec2_builder_ami=ami, disk_size=1024, swap_size=1024)
limits = Ec2Limits(poll=0.01, poll_max=0.05)
backend = Ec2Backend(options, paths=HostPaths(tmp / "dev", tmp / "sys"), limits=limits)  # identity: IMDS
run_build(BuildJob("killed-build", tmp / "dest", tmp / "work"), backend, FakeHostSteps(), RecordingConsole())
"""


def test_worker_killed_mid_build_leaves_only_what_gc_removes(ec2_world: Ec2World):
    building = threading.Event()
    release = threading.Event()

    def hang(run: BuilderRun) -> None:
        run.outcome = "hang"
        building.set()
        release.wait(30)

    ec2_world.emulator.play = hang
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(ec2_world.tmp), ec2_world.ami],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        if not building.wait(60):
            child.kill()
            raise AssertionError(f"the build never reached its builder: {child.communicate()[1][-3000:]!r}")
        left = leftovers(ec2_world.aws.client())
        assert len(left) == 3  # root, swap, builder
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(10) == -signal.SIGKILL
    finally:
        release.set()
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stderr:
            child.stderr.close()
    assert set(leftovers(ec2_world.aws.client())) == set(left)  # SIGKILL: no cleanup ran
    assert gc_main("--min-age", "0") == 0
    assert gc_main("--min-age", "0") == 0
    assert leftovers(ec2_world.aws.client()) == []


def other_worker(world: Ec2World) -> str:
    instance: str = world.ec2.run_instances(ImageId=world.ami, MinCount=1, MaxCount=1)["Instances"][0][
        "InstanceId"
    ]
    return instance


def test_gc_here_keeps_a_build_of_another_live_worker_it_cannot_see(ec2_world: Ec2World):
    owner = other_worker(ec2_world)  # its build runs there: no lock of it on this worker
    volume = ec2_world.ec2.create_volume(
        AvailabilityZone=ZONE, Size=1, TagSpecifications=spec("volume", owner, "elsewhere")
    )["VolumeId"]
    assert gc_main("--min-age", "0") == 0
    assert gc_main("--min-age", "0") == 0
    assert leftovers(ec2_world.aws.client()) == [volume]
    ec2_world.ec2.delete_volume(VolumeId=volume)
    ec2_world.ec2.terminate_instances(InstanceIds=[owner])


def test_gc_keeps_the_volumes_of_a_stopped_worker(ec2_world: Ec2World):
    owner = other_worker(ec2_world)
    ec2_world.ec2.stop_instances(InstanceIds=[owner])  # stopped, not gone: it may start again
    volume = ec2_world.ec2.create_volume(
        AvailabilityZone=ZONE, Size=1, TagSpecifications=spec("volume", owner, "paused")
    )["VolumeId"]
    assert gc_main("--min-age", "0") == 0
    assert gc_main("--min-age", "0") == 0
    assert leftovers(ec2_world.aws.client()) == [volume]
    ec2_world.ec2.delete_volume(VolumeId=volume)
    ec2_world.ec2.terminate_instances(InstanceIds=[owner])
