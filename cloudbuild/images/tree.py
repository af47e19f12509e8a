"""The image's file tree: a Debian root made by debootstrap, then configured offline.

Only the Debian mirror that the host's apt sources name is assumed reachable, so the image's
apt sources (the security suite included) point at that same mirror.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from cloudbuild import log as cblog
from cloudbuild.errors import HostBroken, InfraError
from cloudbuild.runner import Arg, CommandError, run, which

log = cblog.get_logger(__name__)

FALLBACK_MIRROR = "http://deb.debian.org/debian"
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))

# what every cloud image boots with: the cloud kernel (NVMe, virtio, ENA; ext4/xfs/btrfs), an
# initramfs, systemd + udev (by-id links), python3 for the agent and the boot hook
BASE_PACKAGES = (
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "systemd",
    "systemd-sysv",
    "udev",
    "python3",
    "e2fsprogs",
    "xfsprogs",
    "btrfs-progs",
)

# units a throwaway VM never needs; masked so boot reaches the hook sooner
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "getty.target",
    "getty-static.service",
    "serial-getty@ttyS0.service",
    "systemd-timesyncd.service",
)


def host_mirror(sources: Sequence[Path] = APT_SOURCES) -> str:
    """The Debian archive mirror the host's apt sources name (not the security one)."""
    texts: list[str] = []
    for source in sources:
        files = sorted(source.iterdir()) if source.is_dir() else [source]
        texts += [f.read_text(errors="replace") for f in files if f.is_file() and not f.name.endswith(".gpg")]
    for text in texts:
        for url in re.findall(r"(?:^deb\s+(?:\[[^\]]*\]\s+)?|^URIs:\s*)(\S+)", text, flags=re.M):
            if url.rstrip("/").endswith("/debian"):
                return str(url).rstrip("/")
    return FALLBACK_MIRROR


def debootstrap(target: Path, suite: str, packages: Sequence[str], mirror: str) -> None:
    tool = which("debootstrap")
    if tool is None:
        raise HostBroken("debootstrap not found: run scripts/setup (apt-get install debootstrap)")
    argv: list[Arg] = [tool, "--variant=minbase", f"--include={','.join(packages)}", suite, target, mirror]
    log.info("debootstrap", suite=suite, mirror=mirror, packages=len(packages))
    try:
        run(argv, timeout=3600)
    except CommandError as exc:
        raise InfraError(f"debootstrap {suite} from {mirror} failed: {exc}") from exc


def write(root: Path, path: str, text: str, mode: int = 0o644) -> None:
    dest = root / path.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text)
    dest.chmod(mode)


def in_chroot(root: Path, *argv: str) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
    run(["chroot", root, *argv], env=env, timeout=1800)


def configure_base(root: Path, *, suite: str, mirror: str, hostname: str) -> None:
    """What every image gets: apt sources at the one reachable mirror, fstab by partition label,
    a machine id made at first boot, DHCP through systemd-networkd, boot-time noise masked."""
    write(
        root,
        "/etc/apt/sources.list",
        f"deb {mirror} {suite} main\ndeb {mirror} {suite}-updates main\n"
        f"# the security suite from the same mirror: the only archive this image is known to reach\n"
        f"deb {mirror} {suite}-security main\n",
    )
    write(root, "/etc/fstab", "PARTLABEL=cloudbuild-root / ext4 rw,errors=remount-ro 0 1\n")
    write(root, "/etc/hostname", f"{hostname}\n")
    write(root, "/etc/machine-id", "")  # empty: systemd makes one at every (first) boot
    write(
        root,
        "/etc/systemd/network/80-cloud.network",
        "[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n",
    )
    in_chroot(root, "systemctl", "enable", "systemd-networkd.service")
    in_chroot(root, "systemctl", "mask", *MASKED_UNITS)
    for cache in (root / "var/cache/apt/archives").glob("*.deb"):
        cache.unlink()


def kernel_files(root: Path) -> tuple[Path, Path]:
    """The installed kernel and its initramfs (the newest, by version in the name)."""
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise InfraError(f"no kernel in {root}/boot: is linux-image-cloud-amd64 installed?")
    kernel = kernels[-1]
    initrd = root / "boot" / ("initrd.img-" + kernel.name.removeprefix("vmlinuz-"))
    if not initrd.exists():
        in_chroot(root, "update-initramfs", "-c", "-k", kernel.name.removeprefix("vmlinuz-"))
    return kernel, initrd


def copy_guest_package(root: Path, modules: Sequence[str], dest: str = "/usr/lib/cloudbuild") -> None:
    """Install the stdlib-only parts of this package (`modules`: subpackages or module files of
    `cloudbuild`) under `dest` and put `dest` on python3's path."""
    import shutil

    import cloudbuild

    source = Path(cloudbuild.__file__).parent
    target = root / dest.lstrip("/") / "cloudbuild"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "__init__.py", target / "__init__.py")
    for name in modules:
        src = source / name
        if src.is_dir():
            shutil.copytree(
                src, target / name, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True
            )
        else:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target / name)
    site = root / "usr/lib/python3/dist-packages"
    site.mkdir(parents=True, exist_ok=True)
    (site / "cloudbuild-guest.pth").write_text(dest + "\n")
    os.sync()
