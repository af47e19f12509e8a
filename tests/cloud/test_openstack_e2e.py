"""`--vm-type openstack` end to end, emulated on one machine, with a real build machine.

The cloud is the fake OpenStack over HTTP, the worker's volumes are image files that "udev" links
under a private /dev by virtio serial while they are attached here, and the builder server is
played by the local qemu backend: when the server goes ACTIVE, qemu boots the server's volumes
the way Nova's libvirt driver gives them to a guest (virtio-blk, serial = the volume id, cut to
20 characters), the real guest agent runs the recipe and powers off, and the server goes SHUTOFF.
Everything else is production code: `cloudbuild.build.run_build` with the real host steps (mkfs,
staging, extraction by the blocklist manifest) and the OpenStack backend.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import cloudbuild.backend as backend_registry
from cloudbuild import cli
from cloudbuild import log as cblog
from cloudbuild.build import BuildJob, PhaseLimits, run_build
from cloudbuild.buildroot.hoststeps import DiskHostSteps
from cloudbuild.cloud.openstack.backend import OpenStackBackend
from cloudbuild.commands.rootfs import busybox_rootfs
from cloudbuild.errors import ExitCode
from cloudbuild.options import VmOptions
from tests.cloud.openstack_emulation import Emulation, make_backend, qemu_guest
from tests.fakes import timings
from tests.fakes.console import RecordingConsole
from tests.vm.localbuild import recipe as write_recipe

# fast_sleeps, and emu: afterwards the guest ended without crashing, no cloudbuild-tagged server or
# volume is left in the cloud and nothing is attached here (tests/cloud/openstack_fixtures.py).
pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.usefixtures("fast_sleeps", "emu")]
EMULATION_GUEST = qemu_guest(timeout=600)
EMULATION_JOIN_TIMEOUT = 700.0
RETRY_SLEEP_CAP = 0.05

RECIPE = """echo "building on $(uname -m) with $BUILD_JOBS job(s)"
mkdir -p "$BUILD_RESULTS/sub"
echo "hello from the openstack builder" > "$BUILD_RESULTS/hello.txt"
seq 1 2000 > "$BUILD_RESULTS/sub/numbers"
echo "recipe done"
"""


def test_a_real_build_on_an_emulated_openstack_builder(emu: Emulation, tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    busybox_rootfs(rootfs)
    recipe = write_recipe(tmp_path / "src", RECIPE)
    dest = tmp_path / "out"
    given: dict[str, object] = {
        "vm_kernel": "cirros",  # the builder image's name in the fake's Glance
        "rootfs": str(rootfs),
        "dest": str(dest),
        "build_id": "e2e",
    }
    backend = make_backend(emu.fake.metadata_url, emu.dev_root, tmp_path / "state", **given)
    options = backend.options
    workdir = tmp_path / "work"
    workdir.mkdir()
    steps = DiskHostSteps(options, recipe, build_id="e2e", workdir=workdir)
    sink = RecordingConsole()
    job = BuildJob("e2e", dest, workdir, limits=PhaseLimits(boot=900))
    outcome = run_build(job, backend, steps, sink)
    log = sink.data.decode(errors="replace")
    assert outcome.exit_code == ExitCode.OK, f"{outcome.message}\n--- console ---\n{log[-4000:]}"
    assert (dest / "hello.txt").read_text() == "hello from the openstack builder\n"
    assert (dest / "sub" / "numbers").read_text() == "".join(f"{i}\n" for i in range(1, 2001))
    assert "recipe done" in log  # the builder's console reached the build log
    assert emu.booted and len(emu.booted) == 1


def test_cloudbuild_build_command_line_on_openstack(
    emu: Emulation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cloudbuild build --vm-type openstack ...` as a farm runs it: options, OS_CLOUD, metadata service."""
    rootfs = tmp_path / "rootfs"
    busybox_rootfs(rootfs)
    recipe = write_recipe(tmp_path / "src", RECIPE)
    monkeypatch.setenv("CLOUDBUILD_OPENSTACK_METADATA_URL", emu.fake.metadata_url)
    monkeypatch.setenv("CLOUDBUILD_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))

    class HereOpenStack(OpenStackBackend):
        """The production backend with this test's /dev (where the emulated udev links volumes)."""

        def __init__(self, options: VmOptions):
            super().__init__(options, timeouts=timings.OPENSTACK, dev_root=emu.dev_root)

    monkeypatch.setitem(backend_registry._REGISTRY, "openstack", HereOpenStack)
    monkeypatch.setattr(cblog, "configure", lambda *args, **kwargs: None)  # keep pytest's capture
    dest = tmp_path / "out"
    argv = [
        "build",
        "--vm-type",
        "openstack",
        "--vm-kernel",
        "cirros",
        "--rootfs",
        str(rootfs),
        "--dest",
        str(dest),
        "--vm-disk-size",
        "1024",
        "--vm-swap-size",
        "1024",
        "--jobs",
        "2",
        "--build-timeout",
        "900",
        str(recipe),
    ]
    assert cli.main(argv) == 0, (tmp_path / "out.log").read_text(errors="replace")[-3000:]
    assert (dest / "hello.txt").read_text() == "hello from the openstack builder\n"
    log = (tmp_path / "out.log").read_text(errors="replace")
    assert "building on" in log and "with 2 job(s)" in log
