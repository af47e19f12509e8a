"""Real User-mode Linux builds (`--vm-type uml`) through the `cloudbuild` command.

The guest is the same agent as qemu's (the agent initramfs as UML's initrd=); the results come
back through the swap channel (BUILDSTATUS + blocklist manifest), never by mounting the root.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm import localbuild
from tests.vm.localbuild import (
    cli_build,
    cli_kill,
    loop_devices_on,
    processes_mentioning,
    recipe,
    sha,
    spawn_build,
    tree,
)

pytestmark = pytest.mark.vm
rootfs = localbuild.rootfs
cache = localbuild.cache
VM = "uml"
DISKS = ("--vm-disk-size", "128", "--vm-swap-size", "32", "--vm-memory", "256")


@pytest.fixture(autouse=True)
def nothing_left(tmp_path: Path) -> Iterator[None]:
    yield
    left = processes_mentioning(str(tmp_path))
    for pid in left:
        os.kill(pid, 9)
    assert left == [], "uml processes left behind"
    assert loop_devices_on(tmp_path) == []


@pytest.mark.parametrize(("fs", "size"), [("ext4", "128"), ("xfs", "320")])
def test_success_returns_results_byte_exact(
    tmp_path: Path, rootfs: Path, cache: Path, fs: str, size: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(3 * 1024 * 1024 + 123)
    (src / "input.bin").write_bytes(data)
    script = recipe(
        src,
        "mkdir -p $BUILD_RESULTS/RPMS/x86_64\n"
        "cp input.bin $BUILD_RESULTS/RPMS/x86_64/input.bin\n"
        "echo -n small > $BUILD_RESULTS/RPMS/small.txt\n"
        ": > $BUILD_RESULTS/empty\n"
        "ln -s x86_64/input.bin $BUILD_RESULTS/RPMS/latest\n"
        "ln -s /etc/passwd $BUILD_RESULTS/evil\n"
        "grep -q ubda /proc/cmdline && echo uml machine: $(uname -m)\n",
    )
    proc = cli_build(
        tmp_path, cache, VM, rootfs, script, *DISKS, "--vm-disk-filesystem", fs, "--vm-disk-size", size
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tree(tmp_path / "out") == {
        "RPMS": "d",
        "RPMS/x86_64": "d",
        "RPMS/x86_64/input.bin": sha(data),
        "RPMS/small.txt": sha(b"small"),
        "RPMS/latest": "l:x86_64/input.bin",
        "empty": sha(b""),
    }
    log = (tmp_path / "out.log").read_text()
    assert "uml machine:" in log and "build status 0" in log
    assert (
        "IO_" in (tmp_path / "out.statistics").read_text()
        or "MAX_mb" in (tmp_path / "out.statistics").read_text()
    )


def test_a_failing_recipe_fails_the_build(tmp_path: Path, rootfs: Path, cache: Path) -> None:
    script = recipe(tmp_path / "src", "echo x > $BUILD_RESULTS/x\nexit 2\n")
    proc = cli_build(tmp_path, cache, VM, rootfs, script, *DISKS)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()
    assert "TIME_main_build: " in (tmp_path / "out.statistics").read_text()  # on failure too


def test_cloudbuild_kill_marks_the_swap_and_stops_uml(tmp_path: Path, rootfs: Path, cache: Path) -> None:
    script = recipe(tmp_path / "src", "echo started-build\nsleep 1000\n")
    build = spawn_build(tmp_path, cache, VM, rootfs, script, *DISKS, "--build-id", "umlkill")
    try:
        log = tmp_path / "out.log"
        from cloudbuild.retry import wait_for

        wait_for(
            lambda: log.exists() and "started-build" in log.read_text(),
            what="the build",
            timeout=60,
            interval=0.2,
        )
        killed = cli_kill(tmp_path, cache, VM, "umlkill", *DISKS)
        assert killed.returncode == 0, killed.stderr
        _, stderr = build.communicate(timeout=60)
    finally:
        if build.poll() is None:
            build.kill()
    assert build.returncode == 1, stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_the_command_line_is_the_seeds_with_a_memory_unit(tmp_path: Path) -> None:
    from local_backends.machines.uml import uml_argv

    argv = uml_argv(
        kernel=Path("/usr/bin/linux.uml"),
        root=tmp_path / "root.img",
        swap=tmp_path / "swap.img",
        initrd=tmp_path / "initrd",
        memory_mib=512,
        fstype="xfs",
        root_options="noatime",
    )
    assert argv == [
        "/usr/bin/linux.uml",
        f"ubda={tmp_path / 'root.img'}",
        f"ubdb={tmp_path / 'swap.img'}",
        "root=/dev/ubda",
        "rootfstype=xfs",
        "rootflags=noatime",
        "rw",
        "mem=512M",
        "con=null",
        "con0=null,fd:1",
        f"initrd={tmp_path / 'initrd'}",
        "panic=1",
        "quiet",
        "cloudbuild.swap=/dev/ubdb",
    ]
    from cloudbuild.errors import UsageError

    with pytest.raises(UsageError, match="comma"):
        uml_argv(
            kernel=Path("k"),
            root=Path("/a,b"),
            swap=None,
            initrd=Path("i"),
            memory_mib=1,
            fstype="ext4",
            root_options="",
        )
