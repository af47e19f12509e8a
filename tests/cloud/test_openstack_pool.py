"""`--openstack-pool N`: stopped builder servers reused across builds, against the fake over HTTP.

A builder that powered itself off gives its volumes back and stays, stopped, tagged as an idle
member of its worker's pool (no build, renewed lease, no volume ids); the next build claims it,
tags it with its build and volume ids (which the boot hook reads at every boot) and starts it.
A builder whose run did not end in its own power-off is deleted, and the pool never grows past N.
"""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from typing import Any

import pytest

from cloudbuild.build import BuildJob, PhaseLimits, run_build
from cloudbuild.cloud.common import TAG_POOL, parse_time, sweep, utcnow
from cloudbuild.cloud.openstack.api import Api, connect
from cloudbuild.cloud.openstack.builder import TAG_ROOT_VOLUME, TAG_SWAP_VOLUME, Builder
from cloudbuild.cloud.openstack.gc import OpenStackGc
from cloudbuild.errors import ExitCode
from cloudbuild.volume import TAG_BUILD, TAG_EXPIRES, TAG_OWNER, TAG_ROLE
from tests.cloud.openstack_emulation import Emulation, make_backend, scripted_guest
from tests.fakes import timings
from tests.fakes.console import RecordingConsole
from tests.fakes.hoststeps import FakeHostSteps

# fast_sleeps, and emu: after every test no cloudbuild-tagged server or volume is left (each test
# empties the pool at its end) and nothing is attached here (tests/cloud/openstack_fixtures.py).
pytestmark = pytest.mark.usefixtures("fast_sleeps", "emu")
EMULATION_GUEST = scripted_guest(0, console="building...\nBUILDSTATUS written\n")


def build(
    emu: Emulation, tmp_path: Path, build_id: str, *, boot: float | None = None, **options: Any
) -> tuple[Any, RecordingConsole]:
    sink = RecordingConsole()
    limits = PhaseLimits(boot=boot) if boot is not None else PhaseLimits()
    out, work = tmp_path / f"out-{build_id}", tmp_path / f"work-{build_id}"
    job = BuildJob(build_id=build_id, dest=out, workdir=work, limits=limits)
    backend = make_backend(emu.fake.metadata_url, emu.dev_root, tmp_path / "state", **options)
    return run_build(job, backend, FakeHostSteps(), sink), sink


def servers(emu: Emulation) -> dict[str, tuple[str, dict[str, str], list[str]]]:
    """Builder servers still in the cloud: id -> (status, metadata, attached volume ids)."""
    with emu.fake.lock:
        return {
            s.id: (s.status, dict(s.metadata), [b.volume_id for b in s.bdms])
            for s in emu.fake.cloud.servers.values()
            if s.id != emu.fake.worker_server_id
        }


def drain_pool(emu: Emulation) -> None:
    api = Api(connect(), timeouts=timings.OPENSTACK)
    try:
        for server_id in servers(emu):
            builder = Builder(api, name=server_id)
            builder.id = server_id
            builder.delete()
    finally:
        api.close()


def test_a_builder_that_powered_off_is_pooled_and_claimed_by_the_next_build(
    emu: Emulation, tmp_path: Path
) -> None:
    first, _ = build(emu, tmp_path, "b1", openstack_pool=1)
    assert first.exit_code == ExitCode.OK, first.message
    ((pooled, (status, meta, attached)),) = servers(emu).items()
    worker = emu.fake.worker_server_id
    # idle member: stopped, no volumes, no build, its worker's pool, a renewed lease
    assert (status, attached) == ("SHUTOFF", [])
    assert (meta[TAG_POOL], meta[TAG_OWNER], meta[TAG_BUILD]) == (worker, worker, "")
    assert TAG_ROOT_VOLUME not in meta and TAG_SWAP_VOLUME not in meta
    lease = parse_time(meta[TAG_EXPIRES])
    assert lease is not None and lease > utcnow() + dt.timedelta(days=1)
    assert not [v for v in emu.fake.cloud.volumes.values() if v.metadata.get(TAG_BUILD)]  # volumes gone

    during: dict[str, str] = {}

    def guest(server_id: str, disks: list[Path], e: Emulation) -> str | None:  # the claimed builder, b2
        during.update(e.fake.server(server_id).metadata)
        during["volumes"] = " ".join(b.volume_id for b in e.fake.server(server_id).bdms)
        return scripted_guest(0, console="b2 builds\n")(server_id, disks, e)

    emu.guest = guest
    second, console = build(emu, tmp_path, "b2", openstack_pool=1)
    assert second.exit_code == ExitCode.OK, second.message
    assert emu.booted == [pooled, pooled]  # the same server, booted again: no second create
    assert (during[TAG_BUILD], during[TAG_ROLE], during[TAG_POOL]) == ("b2", "builder", worker)
    assert during["volumes"] == f"{during[TAG_ROOT_VOLUME]} {during[TAG_SWAP_VOLUME]}"
    claimed_lease = parse_time(during[TAG_EXPIRES])
    assert claimed_lease is not None and claimed_lease > utcnow()
    # b2's log is b2's console only, not the earlier build's lines the server's console still holds
    assert b"b2 builds" in console.data and b"BUILDSTATUS written" not in console.data
    assert list(servers(emu)) == [pooled] and servers(emu)[pooled][1][TAG_BUILD] == ""
    drain_pool(emu)


def test_the_pool_never_grows_past_its_size(emu: Emulation, tmp_path: Path) -> None:
    # a member busy with another build of this worker: not claimable, but it fills the pool of 1
    api = Api(connect(), timeouts=timings.OPENSTACK)
    worker = emu.fake.worker_server_id
    member = api.conn.compute.create_server(
        name="member",
        image_id=emu.fake.cloud.images[0].id,
        flavor_id=emu.fake.cloud.flavors[0].id,
        networks="none",
        metadata={TAG_OWNER: worker, TAG_POOL: worker, TAG_BUILD: "other"},
    )
    api.close()
    outcome, _ = build(emu, tmp_path, "b1", openstack_pool=1)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    assert list(servers(emu)) == [member.id]  # b1's builder was deleted, not pooled
    drain_pool(emu)


def test_a_builder_whose_run_timed_out_is_deleted_not_pooled(emu: Emulation, tmp_path: Path) -> None:
    release = threading.Event()

    def hang(server_id: str, disks: list[Path], e: Emulation) -> str | None:
        release.wait(10)
        return None  # never powers off

    emu.guest = hang
    try:
        outcome, _ = build(emu, tmp_path, "b1", openstack_pool=2, boot=1.0)
    finally:
        release.set()
    assert outcome.exit_code == ExitCode.INFRA, outcome.message
    assert servers(emu) == {}


def test_a_builder_that_crashed_is_deleted_not_pooled(emu: Emulation, tmp_path: Path) -> None:
    def crash(server_id: str, disks: list[Path], e: Emulation) -> str | None:
        e.fake.set_server_error(server_id)
        return None

    emu.guest = crash
    outcome, _ = build(emu, tmp_path, "b1", openstack_pool=2)
    assert outcome.exit_code == ExitCode.INFRA, outcome.message
    assert servers(emu) == {}


def test_gc_keeps_the_pool_of_a_live_worker_and_sweeps_that_of_a_dead_one(
    emu: Emulation, tmp_path: Path
) -> None:
    outcome, _ = build(emu, tmp_path, "b1", openstack_pool=1)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    ((pooled, _),) = servers(emu).items()
    api = Api(connect(), timeouts=timings.OPENSTACK)
    try:
        adapter = OpenStackGc(api, local_worker=emu.fake.worker_server_id, state_dir=tmp_path / "state")
        for _ in range(2):
            report = sweep(adapter, min_age=0)
            assert pooled in report.kept, report
        # its worker is gone: the member is leaked (marked, then deleted by the next sweep)
        dead = "0dead000-0000-4000-8000-000000000000"
        api.conn.compute.set_server_metadata(pooled, **{TAG_OWNER: dead, TAG_POOL: dead})
        assert pooled in sweep(adapter, min_age=0).marked
        assert pooled in sweep(adapter, min_age=0).deleted
    finally:
        api.close()
    emu.fake.settle()
