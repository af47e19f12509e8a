"""`--vm-type ec2` end to end, emulated on one machine, with a real build machine.

moto plays EC2's control plane; each EBS volume is an image file that the host emulator links
under a private /dev as `disk/by-id/nvme-Amazon_Elastic_Block_Store_vol<id>` while it is attached
to the worker (what udev does on a Nitro host); and the builder instance is played by the REAL
local qemu backend: when the builder runs with both volumes attached, qemu boots the two image
files, naming each disk by its EBS serial (the volume id without its dash) as the builder's boot
hook finds them by id; the real guest agent runs the recipe, writes BUILDSTATUS and the manifest
to swap and powers off; the instance then stops in moto. Everything else is production code:
`run_build` with the real host steps (mkfs, staging, extraction by the blocklist manifest) and
the EC2 backend (IMDSv2 identity, create/attach/detach/delete, console streaming).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from cloudbuild.build import BuildJob, PhaseLimits, run_build
from cloudbuild.buildroot.hoststeps import DiskHostSteps
from cloudbuild.cloud.ec2.devices import serial_of
from cloudbuild.commands.rootfs import busybox_rootfs
from cloudbuild.errors import ExitCode
from cloudbuild.options import VmOptions
from cloudbuild.volume import Role, VolumePair
from tests.fakes.console import RecordingConsole
from tests.fakes.moto_server import BuilderRun, Ec2World
from tests.vm.localbuild import recipe as write_recipe

pytestmark = [pytest.mark.vm, pytest.mark.slow]

RECIPE = """echo "building on $(uname -m) with $BUILD_JOBS job(s)"
mkdir -p "$BUILD_RESULTS/sub"
echo "hello from the ec2 builder" > "$BUILD_RESULTS/hello.txt"
seq 1 3000 > "$BUILD_RESULTS/sub/numbers"
echo "recipe done"
"""


def ebs_argv(argv: list[str], root_id: str, swap_id: str) -> list[str]:
    """qemu's command line with the disks named as EBS names them: serial = volume id without the
    dash (20 characters, what a virtio serial holds), root and swap found by those serials."""
    root, swap = serial_of(root_id), serial_of(swap_id)
    out: list[str] = []
    for arg in argv:
        if arg.startswith("virtio-blk-pci,") and arg.endswith(",serial=0"):
            arg = arg[: -len("0")] + root
        elif arg.startswith("virtio-blk-pci,") and arg.endswith(",serial=1"):
            arg = arg[: -len("1")] + swap
        elif "root=/dev/disk/by-id/virtio-0" in arg:
            arg = arg.replace("root=/dev/disk/by-id/virtio-0", f"root=/dev/disk/by-id/virtio-{root}")
            arg += f" cloudbuild.swap=/dev/disk/by-id/virtio-{swap}"
        out.append(arg)
    return out


class InstanceConsole:
    def __init__(self, run: BuilderRun):
        self.run = run

    def write(self, data: bytes) -> None:
        self.run.console(data)


def qemu_builder(timeout: float) -> object:
    from local_backends.localvolume import LocalVolume
    from local_backends.machines.qemu import QemuBackend
    from local_backends.machines.vmproc import run_machine

    def play(run: BuilderRun) -> None:
        qemu = QemuBackend(VmOptions(vm_type="qemu", vm_memory=512))
        qemu.verify()
        pair = VolumePair(
            LocalVolume(Role.ROOT, run.root_image, 0, owned=False),
            LocalVolume(Role.SWAP, run.swap_image, 0, owned=False),
        )
        argv = ebs_argv(qemu.machine(pair).argv(), run.root_volume, run.swap_volume)
        result = run_machine(argv, InstanceConsole(run), timeout=timeout)
        if result.returncode != 0:
            run.console(f"qemu exited {result.returncode} (timed out: {result.timed_out})\n".encode())

    return play


def test_a_real_build_on_an_emulated_ec2_builder(ec2_world: Ec2World, tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    busybox_rootfs(rootfs)
    recipe = write_recipe(tmp_path / "src", RECIPE)
    dest = tmp_path / "out"
    ec2_world.emulator.play = qemu_builder(timeout=600)  # type: ignore[assignment]
    backend = ec2_world.backend(via_imds=True, rootfs=str(rootfs), dest=str(dest), build_id="e2e")
    workdir = tmp_path / "work"
    workdir.mkdir()
    steps = DiskHostSteps(backend.options, recipe, build_id="e2e", workdir=workdir)
    console = RecordingConsole()
    outcome = run_build(BuildJob("e2e", dest, workdir, limits=PhaseLimits(boot=900)), backend, steps, console)
    log = console.text.decode(errors="replace")
    assert outcome.exit_code == ExitCode.OK, f"{outcome.message}\n--- console ---\n{log[-4000:]}"
    assert (dest / "hello.txt").read_text() == "hello from the ec2 builder\n"
    assert (dest / "sub" / "numbers").read_text() == "".join(f"{i}\n" for i in range(1, 3001))
    assert "recipe done" in log  # the builder's console reached the build log through GetConsoleOutput
    assert len(ec2_world.emulator.runs) == 1
    by_id = ec2_world.paths.dev / "disk" / "by-id"
    build_links = {
        ec2_world.emulator.link(v).name
        for v in (ec2_world.emulator.runs[0].root_volume, ec2_world.emulator.runs[0].swap_volume)
    }
    for _ in range(200):  # the emulated udev notices the last detach within milliseconds
        if not build_links & {p.name for p in by_id.iterdir()}:
            break
        threading.Event().wait(0.01)
    assert not build_links & {p.name for p in by_id.iterdir()}  # nothing of the build left attached here
