"""The bootable disk: a GPT image with an ESP (systemd-boot, kernel, initramfs) and an ext4 root,
made by systemd-repart (it formats through offset loop devices: no device-mapper, no kpartx),
then converted to qcow2 if asked.

The ESP is made apart, as a vfat image filled with mtools (no mount: the host kernel may have no
vfat, and systemd 252's repart mounts to copy files in), and repart copies it in as blocks."""

from __future__ import annotations

import shutil
from pathlib import Path

from cloudbuild import log as cblog
from cloudbuild.errors import HostBroken, InfraError
from cloudbuild.runner import Arg, CommandError, run, which

log = cblog.get_logger(__name__)

SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
ROOT_LABEL = "cloudbuild-root"
ESP_SIZE = 160 * 1024 * 1024
MIB = 1024 * 1024
# the kernel command line: the serial console is what EC2's GetConsoleOutput and OpenStack's
# console log show, and what the tests read
CMDLINE = f"root=PARTLABEL={ROOT_LABEL} ro console=tty0 console=ttyS0,115200 quiet systemd.show_status=1"


def esp_tree(esp: Path, kernel: Path, initrd: Path, cmdline: str = CMDLINE) -> None:
    """systemd-boot as the removable-media loader (no NVRAM entry needed), one entry, no menu."""
    if not SYSTEMD_BOOT.exists():
        raise HostBroken(f"{SYSTEMD_BOOT} missing: run scripts/setup (apt-get install systemd-boot-efi)")
    for folder in ("EFI/BOOT", "EFI/systemd", "loader/entries"):
        (esp / folder).mkdir(parents=True, exist_ok=True)
    shutil.copy2(SYSTEMD_BOOT, esp / "EFI/BOOT/BOOTX64.EFI")
    shutil.copy2(SYSTEMD_BOOT, esp / "EFI/systemd/systemd-bootx64.efi")
    shutil.copy2(kernel, esp / "vmlinuz")
    shutil.copy2(initrd, esp / "initrd.img")
    (esp / "loader/loader.conf").write_text("default cloudbuild.conf\ntimeout 0\neditor no\n")
    (esp / "loader/entries/cloudbuild.conf").write_text(
        f"title cloudbuild\nlinux /vmlinuz\ninitrd /initrd.img\noptions {cmdline}\n"
    )


def esp_image(esp: Path, out: Path, size: int = ESP_SIZE) -> None:
    """A vfat filesystem image holding the folder `esp`, without mounting anything."""
    for tool in ("mkfs.vfat", "mcopy"):
        if which(tool) is None:
            raise HostBroken(f"{tool} not found: run scripts/setup (apt-get install dosfstools mtools)")
    out.unlink(missing_ok=True)
    try:
        run(["mkfs.vfat", "-F", "32", "-n", "ESP", "-C", out, str(size // 1024)], timeout=120)
        run(["mcopy", "-s", "-p", "-i", out, *sorted(esp.iterdir()), "::/"], timeout=600)
    except CommandError as exc:
        raise InfraError(f"could not make the ESP image {out}: {exc}") from exc


def tree_bytes(root: Path) -> int:
    total = 0
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            total += path.lstat().st_size
    return total


def repart(out: Path, *, esp: Path, root: Path, definitions: Path, spare: int = 512 * MIB) -> None:
    """Write a fresh GPT image at `out` from the ESP image and the root folder."""
    tool = which("systemd-repart")
    if tool is None:
        raise HostBroken("systemd-repart not found: it comes with systemd (Debian 12: systemd 252)")
    root_size = (tree_bytes(root) * 13 // 10 + spare + MIB - 1) // MIB * MIB
    definitions.mkdir(parents=True, exist_ok=True)
    (definitions / "10-esp.conf").write_text(
        f"[Partition]\nType=esp\nLabel=ESP\nCopyBlocks={esp}\n"
        f"SizeMinBytes={ESP_SIZE}\nSizeMaxBytes={ESP_SIZE}\n"
    )
    (definitions / "20-root.conf").write_text(
        f"[Partition]\nType=root-x86-64\nLabel={ROOT_LABEL}\nFormat=ext4\nCopyFiles={root}:/\n"
        f"SizeMinBytes={root_size}\nSizeMaxBytes={root_size}\n"
    )
    out.unlink(missing_ok=True)
    argv: list[Arg] = [
        tool,
        "--empty=create",
        "--size=auto",
        "--dry-run=no",
        "--no-pager",
        "--seed=random",
        f"--definitions={definitions}",
        out,
    ]
    log.info("repart", out=str(out), root_mib=root_size // MIB)
    try:
        run(argv, timeout=1800)
    except CommandError as exc:
        out.unlink(missing_ok=True)
        raise InfraError(f"systemd-repart could not write {out}: {exc}") from exc


def to_qcow2(raw: Path, out: Path) -> None:
    try:
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, out], timeout=1800)
    except CommandError as exc:
        out.unlink(missing_ok=True)
        raise InfraError(f"qemu-img could not convert {raw} to qcow2: {exc}") from exc
