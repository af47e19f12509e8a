"""The EC2 builder image, booted for real (OVMF, qemu TCG): `run_build` with the EC2 backend
against moto's server, where the builder instance is THIS image: its boot unit fetches the user
data the backend generated through IMDSv2 (a fake on 169.254.169.254 via guestfwd), the hook finds
root and swap by their EBS serials on qemu NVMe controllers (whose model is not EBS's), the guest
agent builds, writes BUILDSTATUS and the manifest to swap and powers off; results come out
byte-exact through the real host steps."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import pytest

from cloudbuild.build import BuildJob, PhaseLimits, run_build
from cloudbuild.buildroot.hoststeps import DiskHostSteps
from cloudbuild.cloud.ec2.devices import serial_of
from cloudbuild.commands.rootfs import busybox_rootfs
from cloudbuild.errors import ExitCode
from tests.fakes.console import RecordingConsole
from tests.fakes.imds import FakeImds
from tests.fakes.moto_server import BuilderRun, Ec2World, moto_backend
from tests.images import machine
from tests.vm.localbuild import recipe as write_recipe

BOOT_TIMEOUT = 900.0  # TCG on a loaded 2-core machine: the boot alone took 50-120s here
pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(BOOT_TIMEOUT + 900)]
RECIPE = """echo "building on the image builder"
mkdir -p "$BUILD_RESULTS/sub"
echo "hello from the ec2 image" > "$BUILD_RESULTS/hello.txt"
seq 1 3000 > "$BUILD_RESULTS/sub/numbers"
echo "recipe done"
"""


def image_builder(
    image: Path, folder: Path, consoles: list[machine.Console], metadata: list[FakeImds]
) -> Callable[[BuilderRun], None]:
    """The emulator's builder: boot `image` with the instance's volumes and user data."""

    def play(run: BuilderRun) -> None:
        # moto keeps the user data as RunInstances sent it (base64); IMDS serves it decoded
        user_data = base64.b64decode(str(moto_backend().get_instance(run.instance_id).user_data))
        imds = FakeImds({"instance-id": run.instance_id})
        imds.user_data = user_data.decode()
        imds.start()
        metadata.append(imds)
        console = machine.Console()
        consoles.append(console)
        try:
            port = int(imds.endpoint.rstrip("/").rsplit(":", 1)[1])
            disks = [
                machine.Disk(run.root_image, serial_of(run.root_volume)),
                machine.Disk(run.swap_image, serial_of(run.swap_volume)),
            ]
            argv = machine.argv(image, folder, bus="nvme", disks=disks, metadata_port=port)
            result = machine.boot(argv, console, BOOT_TIMEOUT)
            console.write(
                f"\n[test] qemu exited {result.returncode} (timed out: {result.timed_out})\n".encode()
            )
        finally:
            imds.stop()
            run.console(bytes(console.data))

    return play


def test_the_ec2_builder_image_runs_a_real_build_through_its_boot_hook(
    ec2_world: Ec2World, built_image: Callable[[str, str], Path], tmp_path: Path
) -> None:
    image = built_image("builder", "ec2")
    rootfs = tmp_path / "rootfs"
    busybox_rootfs(rootfs)
    recipe = write_recipe(tmp_path / "src", RECIPE)
    dest = tmp_path / "out"
    consoles: list[machine.Console] = []
    metadata: list[FakeImds] = []
    ec2_world.emulator.play = image_builder(image, tmp_path, consoles, metadata)  # type: ignore[assignment]
    backend = ec2_world.backend(via_imds=True, rootfs=str(rootfs), dest=str(dest), build_id="img")
    workdir = tmp_path / "work"
    workdir.mkdir()
    steps = DiskHostSteps(backend.options, recipe, build_id="img", workdir=workdir)
    outcome = run_build(
        BuildJob("img", dest, workdir, limits=PhaseLimits(boot=BOOT_TIMEOUT + 60)),
        backend,
        steps,
        RecordingConsole(),
    )
    text = consoles[0].text if consoles else "(never booted)"
    assert outcome.exit_code == ExitCode.OK, f"{outcome.message}\n--- console ---\n{text[-6000:]}"
    assert (dest / "hello.txt").read_text() == "hello from the ec2 image\n"
    assert (dest / "sub" / "numbers").read_text() == "".join(f"{i}\n" for i in range(1, 3001))
    assert "cloudbuild-boot-hook: running the boot hook" in text  # through the image's unit, not a shortcut
    assert "recipe done" in text
    # IMDSv2: a token first, then the user data with it (an IMDSv1 read would have been a 401)
    asked = [(method, path, status) for method, path, status in metadata[0].requests]
    assert asked[:2] == [("PUT", "/latest/api/token", 200), ("GET", "/latest/user-data", 200)], asked
    print(f"\nec2 builder boot: {consoles[0].timings()}")
