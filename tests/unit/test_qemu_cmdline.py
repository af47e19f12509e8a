"""The qemu command line (obs-build's kvm one) and the checks before anything is created."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudbuild.backend import BootResult, BuildSlot, ExitReason
from cloudbuild.errors import UsageError
from cloudbuild.options import parse
from cloudbuild.watchdog import Watchdog
from local_backends.machines.qemu import QemuBackend, QemuMachine, check_hugetlbfs
from local_backends.machines.vmproc import ProcessExit, machine_outcome


def machine(**changes: object) -> QemuMachine:
    base: dict[str, object] = {
        "root": Path("/images/root.img"),
        "swap": Path("/images/swap.img"),
        "kernel": Path("/boot/vmlinux"),
        "initrd": Path("/cache/initramfs.cpio"),
    }
    base.update(changes)
    return QemuMachine(**base)  # type: ignore[arg-type]


def test_command_line_is_obs_builds_kvm_one() -> None:
    argv = machine(memory_mib=700, cpus=3, fstype="xfs", root_options="noatime,nobarrier").argv()
    joined = " ".join(argv)
    for flag in ("-no-reboot", "-nographic", "-nodefaults"):
        assert flag in argv
    assert "accel=tcg" in joined and argv[argv.index("-cpu") + 1] == "max"
    assert argv[argv.index("-smp") + 1] == "3" and argv[argv.index("-m") + 1] == "700"
    assert "file=/images/root.img,format=raw,if=none,id=disk,cache=unsafe" in argv
    assert "virtio-blk-pci,drive=disk,serial=0" in argv
    assert "file=/images/swap.img,format=raw,if=none,id=swap,cache=unsafe" in argv
    assert "virtio-blk-pci,drive=swap,serial=1" in argv
    assert "-netdev" not in argv and "-nic" not in argv  # no network
    append = argv[argv.index("-append") + 1]
    assert "root=/dev/disk/by-id/virtio-0" in append and "rootfstype=xfs" in append
    assert "rootflags=noatime,nobarrier" in append and "console=ttyS0" in append and "panic=-1" in append
    assert argv[argv.index("-serial") + 1] == "stdio"


def test_kvm_hugetlbfs_no_swap_and_commas() -> None:
    argv = machine(accel="kvm", hugetlbfs="/dev/hugepages", swap=None, root=Path("/a,b/root.img")).argv()
    assert "accel=kvm" in " ".join(argv) and argv[argv.index("-cpu") + 1] == "host"
    assert argv[argv.index("-mem-path") + 1] == "/dev/hugepages" and "-mem-prealloc" in argv
    assert not any("id=swap" in a for a in argv)
    assert any(a.startswith("file=/a,,b/root.img,") for a in argv)
    assert "no-kvmclock" in argv[argv.index("-append") + 1]


def test_firmware_choice() -> None:
    assert "-bios" not in machine(firmware=None).argv()
    argv = machine(firmware="/my/bios.bin").argv()
    assert argv[argv.index("-bios") + 1] == "/my/bios.bin"


def test_hugetlbfs_must_be_mounted(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a mounted hugetlbfs"):
        check_hugetlbfs(str(tmp_path))


def test_verify_refuses_missing_kernel_and_tiny_memory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--vm-kernel"):
        QemuBackend(parse(["--vm-type", "qemu", "--vm-kernel", str(tmp_path / "nope")])).verify()
    with pytest.raises(UsageError, match="128 MiB"):
        QemuBackend(parse(["--vm-type", "qemu", "--vm-memory", "64"])).verify()


def test_exit_reasons() -> None:
    dog = Watchdog(lambda data: None, timeout=None, on_fire=lambda: None)  # type: ignore[arg-type]

    def outcome(code: int | None, *, timed_out: bool = False, killed: bool = False) -> BootResult:
        return machine_outcome(ProcessExit(code, timed_out=timed_out), dog, name="qemu", killed=killed)

    assert outcome(0).reason is ExitReason.POWERED_OFF
    assert outcome(None, timed_out=True).reason is ExitReason.TIMEOUT
    assert (outcome(1).reason, outcome(1).detail) == (ExitReason.CRASHED, "qemu exited 1")
    # stopped by `cloudbuild kill`: qemu's non-zero exit is no crash, the swap's status decides
    assert outcome(1, killed=True).reason is ExitReason.KILLED
    dog.panicked = True
    result = outcome(0)
    assert (result.reason, result.detail) == (ExitReason.CRASHED, "kernel panic")
    dog.fired = True
    assert outcome(None).reason is ExitReason.WATCHDOG


def test_volumes_follow_the_options(tmp_path: Path) -> None:
    backend = QemuBackend(parse(["--vm-type", "qemu", "--vm-disk-size", "300", "--vm-swap-size", "30"]))
    pair = backend.volumes(BuildSlot("b", 0, tmp_path))
    assert pair.root.id == str(tmp_path / "root.img") and pair.root.size_mib == 300
    assert pair.swap is not None and pair.swap.size_mib == 30
