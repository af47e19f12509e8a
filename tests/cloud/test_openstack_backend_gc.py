"""`cloudbuild gc --vm-type openstack`: the OpenStack GC adapter under common.py's seen-twice policy.

Servers *and* volumes tagged by cloudbuild are swept when their worker is gone or their lease
expired; the first sweep only marks them, a later one deletes them (servers first, which frees
the volumes they hold). Untagged resources are never touched.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudbuild import cli
from cloudbuild import log as cblog
from cloudbuild.cloud.common import build_tags, format_time, sweep, utcnow
from cloudbuild.cloud.openstack.api import Api, connect
from cloudbuild.cloud.openstack.gc import OpenStackGc, gc_adapter
from cloudbuild.retry import wait_for
from cloudbuild.runner import spawn, terminate
from cloudbuild.volume import TAG_GC_SEEN
from tests.cloud.openstack_emulation import Emulation
from tests.fakes import timings

REPO = Path(__file__).resolve().parents[2]

# fast_sleeps, and emu: after every test no cloudbuild-tagged server or volume is left in the
# cloud (tests/cloud/openstack_fixtures.py). No builder runs a guest here.
pytestmark = pytest.mark.usefixtures("fast_sleeps", "emu")
EMULATION_JOIN_TIMEOUT = 10.0


@pytest.fixture
def api(emu: Emulation) -> Iterator[Api]:
    a = Api(connect(), timeouts=timings.OPENSTACK)
    yield a
    a.close()


def leftovers(api: Api, owner: str, *, expires: dt.datetime | None = None) -> dict[str, str]:
    """What a worker killed mid-build leaves: root and swap held by a running builder."""
    expires = expires or utcnow() + dt.timedelta(hours=3)
    storage, compute = api.conn.block_storage, api.conn.compute
    ids = {}
    for role in ("root", "swap"):
        tags = build_tags(owner=owner, build="lost", slot=0, expires=expires, role=role)
        ids[role] = storage.create_volume(size=1, name=f"cloudbuild-lost-0-{role}", metadata=tags).id
    for vid in ids.values():
        wait_for(
            lambda vid=vid: storage.get_volume(vid).status == "available",
            what="available",
            timeout=5,
            interval=0.01,
        )
    bdm = [
        {
            "uuid": v,
            "source_type": "volume",
            "destination_type": "volume",
            "boot_index": -1,
            "delete_on_termination": False,
        }
        for v in ids.values()
    ]
    server = compute.create_server(
        name="cloudbuild-lost-0",
        image_id="7f2a4b4e-3c1d-4e55-9a0e-1f6b3e0c2d11",
        flavor_id="1",
        networks="none",
        block_device_mapping_v2=bdm,
        metadata=build_tags(owner=owner, build="lost", slot=0, expires=expires, role="builder"),
    )
    ids["server"] = server.id
    return ids


def test_gc_sweeps_servers_and_volumes_of_a_gone_worker_on_the_second_sighting(
    emu: Emulation, api: Api
) -> None:
    ids = leftovers(api, owner="0b9a1f6e-dead-4c6e-9f5e-000000000000")
    untagged = api.conn.block_storage.create_volume(size=1, name="somebody-elses").id
    adapter = gc_adapter(api=api)

    first = sweep(adapter, min_age=0)
    assert sorted(first.marked) == sorted(ids.values()) and not first.deleted
    assert TAG_GC_SEEN in emu.fake.server(ids["server"]).metadata
    assert TAG_GC_SEEN in emu.fake.volume(ids["root"]).metadata
    assert emu.fake.volume(ids["root"]).status == "in-use"

    second = sweep(adapter, min_age=0)
    assert second.ok, second.failed
    assert sorted(second.deleted) == sorted(ids.values())
    assert second.deleted[0] == ids["server"]  # the server first: it holds the volumes
    assert emu.fake.resources()["volumes"] == [untagged]  # never touched


def test_gc_deletes_volumes_in_error_and_servers_in_error(emu: Emulation, api: Api) -> None:
    ids = leftovers(api, owner="0b9a1f6e-dead-4c6e-9f5e-000000000000")
    emu.fake.set_server_error(ids["server"])
    adapter = gc_adapter(api=api)
    sweep(adapter, min_age=0)
    with emu.fake._lock:
        stray = emu.fake.cloud.create_volume(
            name="x",
            size=1,
            volume_type="__DEFAULT__",
            availability_zone="nova",
            description=None,
            metadata=build_tags(owner="gone", build="lost", slot=1, expires=utcnow(), role="root"),
        )
        stray.set_status("error")
        stray.begin()
    second = sweep(adapter, min_age=0)
    assert second.ok, second.failed
    assert sorted(second.deleted) == sorted(ids.values()) and second.marked == [stray.id]
    third = sweep(adapter, min_age=0)
    assert third.ok, third.failed
    assert third.deleted == [stray.id]


def test_gc_waits_min_age_between_sightings(emu: Emulation, api: Api) -> None:
    ids = leftovers(api, owner="0b9a1f6e-dead-4c6e-9f5e-000000000000")
    adapter = gc_adapter(api=api)
    assert len(sweep(adapter, min_age=300).marked) == 3
    assert len(sweep(adapter, min_age=300).waiting) == 3
    later = utcnow() + dt.timedelta(seconds=301)
    assert sorted(sweep(adapter, min_age=300, now=later).deleted) == sorted(ids.values())


def test_gc_keeps_a_live_workers_resources_until_the_lease_expires(emu: Emulation, api: Api) -> None:
    worker = emu.fake.worker_server_id
    ids = leftovers(api, owner=worker)
    adapter = gc_adapter(api=api)
    report = sweep(adapter, min_age=0)
    assert sorted(report.kept) == sorted(ids.values()) and not report.marked
    after_lease = utcnow() + dt.timedelta(hours=4)
    assert len(sweep(adapter, min_age=0, now=after_lease).marked) == 3
    assert len(sweep(adapter, min_age=0, now=after_lease).deleted) == 3


def test_gc_clears_the_mark_when_a_resource_is_no_longer_leaked(emu: Emulation, api: Api) -> None:
    ids = leftovers(api, owner=emu.fake.worker_server_id, expires=utcnow() - dt.timedelta(minutes=1))
    adapter = gc_adapter(api=api)
    assert len(sweep(adapter, min_age=0).marked) == 3
    renewed = {"cloudbuild:expires": format_time(utcnow() + dt.timedelta(hours=1))}
    api.conn.compute.set_server_metadata(ids["server"], **renewed)
    for role in ("root", "swap"):
        api.conn.block_storage.set_volume_metadata(ids[role], **renewed)
    report = sweep(adapter, min_age=0)
    assert sorted(report.kept) == sorted(ids.values())
    assert TAG_GC_SEEN not in emu.fake.server(ids["server"]).metadata
    assert TAG_GC_SEEN not in emu.fake.volume(ids["swap"]).metadata
    expired = utcnow() + dt.timedelta(hours=2)
    sweep(adapter, min_age=0, now=expired)
    assert len(sweep(adapter, min_age=0, now=expired).deleted) == 3


def test_gc_retries_5xx_and_reports_a_failed_delete_as_exit_3(
    emu: Emulation, api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cblog, "configure", lambda *args, **kwargs: None)  # keep pytest's log capture
    ids = leftovers(api, owner="0b9a1f6e-dead-4c6e-9f5e-000000000000")
    emu.fake.inject("GET", r"/servers/detail$", status=503, times=2)
    assert cli.main(["gc", "--vm-type", "openstack", "--min-age", "0", "--log-format", "json"]) == 0
    emu.fake.inject("DELETE", r"/volumes/[^/]+$", status=400, times=1)  # a logic error: not retried
    assert cli.main(["gc", "--vm-type", "openstack", "--min-age", "0", "--log-format", "json"]) == 3
    remaining = [v for v in (ids["root"], ids["swap"]) if v in emu.fake.resources()["volumes"]]
    assert len(remaining) == 1
    assert cli.main(["gc", "--vm-type", "openstack", "--min-age", "0", "--log-format", "json"]) == 0
    assert emu.tagged() == {"servers": [], "volumes": []}


def test_gc_dry_run_changes_nothing(emu: Emulation, api: Api) -> None:
    ids = leftovers(api, owner="0b9a1f6e-dead-4c6e-9f5e-000000000000")
    adapter = gc_adapter(api=api)
    assert len(sweep(adapter, min_age=0, dry_run=True).marked) == 3
    assert TAG_GC_SEEN not in emu.fake.server(ids["server"]).metadata
    sweep(adapter, min_age=0)
    sweep(adapter, min_age=0)


def test_adapter_lists_only_tagged_resources(emu: Emulation, api: Api) -> None:
    ids = leftovers(api, owner="0b9a1f6e-dead-4c6e-9f5e-000000000000")
    api.conn.block_storage.create_volume(size=1, name="not-ours")
    listed = {(r.kind, r.id) for r in OpenStackGc(api).list_resources()}
    assert listed == {("server", ids["server"]), ("volume", ids["root"]), ("volume", ids["swap"])}
    sweep(OpenStackGc(api), min_age=0)
    sweep(OpenStackGc(api), min_age=0)


BUILD_SCRIPT = """
import json, sys
from pathlib import Path
from cloudbuild.build import BuildJob, run_build
from tests.fakes.console import RecordingConsole
from tests.fakes.hoststeps import FakeHostSteps
from tests.cloud.openstack_emulation import make_backend
cfg = json.loads(sys.argv[1])
backend = make_backend(cfg["metadata"], Path(cfg["dev"]), Path(cfg["state"]))
run_build(BuildJob("killed", Path(cfg["out"]), Path(cfg["work"])), backend, FakeHostSteps(), RecordingConsole())
"""


@pytest.mark.parametrize("worker_fate", ["worker server gone", "worker restarted, lease expired"])
def test_worker_killed_mid_build_is_cleaned_up_by_the_next_gc(
    emu: Emulation, api: Api, tmp_path: Path, worker_fate: str
) -> None:
    release = threading.Event()

    def never_finishes(server_id: str, disks: list[Path], e: Emulation) -> None:
        e.fake.append_console(server_id, "building for ever\n")
        release.wait(30)

    emu.guest = never_finishes
    cfg = {
        "metadata": emu.fake.metadata_url,
        "dev": str(emu.dev_root),
        "state": str(tmp_path / "state"),
        "out": str(tmp_path / "out"),
        "work": str(tmp_path / "work"),
    }
    env = dict(os.environ, PYTHONPATH=str(REPO))
    worker = spawn([sys.executable, "-c", BUILD_SCRIPT, json.dumps(cfg)], env=env, cwd=REPO)
    try:
        wait_for(lambda: bool(emu.booted), what="the builder to boot", timeout=60, interval=0.05)
        wait_for(
            lambda: emu.fake.calls_matching("POST", r"/action$"),
            what="console polling",
            timeout=30,
            interval=0.05,
        )
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(10)
    finally:
        terminate(worker)
        release.set()
    left = emu.tagged()
    assert len(left["servers"]) == 1 and len(left["volumes"]) == 2, "the kill left the build's resources"

    adapter = gc_adapter(api=api)
    now = None
    if worker_fate == "worker server gone":
        emu.fake.vanish_server(emu.fake.worker_server_id)
    else:
        now = utcnow() + dt.timedelta(days=2)
    assert len(sweep(adapter, min_age=0, now=now).marked) == 3
    report = sweep(adapter, min_age=0, now=now)
    assert report.ok, report.failed
    assert len(report.deleted) == 3
