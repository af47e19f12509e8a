"""The OpenStack backend against the fake cloud over real HTTP: the build flow and its failures.

Every test runs a real openstacksdk against `tests/fakes/openstack.py`; volumes are image files
and "udev" links them under a private /dev while they are attached to the worker
(`tests/cloud/openstack_emulation.py`). After every test no cloudbuild-tagged server or volume
may be left in the cloud.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import cloudbuild.retry
from cloudbuild.backend import KILL_MARKER, BuildSlot
from cloudbuild.build import BuildJob, run_build
from cloudbuild.cloud.base import AttachHealth
from cloudbuild.cloud.common import sweep, utcnow
from cloudbuild.cloud.openstack.backend import OpenStackBackend
from cloudbuild.cloud.openstack.builder import TAG_ROOT_VOLUME, TAG_SWAP_VOLUME
from cloudbuild.cloud.openstack.gc import gc_adapter
from cloudbuild.commands.kill import kill_slot
from cloudbuild.errors import ExitCode, HostBroken, InfraError, UsageError
from cloudbuild.retry import wait_for
from cloudbuild.volume import TAG_BUILD, TAG_EXPIRES, TAG_OWNER, TAG_ROLE, TAG_SLOT, VolumeState
from tests.cloud.openstack_emulation import Emulation, make_backend, scripted_guest
from tests.fakes import timings
from tests.fakes.console import RecordingConsole
from tests.fakes.hoststeps import FakeHostSteps
from tests.fakes.openstack import FakeOpenStack, FakeVolume

# fast_sleeps, and emu: after every test no cloudbuild-tagged server or volume is left in the
# cloud and nothing is attached here (tests/cloud/openstack_fixtures.py).
pytestmark = pytest.mark.usefixtures("fast_sleeps", "emu")
EMULATION_GUEST = scripted_guest(0)


def backend_for(emu: Emulation, tmp_path: Path, **options: Any) -> OpenStackBackend:
    return make_backend(emu.fake.metadata_url, emu.dev_root, tmp_path / "state", **options)


def build(emu: Emulation, tmp_path: Path, **options: Any) -> tuple[Any, RecordingConsole]:
    sink = RecordingConsole()
    job = BuildJob(build_id="b1", dest=tmp_path / "out", workdir=tmp_path / "work")
    outcome = run_build(job, backend_for(emu, tmp_path, **options), FakeHostSteps(), sink)
    return outcome, sink


# -- the flow --------------------------------------------------------------------------------------


def test_build_runs_on_a_builder_server_and_leaves_nothing_behind(emu: Emulation, tmp_path: Path) -> None:
    outcome, sink = build(emu, tmp_path)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    assert (tmp_path / "out" / "root-head").read_bytes() == b"ROOT"
    assert b"BUILDSTATUS written" in sink.data
    assert len(emu.booted) == 1
    assert set(outcome.phases) >= {"verify", "volumes", "prepare", "boot", "status", "extract", "cleanup"}


def test_stale_kill_marker_of_an_earlier_build_does_not_fail_this_one(emu: Emulation, tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / KILL_MARKER).write_text("killed\n")  # an earlier build's kill, kept --root
    outcome, _ = build(emu, tmp_path)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    assert (tmp_path / "out" / "root-head").read_bytes() == b"ROOT"


def test_builder_gets_the_volumes_as_block_devices_no_network_and_a_boot_hook(
    emu: Emulation, tmp_path: Path
) -> None:
    seen: dict[str, Any] = {}

    def guest(server_id: str, disks: list[Path], e: Emulation) -> str:
        s = e.fake.server(server_id)
        seen.update(
            bdms=[(b.volume_id, b.boot_index not in (None, -1), b.delete_on_termination) for b in s.bdms],
            networks=s.networks,
            user_data=s.user_data,
            metadata=dict(s.metadata),
            image=s.image.name if s.image else None,
            flavor=s.flavor.name,
            volumes={v.id: dict(v.metadata) for v in e.fake.cloud.volumes.values()},
        )
        return scripted_guest(0)(server_id, disks, e)

    emu.guest = guest
    outcome, _ = build(emu, tmp_path, vm_memory=3000, jobs=2)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    roles = {meta[TAG_ROLE]: vid for vid, meta in seen["volumes"].items()}
    # (volume, bootable, delete_on_termination): the image boots; the volumes outlive the server
    assert seen["bdms"] == [(roles["root"], False, False), (roles["swap"], False, False)]
    assert seen["networks"] == "none"
    assert seen["image"] == "cirros"
    assert seen["flavor"] == "m1.medium"  # the smallest with 2 vCPUs and 3000 MiB
    hook = seen["user_data"].decode()
    assert hook.startswith("#!/bin/sh")
    # the hook carries no volume ids (a pool builder keeps its user data): the metadata has them
    assert roles["root"] not in hook and roles["swap"] not in hook
    assert (seen["metadata"][TAG_ROOT_VOLUME], seen["metadata"][TAG_SWAP_VOLUME]) == (
        roles["root"],
        roles["swap"],
    )
    assert "python3 -m cloudbuild.guest.agent" in hook and "--fstype ext4" in hook
    worker = emu.fake.worker_server_id
    for meta in [seen["metadata"], *seen["volumes"].values()]:
        assert meta[TAG_OWNER] == worker and meta[TAG_BUILD] == "b1" and meta[TAG_SLOT] == "0"
        assert meta[TAG_EXPIRES].endswith("Z")
    assert seen["metadata"][TAG_ROLE] == "builder"


def test_vm_worker_names_the_builder_as_in_obs_build(emu: Emulation, tmp_path: Path) -> None:
    names: list[str] = []

    def guest(server_id: str, disks: list[Path], e: Emulation) -> str | None:
        names.append(e.fake.server(server_id).name)
        return scripted_guest(0)(server_id, disks, e)

    emu.guest = guest
    outcome, _ = build(emu, tmp_path, vm_worker="obs-worker-7")
    assert outcome.exit_code == ExitCode.OK, outcome.message
    assert names == ["obs-worker-7"]


def test_explicit_flavor_is_used_and_a_guest_without_status_is_exit_3(emu: Emulation, tmp_path: Path) -> None:
    flavors: list[str] = []
    emu.guest = lambda sid, disks, e: (flavors.append(e.fake.server(sid).flavor.name), "")[1]
    outcome, _ = build(emu, tmp_path, openstack_flavor="m1.large")
    assert flavors == ["m1.large"]
    assert outcome.exit_code == ExitCode.INFRA  # that guest left no status
    assert "no build status" in outcome.message


def test_console_is_streamed_once_in_order(emu: Emulation, tmp_path: Path) -> None:
    lines = [f"line {i}\n" for i in range(500)] + ["same\n"] * 50 + ["last words"]

    def guest(server_id: str, disks: list[Path], e: Emulation) -> str:
        for chunk in range(0, 500, 50):
            e.fake.append_console(server_id, "".join(lines[chunk : chunk + 50]))
            time.sleep(0.03)
        return scripted_guest(0)(server_id, disks, e) and "".join(lines[500:])

    emu.guest = guest
    outcome, sink = build(emu, tmp_path)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    assert sink.data == ("".join(lines) + "\n").encode()


def test_build_failure_status_is_exit_1(emu: Emulation, tmp_path: Path) -> None:
    emu.guest = scripted_guest(1)
    outcome, _ = build(emu, tmp_path)
    assert outcome.exit_code == ExitCode.BUILD_FAILED


def test_worker_id_comes_from_vm_server_without_the_metadata_service(emu: Emulation, tmp_path: Path) -> None:
    backend = make_backend(
        "http://127.0.0.1:9", emu.dev_root, tmp_path / "state", vm_server=emu.fake.worker_server_id
    )
    assert backend.worker == emu.fake.worker_server_id
    assert not emu.fake.calls_matching("GET", "meta_data")


def test_connection_from_os_variables_without_clouds_yaml(
    emu: Emulation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("OS_CLOUD", "OS_CLIENT_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(tmp_path / "no-such-clouds.yaml"))
    for name, value in emu.fake.os_environ().items():
        monkeypatch.setenv(name, value)
    outcome, _ = build(emu, tmp_path)
    assert outcome.exit_code == ExitCode.OK, outcome.message


def test_missing_credentials_are_exit_3_with_the_fix(
    emu: Emulation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in [v for v in os.environ if v.startswith("OS_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(tmp_path / "no-such-clouds.yaml"))
    outcome, _ = build(emu, tmp_path)
    assert outcome.exit_code == ExitCode.INFRA
    assert "OS_CLOUD" in outcome.message


def test_worker_id_comes_from_the_metadata_service(emu: Emulation, tmp_path: Path) -> None:
    assert backend_for(emu, tmp_path).worker == emu.fake.worker_server_id


def test_metadata_service_unreachable_says_how_to_fix(emu: Emulation, tmp_path: Path) -> None:
    backend = make_backend("http://127.0.0.1:9", emu.dev_root, tmp_path / "state")
    with pytest.raises(UsageError, match="--vm-server"):
        _ = backend.worker


def test_verify_needs_the_builder_image(emu: Emulation, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--vm-kernel"):
        backend_for(emu, tmp_path, vm_kernel=None).verify()
    with pytest.raises(UsageError, match="no image named"):
        backend_for(emu, tmp_path, vm_kernel="nosuchimage").verify()
    with pytest.raises(UsageError, match="no flavor"):
        backend_for(emu, tmp_path, openstack_flavor="m9.huge").verify()
    with pytest.raises(UsageError, match="network's id"):
        backend_for(emu, tmp_path, openstack_network="build-net").verify()
    with pytest.raises(UsageError, match="no OpenStack flavor has 64 vCPUs"):
        backend_for(emu, tmp_path, jobs=64).verify()
    outcome, _ = build(emu, tmp_path, vm_kernel="nosuchimage")
    assert outcome.exit_code == ExitCode.BUILD_FAILED
    assert emu.booted == []


def test_supplied_volumes_are_wiped_used_and_kept(
    emu: Emulation, openstack_fake: FakeOpenStack, tmp_path: Path
) -> None:
    conn = backend_for(emu, tmp_path).api.conn
    root = conn.block_storage.create_volume(size=1, name="obs-root")
    swap = conn.block_storage.create_volume(size=1, name="obs-swap")
    openstack_fake.settle()
    for vid in (root.id, swap.id):
        with open(emu.image(vid), "r+b") as f:
            f.seek(4096)
            f.write(b"residue of an old build")
    outcome, _ = build(emu, tmp_path, vm_volume_root="obs-root", vm_volume_swap=swap.id)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    for vid in (root.id, swap.id):
        assert openstack_fake.volume(vid).status == "available"  # kept, detached
        with open(emu.image(vid), "rb") as f:
            f.seek(4096)
            assert f.read(23) == b"\0" * 23  # wiped before use
    assert len(openstack_fake.resources()["volumes"]) == 2


def test_supplied_volume_attached_to_another_server_is_refused_untouched(
    emu: Emulation, openstack_fake: FakeOpenStack, tmp_path: Path
) -> None:
    conn = backend_for(emu, tmp_path).api.conn
    root = conn.block_storage.create_volume(size=1, name="obs-root")
    swap = conn.block_storage.create_volume(size=1, name="obs-swap")
    emu.guest = None  # the other server is no builder of ours
    other = conn.compute.create_server(
        name="someone-else", flavor_id="2", networks="none", image_id=openstack_fake.cloud.images[0].id
    )
    openstack_fake.settle()
    conn.compute.create_volume_attachment(other, volume_id=swap.id)
    openstack_fake.settle()
    with open(emu.image(swap.id), "r+b") as f:
        f.write(b"the other server's data")
    emu.guest = EMULATION_GUEST
    outcome, _ = build(emu, tmp_path, vm_volume_root="obs-root", vm_volume_swap="obs-swap")
    assert outcome.exit_code == ExitCode.INFRA
    assert f"attached to server {other.id}" in outcome.message and "must be free" in outcome.message
    assert emu.booted == []
    assert openstack_fake.volume(swap.id).attached_to[0] == other.id  # not taken away
    assert emu.image(swap.id).read_bytes()[:23] == b"the other server's data"  # never wiped
    conn.compute.delete_server(other)
    openstack_fake.settle()
    for volume in (root, swap):
        conn.block_storage.delete_volume(volume)


def test_unknown_supplied_volume_is_a_usage_error(emu: Emulation, tmp_path: Path) -> None:
    outcome, _ = build(emu, tmp_path, vm_volume_root="nosuchvolume", vm_volume_swap="nosuchswap")
    assert outcome.exit_code == ExitCode.BUILD_FAILED
    assert "nosuchvolume" in outcome.message


def test_volume_that_flips_back_to_available_is_attached_again(
    emu: Emulation, openstack_fake: FakeOpenStack, tmp_path: Path
) -> None:
    emu.on_volume = lambda vol: setattr(vol, "fail_next_attach", True)
    outcome, _ = build(emu, tmp_path)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    attaches = openstack_fake.calls_matching("POST", r"/os-volume_attachments$")
    # prepare: root twice, swap twice (each rolled back once); status: swap; extract: root
    assert len(attaches) == 6
    assert all(c.status == 200 for c in attaches)


# -- failures --------------------------------------------------------------------------------------


def test_5xx_and_connection_resets_are_retried(
    emu: Emulation, openstack_fake: FakeOpenStack, tmp_path: Path
) -> None:
    openstack_fake.inject("POST", r"/volume/v3/[^/]+/volumes$", status=503, times=2)
    openstack_fake.inject_reset("POST", r"/os-volume_attachments$", times=1)
    openstack_fake.inject("POST", r"/compute/v2\.1/servers$", status=500, times=1)
    openstack_fake.inject_reset("GET", r"/compute/v2\.1/servers/[^/]+$", times=2)
    openstack_fake.inject("POST", r"/action$", status=502, times=1)
    openstack_fake.inject("DELETE", r"/volumes/[^/]+$", status=504, times=1)
    outcome, _ = build(emu, tmp_path)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    assert all(f.times == 0 for f in openstack_fake.faults), "every injected fault was met"
    assert len(emu.booted) == 1  # the 500 on create did not make a second server


def test_lost_answers_are_adopted_not_repeated(
    emu: Emulation, openstack_fake: FakeOpenStack, tmp_path: Path
) -> None:
    """The answer lost after the cloud did the work: the retry finds the volume, server or
    attachment instead of leaking a second one or failing on "already attached"."""
    dispatch = openstack_fake.dispatch
    lost: list[str] = []
    kinds = {
        "create volume": ("POST", r"/volumes$"),
        "create server": ("POST", r"/servers$"),
        "attach": ("POST", r"/os-volume_attachments$"),
        "detach": ("DELETE", r"/os-volume_attachments/[^/]+$"),
        "delete volume": ("DELETE", r"/volumes/[^/]+$"),
    }

    def lose_first_answer(method: str, target: str, headers: dict[str, str], raw: bytes) -> Any:
        reply = dispatch(method, target, headers, raw)
        for kind, (verb, pattern) in kinds.items():
            done = reply is not None and reply.status in (200, 202)
            if method == verb and re.search(pattern, target) and done and kind not in lost:
                lost.append(kind)
                return None  # the work is done, the answer is lost
        return reply

    openstack_fake.dispatch = lose_first_answer  # type: ignore[method-assign]
    outcome, _ = build(emu, tmp_path)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    assert sorted(lost) == sorted(kinds) and len(emu.booted) == 1


def test_api_down_for_longer_than_the_retry_deadline_is_exit_3(
    emu: Emulation, openstack_fake: FakeOpenStack, tmp_path: Path
) -> None:
    backend = backend_for(emu, tmp_path)
    backend.api.policy = cloudbuild.retry.Policy(deadline=1, initial=0.01, maximum=0.01, attempts=3)
    openstack_fake.inject("POST", r"/volume/v3/[^/]+/volumes$", status=503, times=10)
    sink = RecordingConsole()
    outcome = run_build(BuildJob("b1", tmp_path / "out", tmp_path / "work"), backend, FakeHostSteps(), sink)
    assert outcome.exit_code == ExitCode.INFRA
    assert "kept failing" in outcome.message
    openstack_fake.faults.clear()


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", r"/compute/v2\.1/servers$", 403),  # Nova: instances quota
        ("POST", r"/compute/v2\.1/servers$", 413),  # Nova: cores quota
        ("POST", r"/volume/v3/[^/]+/volumes$", 413),  # Cinder: volumes quota
    ],
)
def test_quota_refusal_is_exit_3_and_leaves_nothing(
    emu: Emulation, openstack_fake: FakeOpenStack, tmp_path: Path, method: str, path: str, status: int
) -> None:
    openstack_fake.inject_quota(method, path, status=status)
    outcome, _ = build(emu, tmp_path)
    assert outcome.exit_code == ExitCode.INFRA
    assert f"HTTP {status}" in outcome.message and "quota" in outcome.message
    assert emu.booted == []


def test_real_quota_exhaustion_is_exit_3(
    emu: Emulation, openstack_fake: FakeOpenStack, tmp_path: Path
) -> None:
    openstack_fake.cloud.quotas.volumes = 1
    outcome, _ = build(emu, tmp_path)
    assert outcome.exit_code == ExitCode.INFRA
    assert "VolumeLimitExceeded" in outcome.message


def test_server_in_error_is_exit_3_and_is_deleted(emu: Emulation, tmp_path: Path) -> None:
    def guest(server_id: str, disks: list[Path], e: Emulation) -> None:
        e.fake.set_server_error(server_id, "No valid host was found.")

    emu.guest = guest
    outcome, _ = build(emu, tmp_path)
    assert outcome.exit_code == ExitCode.INFRA
    assert "ERROR" in outcome.message and "No valid host" in outcome.message


def test_builder_that_disappears_is_exit_3(emu: Emulation, tmp_path: Path) -> None:
    def guest(server_id: str, disks: list[Path], e: Emulation) -> None:
        e.fake.vanish_server(server_id)

    emu.guest = guest
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / KILL_MARKER).write_text("killed\n")  # left by a kill of an earlier build
    outcome, _ = build(emu, tmp_path)
    assert outcome.exit_code == ExitCode.INFRA
    assert "disappeared" in outcome.message


def test_build_timeout_kills_the_builder_and_is_exit_3(emu: Emulation, tmp_path: Path) -> None:
    def guest(server_id: str, disks: list[Path], e: Emulation) -> None:
        e.fake.append_console(server_id, "stuck forever\n")

    emu.guest = guest
    sink = RecordingConsole()
    job = BuildJob("b1", tmp_path / "out", tmp_path / "work")
    job = BuildJob(job.build_id, job.dest, job.workdir, limits=type(job.limits)(boot=1.0))
    outcome = run_build(job, backend_for(emu, tmp_path), FakeHostSteps(), sink)
    assert outcome.exit_code == ExitCode.INFRA
    assert "deadline" in outcome.message
    assert b"stuck forever" in sink.data


def _stuck_on_first_attach(status: str) -> Any:
    """An Emulation.on_volume hook: the first volume created never leaves `status`."""
    stuck: list[str] = []

    def hook(vol: FakeVolume) -> None:
        if not stuck:
            stuck.append(vol.id)
            vol.stuck_in.add(status)

    return hook


def _unstick(fake: FakeOpenStack, backend_api: Any, volume_ids: list[str]) -> None:
    """Let the stuck volume go and delete what the failed build could not."""
    for vid in volume_ids:
        fake.release_volume(vid)
    fake.settle()
    for vid in volume_ids:
        vol = fake.volume(vid)
        if vol.attached_to is not None:
            backend_api.conn.compute.delete_volume_attachment(vol.attached_to[0], vid)
    fake.settle()
    for vid in volume_ids:
        backend_api.conn.block_storage.delete_volume(vid)
    fake.settle()


def test_volume_stuck_attaching_is_exit_3_then_4_on_the_same_worker(
    emu: Emulation, openstack_fake: FakeOpenStack, tmp_path: Path
) -> None:
    for attempt, expected in ((1, ExitCode.INFRA), (2, ExitCode.HOST_BROKEN)):
        emu.on_volume = _stuck_on_first_attach("attaching")
        backend = backend_for(emu, tmp_path)
        outcome = run_build(
            BuildJob(f"b{attempt}", tmp_path / "out", tmp_path / "work"),
            backend,
            FakeHostSteps(),
            RecordingConsole(),
        )
        assert outcome.exit_code == expected, outcome.message
        assert "stuck in 'attaching'" in outcome.message
        _unstick(openstack_fake, backend.api, [v.id for v in openstack_fake.cloud.volumes.values()])
    health = AttachHealth(openstack_fake.worker_server_id, tmp_path / "state")
    assert health.count() == 2
    emu.on_volume = None
    outcome, _ = build(emu, tmp_path)  # a good build on this worker clears the count
    assert outcome.exit_code == ExitCode.OK
    assert health.count() == 0


def test_volume_stuck_detaching_is_exit_3(
    emu: Emulation, openstack_fake: FakeOpenStack, tmp_path: Path
) -> None:
    emu.on_volume = _stuck_on_first_attach("detaching")
    backend = backend_for(emu, tmp_path)
    outcome = run_build(
        BuildJob("b1", tmp_path / "out", tmp_path / "work"), backend, FakeHostSteps(), RecordingConsole()
    )
    assert outcome.exit_code == ExitCode.INFRA
    assert "stuck in 'detaching'" in outcome.message
    _unstick(openstack_fake, backend.api, [v.id for v in openstack_fake.cloud.volumes.values()])


def test_stuck_volume_repeating_raises_host_broken_directly(
    emu: Emulation, openstack_fake: FakeOpenStack, tmp_path: Path
) -> None:
    backend = backend_for(emu, tmp_path)
    backend.verify()
    pair = backend.volumes(BuildSlot("b1", 0, tmp_path))
    created = []
    try:
        for volume, error in ((pair.root, InfraError), (pair.swap, HostBroken)):
            volume.create()
            created.append(volume.id)
            openstack_fake.stick_volume(volume.id, "attaching")
            with pytest.raises(error, match="stuck in 'attaching'"):
                volume.attach()
    finally:
        _unstick(openstack_fake, backend.api, created)


def test_tokens_expiring_mid_build_are_renewed(
    emu: Emulation, openstack_fake: FakeOpenStack, tmp_path: Path
) -> None:
    def guest(server_id: str, disks: list[Path], e: Emulation) -> str | None:
        e.fake.expire_tokens()
        return scripted_guest(0)(server_id, disks, e)

    emu.guest = guest
    outcome, _ = build(emu, tmp_path)
    assert outcome.exit_code == ExitCode.OK, outcome.message


def test_boot_hook_mounts_the_chosen_filesystem(emu: Emulation, tmp_path: Path) -> None:
    hooks: list[bytes] = []

    def guest(server_id: str, disks: list[Path], e: Emulation) -> str | None:
        hooks.append(e.fake.server(server_id).user_data or b"")
        return scripted_guest(0)(server_id, disks, e)

    emu.guest = guest
    outcome, _ = build(emu, tmp_path, filesystem="xfs")
    assert outcome.exit_code == ExitCode.OK
    assert b"--fstype xfs --mount-options noatime" in hooks[0]


def _build_in_background(emu: Emulation, tmp_path: Path, backend: OpenStackBackend) -> tuple[Any, Any]:
    results: list[Any] = []
    job = BuildJob("b1", tmp_path / "out", tmp_path / "work")
    job.workdir.mkdir(exist_ok=True)
    thread = threading.Thread(
        target=lambda: results.append(run_build(job, backend, FakeHostSteps(), RecordingConsole()))
    )
    thread.start()
    wait_for(lambda: bool(emu.booted), what="the builder to boot", timeout=30, interval=0.02)
    return thread, results


def _never_finishing(release: threading.Event) -> Any:
    def guest(server_id: str, disks: list[Path], e: Emulation) -> None:
        e.fake.append_console(server_id, "working...\n")
        release.wait(30)

    return guest


def test_cloudbuild_kill_from_another_process_fails_the_build(emu: Emulation, tmp_path: Path) -> None:
    release = threading.Event()
    emu.guest = _never_finishing(release)
    try:
        thread, results = _build_in_background(emu, tmp_path, backend_for(emu, tmp_path))
        killer = backend_for(emu, tmp_path)  # what `cloudbuild kill --vm-type openstack --build-id b1` builds
        kill_slot(killer, BuildSlot("b1", 0, tmp_path / "work"))
        thread.join(30)
    finally:
        release.set()
    (outcome,) = results
    assert outcome.exit_code == ExitCode.BUILD_FAILED, outcome.message  # BUILDSTATUS1, nothing extracted
    assert not (tmp_path / "out").exists()


def test_backend_kill_in_the_building_process_fails_the_build(emu: Emulation, tmp_path: Path) -> None:
    release = threading.Event()
    emu.guest = _never_finishing(release)
    backend = backend_for(emu, tmp_path)
    try:
        thread, results = _build_in_background(emu, tmp_path, backend)
        backend.kill()
        thread.join(30)
    finally:
        release.set()
    (outcome,) = results
    assert outcome.exit_code == ExitCode.BUILD_FAILED, outcome.message


def test_console_trouble_never_fails_the_build(
    emu: Emulation, openstack_fake: FakeOpenStack, tmp_path: Path
) -> None:
    openstack_fake.inject("POST", r"/action$", status=409, times=3)  # e.g. "instance not ready"
    outcome, sink = build(emu, tmp_path)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    assert b"BUILDSTATUS written" in sink.data  # the final fetch got it all


def test_builder_gone_after_a_kill_marker_is_a_kill_not_a_crash(emu: Emulation, tmp_path: Path) -> None:
    release = threading.Event()
    emu.guest = _never_finishing(release)
    try:
        thread, results = _build_in_background(emu, tmp_path, backend_for(emu, tmp_path))
        (tmp_path / "work" / KILL_MARKER).write_text("killed\n")
        emu.fake.vanish_server(emu.booted[0])  # e.g. deleted by an operator's `openstack server delete`
        thread.join(30)
    finally:
        release.set()
    (outcome,) = results
    assert outcome.exit_code == ExitCode.BUILD_FAILED, outcome.message


def test_volume_states_follow_cinder(emu: Emulation, tmp_path: Path) -> None:
    backend = backend_for(emu, tmp_path)
    backend.verify()
    root = backend.volumes(BuildSlot("b1", 0, tmp_path)).root
    assert root.state() == VolumeState.ABSENT and root.id == "cloudbuild-b1-0-root"
    root.create()
    assert root.state() == VolumeState.AVAILABLE
    device = root.attach()
    assert device is not None and device == emu.image(root.id)
    assert root.attach() == device  # idempotent
    assert root.state() == VolumeState.ATTACHED
    root.release()
    root.release()  # idempotent
    assert root.state() == VolumeState.ABSENT


def test_builder_that_will_not_go_away_is_exit_3_and_gc_takes_it_later(
    emu: Emulation, openstack_fake: FakeOpenStack, tmp_path: Path
) -> None:
    def guest(server_id: str, disks: list[Path], e: Emulation) -> str | None:
        e.fake.stick_server(server_id, "deleting")
        return scripted_guest(0)(server_id, disks, e)

    emu.guest = guest
    timeouts = dataclasses.replace(timings.OPENSTACK, delete=1)
    backend = make_backend(emu.fake.metadata_url, emu.dev_root, tmp_path / "state", timeouts=timeouts)
    outcome = run_build(
        BuildJob("b1", tmp_path / "out", tmp_path / "work"), backend, FakeHostSteps(), RecordingConsole()
    )
    assert outcome.exit_code == ExitCode.INFRA
    assert "deleted" in outcome.message
    left = emu.tagged()
    assert len(left["servers"]) == 1  # still deleting: the volumes it holds could not be deleted either
    openstack_fake.release_server(left["servers"][0])
    adapter = gc_adapter(api=backend.api)
    later = utcnow() + dt.timedelta(days=2)
    sweep(adapter, min_age=0, now=later)
    report = sweep(adapter, min_age=0, now=later)
    assert report.ok, report.failed


def test_volume_that_fails_to_create_is_exit_3_and_is_deleted(emu: Emulation, tmp_path: Path) -> None:
    def broken(vol: FakeVolume) -> None:
        vol.begin(lambda: vol.set_status("error"))  # the backend could not allocate it

    emu.on_volume = broken
    outcome, _ = build(emu, tmp_path)
    assert outcome.exit_code == ExitCode.INFRA
    assert "status 'error'" in outcome.message
