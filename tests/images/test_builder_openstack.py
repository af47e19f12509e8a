"""The OpenStack builder image, booted for real (OVMF, qemu TCG): `run_build` with the OpenStack
backend against the fake OpenStack, where the builder server is THIS image with the server's
volumes as virtio disks whose serials are the Cinder ids (as Nova's libvirt driver gives them) and
the user data the backend sent to Nova on a config drive (vfat, label `config-2`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from cloudbuild.build import BuildJob, PhaseLimits, run_build
from cloudbuild.buildroot.hoststeps import DiskHostSteps
from cloudbuild.commands.rootfs import busybox_rootfs
from cloudbuild.errors import ExitCode
from cloudbuild.runner import run
from tests.cloud.openstack_emulation import Emulation, Guest, ServerConsole, make_backend
from tests.fakes.console import RecordingConsole
from tests.images import machine
from tests.vm.localbuild import recipe as write_recipe

BOOT_TIMEOUT = 900.0
pytestmark = [
    pytest.mark.vm,
    pytest.mark.slow,
    pytest.mark.timeout(BOOT_TIMEOUT + 900),
    pytest.mark.usefixtures("fast_sleeps", "emu"),
]
EMULATION_JOIN_TIMEOUT = BOOT_TIMEOUT + 60
RETRY_SLEEP_CAP = 0.05
CONSOLES: list[machine.Console] = []

RECIPE = """mkdir -p "$BUILD_RESULTS/sub"
echo "hello from the openstack image" > "$BUILD_RESULTS/hello.txt"
seq 1 2000 > "$BUILD_RESULTS/sub/numbers"
echo "recipe done"
"""


def config_drive(path: Path, user_data: bytes, server_id: str, meta: dict[str, str]) -> Path:
    """A vfat config drive as Nova makes one (`config_drive_format=vfat`), written without mounting:
    the user data and meta_data.json with the server's metadata (the build's volume ids)."""
    tree = path.with_suffix(".d")
    (tree / "openstack" / "latest").mkdir(parents=True)
    (tree / "openstack" / "latest" / "user_data").write_bytes(user_data)
    document = {"uuid": server_id, "meta": meta}
    (tree / "openstack" / "latest" / "meta_data.json").write_text(json.dumps(document))
    run(["mkfs.vfat", "-n", "config-2", "-C", path, "65536"], timeout=60)
    run(["mcopy", "-s", "-i", path, tree / "openstack", "::/"], timeout=60)
    return path


def image_guest(image: Path, folder: Path) -> Guest:
    def play(server_id: str, disks: list[Path], emu: Emulation) -> str:
        with emu.fake.lock:
            server = emu.fake.cloud.servers[server_id]
            user_data, meta = server.user_data or b"", dict(server.metadata)
        drive = config_drive(folder / "config-drive.img", user_data, server_id, meta)
        vdisks = [machine.Disk(disk, disk.stem[:20]) for disk in disks] + [
            machine.Disk(drive, "config-drive")
        ]
        console = machine.Console()
        CONSOLES.append(console)
        argv = machine.argv(image, folder, bus="virtio", disks=vdisks)
        result = machine.boot(argv, console, BOOT_TIMEOUT)
        ServerConsole(emu.fake, server_id).write(bytes(console.data))
        return "" if result.returncode == 0 else f"qemu exited {result.returncode} ({result.timed_out=})\n"

    return play


def test_the_openstack_builder_image_builds_with_user_data_from_a_config_drive(
    emu: Emulation, built_image: Callable[[str, str], Path], tmp_path: Path
) -> None:
    image = built_image("builder", "openstack")
    emu.guest = image_guest(image, tmp_path)
    rootfs = tmp_path / "rootfs"
    busybox_rootfs(rootfs)
    recipe = write_recipe(tmp_path / "src", RECIPE)
    dest = tmp_path / "out"
    given: dict[str, object] = {
        "vm_kernel": "cirros",
        "rootfs": str(rootfs),
        "dest": str(dest),
        "build_id": "osimg",
    }
    backend = make_backend(emu.fake.metadata_url, emu.dev_root, tmp_path / "state", **given)
    workdir = tmp_path / "work"
    workdir.mkdir()
    steps = DiskHostSteps(backend.options, recipe, build_id="osimg", workdir=workdir)
    outcome = run_build(
        BuildJob("osimg", dest, workdir, limits=PhaseLimits(boot=BOOT_TIMEOUT + 60)),
        backend,
        steps,
        RecordingConsole(),
    )
    text = CONSOLES[-1].text if CONSOLES else "(never booted)"
    assert outcome.exit_code == ExitCode.OK, f"{outcome.message}\n--- console ---\n{text[-6000:]}"
    assert (dest / "hello.txt").read_text() == "hello from the openstack image\n"
    assert (dest / "sub" / "numbers").read_text() == "".join(f"{i}\n" for i in range(1, 2001))
    assert "user data from the config drive" in text
    assert "cloudbuild-boot-hook: running the boot hook" in text
    print(f"\nopenstack builder boot: {CONSOLES[-1].timings()}")
