"""The OpenStack backend against the fake cloud over real HTTP: the whole build flow."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import cloudbuild.retry
from cloudbuild.backend import Backend
from cloudbuild.build import BuildJob, run_build
from cloudbuild.cloud.openstack import OpenStackBackend
from cloudbuild.cloud.openstack_api import Timeouts
from cloudbuild.deadline import Deadline
from cloudbuild.disk import buildstatus
from cloudbuild.disk.image import zero_head
from cloudbuild.errors import ExitCode
from cloudbuild.options import VmOptions
from tests.cloud.openstack_emulation import Emulation, scripted_guest
from tests.cloud.openstack_fixtures import openstack_cloud_env, openstack_fake  # noqa: F401
from tests.fakes.openstack import FakeOpenStack

FAST = Timeouts(
    volume_ready=10, attach=2, detach=2, device=2, delete=10, poll=0.01, poll_max=0.05, console=0.02
)


class Sink:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


class Steps:
    """Host steps that leave a mark on the root and read the status the guest left on swap."""

    def prepare_root(self, device: Path, backend: Backend, deadline: Deadline) -> None:
        with open(device, "r+b") as f:
            f.write(b"ROOT")

    def reset_swap(self, device: Path, deadline: Deadline) -> None:
        zero_head(device)

    def read_status(self, device: Path) -> int | None:
        return buildstatus.read(device)

    def extract(self, root: Path, swap: Path | None, dest: Path, deadline: Deadline) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "root-head").write_bytes(root.read_bytes()[:4] if root.stat().st_size < 1 << 20 else _head(root))


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


@pytest.fixture(autouse=True)
def fast_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cloudbuild.retry, "_sleep", lambda s: time.sleep(min(s, 0.02)))


@pytest.fixture
def emu(openstack_fake: FakeOpenStack, openstack_cloud_env: str, tmp_path: Path) -> Iterator[Emulation]:  # noqa: F811
    emulation = Emulation(openstack_fake, tmp_path / "host", guest=scripted_guest(0))
    yield emulation
    emulation.join()
    assert not emulation.errors, emulation.errors
    assert emulation.tagged() == {"servers": [], "volumes": []}, "cloudbuild resources leaked"


def backend(fake: FakeOpenStack, emu: Emulation, tmp_path: Path, **options: object) -> OpenStackBackend:
    opts = VmOptions(vm_type="openstack", vm_kernel="cirros", disk_size=1024, swap_size=1024, **options)  # type: ignore[arg-type]
    return OpenStackBackend(
        opts,
        timeouts=FAST,
        dev_root=emu.dev_root,
        state_dir=tmp_path / "state",
        metadata_url=fake.metadata_url + "/openstack/latest/meta_data.json",
    )


def job(tmp_path: Path) -> BuildJob:
    return BuildJob(build_id="b1", dest=tmp_path / "out", workdir=tmp_path / "work")


def test_build_runs_on_a_builder_server_and_leaves_nothing_behind(
    openstack_fake: FakeOpenStack, emu: Emulation, tmp_path: Path  # noqa: F811
) -> None:
    sink = Sink()
    outcome = run_build(job(tmp_path), backend(openstack_fake, emu, tmp_path), Steps(), sink)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    assert (tmp_path / "out" / "root-head").read_bytes() == b"ROOT"
    assert b"BUILDSTATUS written" in sink.data
    assert len(emu.booted) == 1
    assert emu.attached_here() == []
