"""Boot a built cloud image under qemu (TCG) with OVMF, as EC2 (NVMe disks named by EBS serial)
or OpenStack (virtio disks named by Cinder id) would attach its volumes; a server of the test
plays the metadata service at 169.254.169.254 through qemu user networking's `guestfwd`."""

from __future__ import annotations

import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cloudbuild.runner import run
from local_backends.machines.vmproc import ProcessExit, run_machine

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
PROXY = Path(__file__).with_name("guestfwd_proxy.py")
FIRMWARE_DONE = b"BdsDxe: starting"  # OVMF hands over to systemd-boot
SYSTEMD_UP = b"Welcome to"  # systemd runs on the image's root
HOOK_RUNS = b"cloudbuild-boot-hook: running the boot hook"
BOOT_SERIAL = "vol0b00700000000000"  # the image's own (root) disk


@dataclass
class Disk:
    path: Path
    serial: str
    fmt: str = "raw"


@dataclass
class Console:
    """The serial console: all bytes, and when (seconds after start) a line first appeared."""

    started: float = field(default_factory=time.monotonic)
    data: bytearray = field(default_factory=bytearray)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def write(self, chunk: bytes) -> None:
        with self.lock:
            self.data.extend(chunk)
            now = time.monotonic() - self.started
            self.seen.update({k: now for k in self.watch if k not in self.seen and k in self.data})

    watch: tuple[bytes, ...] = (FIRMWARE_DONE, SYSTEMD_UP, HOOK_RUNS)
    seen: dict[bytes, float] = field(default_factory=dict)

    def timings(self) -> str:
        names = {FIRMWARE_DONE: "firmware done", SYSTEMD_UP: "systemd up", HOOK_RUNS: "hook runs"}
        return ", ".join(f"{names[k]} at {self.seen[k]:.1f}s" for k in self.watch if k in self.seen)

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")


def overlay(image: Path, folder: Path) -> Path:
    """A copy-on-write disk over the cached image, so every boot starts from the built image."""
    disk = folder / f"{image.stem}-overlay.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", image, "-F", "raw", disk], timeout=60)
    return disk


def argv(
    image: Path,
    folder: Path,
    *,
    bus: str,
    disks: list[Disk],
    metadata_port: int | None = None,
    forwards: dict[int, int] | None = None,
    memory: int = 1024,
) -> list[str]:
    vars_copy = folder / "OVMF_VARS.fd"
    shutil.copy(OVMF_VARS, vars_copy)
    boot = overlay(image, folder)
    args = [
        "qemu-system-x86_64",
        "-machine", "q35,accel=tcg",
        "-m", str(memory),
        "-smp", "1",
        "-nographic",
        "-no-reboot",
        "-serial", "stdio",
        "-monitor", "none",
        "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,file={vars_copy}",
    ]  # fmt: skip
    for n, disk in enumerate([Disk(boot, BOOT_SERIAL, "qcow2"), *disks]):
        args += ["-drive", f"if=none,id=d{n},file={disk.path},format={disk.fmt},cache=unsafe"]
        device = "nvme" if bus == "nvme" else "virtio-blk-pci"
        args += ["-device", f"{device},drive=d{n},serial={disk.serial}" + (",bootindex=0" if n == 0 else "")]
    net = "user,id=n0,net=169.254.0.0/16,host=169.254.0.2,dhcpstart=169.254.0.15"
    if metadata_port is not None:
        net += f",guestfwd=tcp:169.254.169.254:80-cmd:{sys.executable} {PROXY} 127.0.0.1 {metadata_port}"
    for guest, host in (forwards or {}).items():
        net += f",hostfwd=tcp:127.0.0.1:{host}-:{guest}"
    args += ["-netdev", net, "-device", "virtio-net-pci,netdev=n0,romfile="]
    return args


def boot(argv: list[str], console: Console, timeout: float) -> ProcessExit:
    return run_machine(argv, console, timeout=timeout)
