"""Filesystems of the root volume: obs-build's mkfs/tunefs table and default mount options."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cloudbuild.errors import InfraError, UsageError
from cloudbuild.log import get_logger
from cloudbuild.options import DEFAULT_MOUNT_OPTIONS
from cloudbuild.runner import CommandError, run

log = get_logger(__name__)


@dataclass(frozen=True)
class Filesystem:
    name: str
    mkfs: tuple[str, ...]
    extra: tuple[str, ...] = ()  # tried first; dropped when this mkfs refuses them
    tunefs: tuple[str, ...] = ()
    mount_options: str = "noatime"  # what "__default" means for this filesystem
    kernel_modules: tuple[str, ...] = ()  # what a modular guest kernel must load to mount it


FILESYSTEMS: dict[str, Filesystem] = {
    # ext4 without journal, huge_file and resize_inode: a throw-away build root needs none of them
    "ext4": Filesystem(
        "ext4",
        ("mkfs.ext4", "-m", "0", "-q", "-F", "-O", "^has_journal,^huge_file,^resize_inode,sparse_super"),
        extra=("-E", "lazy_itable_init,discard"),
        tunefs=("tune2fs", "-c", "0"),
        mount_options="noatime",
        kernel_modules=("crc16", "mbcache", "jbd2", "crc32c_generic", "ext4"),
    ),
    "ext3": Filesystem(
        "ext3",
        ("mkfs.ext3", "-m", "0", "-q", "-F"),
        tunefs=("tune2fs", "-c", "0", "-o", "journal_data_writeback"),
        mount_options="data=writeback,nobarrier,commit=150,noatime",
        kernel_modules=("crc16", "mbcache", "jbd2", "crc32c_generic", "ext4"),
    ),
    "ext2": Filesystem(
        "ext2",
        ("mkfs.ext2", "-m", "0", "-q", "-F"),
        tunefs=("tune2fs", "-c", "0"),
        # obs-build says "noacl,noatime", but the ext4 driver that mounts ext2 on current kernels
        # refuses "noacl" ("Unknown parameter"); unused ACLs cost nothing
        mount_options="noatime",
        kernel_modules=("crc16", "mbcache", "jbd2", "crc32c_generic", "ext4"),
    ),
    "reiserfs": Filesystem(
        "reiserfs",
        ("mkreiserfs", "-q", "-f"),
        mount_options="data=writeback,commit=150,noatime",
        kernel_modules=("reiserfs",),
    ),
    "btrfs": Filesystem(
        "btrfs",
        ("mkfs.btrfs", "-f"),
        mount_options="nobarrier,noatime",
        kernel_modules=("xor", "raid6_pq", "libcrc32c", "crc32c_generic", "zstd_compress", "btrfs"),
    ),
    "xfs": Filesystem(
        "xfs", ("mkfs.xfs", "-f"), mount_options="noatime", kernel_modules=("libcrc32c", "xfs")
    ),
}


def filesystem(name: str) -> Filesystem:
    try:
        return FILESYSTEMS[name]
    except KeyError:
        raise UsageError(
            f"--vm-disk-filesystem: filesystem '{name}' is not supported (choose {', '.join(FILESYSTEMS)})"
        ) from None


def mount_options(fs_name: str, configured: str = DEFAULT_MOUNT_OPTIONS) -> str:
    """The `-o` options for the root: the configured ones, or the filesystem's defaults for `__default`.

    obs-build passes options as "-o a,b"; a leading "-o" is accepted and dropped here.
    """
    if configured == DEFAULT_MOUNT_OPTIONS:
        return filesystem(fs_name).mount_options
    text = configured.strip()
    if text.startswith("-o"):
        text = text[2:].strip()
    return text


def make_filesystem(device: Path, fs_name: str, *, timeout: float | None = 600) -> None:
    """mkfs (with the extra options, again without them if refused), then tunefs."""
    fs = filesystem(fs_name)
    log.info("mkfs", fs=fs.name, device=str(device))
    try:
        run([*fs.mkfs, *fs.extra, device], timeout=timeout)
    except CommandError as exc:
        if not fs.extra:
            raise InfraError(f"mkfs.{fs.name} on {device} failed: {exc}") from exc
        log.warning("mkfs refused the extra options, trying again without them", error=str(exc))
        try:
            run([*fs.mkfs, device], timeout=timeout)
        except CommandError as exc2:
            raise InfraError(f"mkfs.{fs.name} on {device} failed: {exc2}") from exc2
    if fs.tunefs:
        try:
            run([*fs.tunefs, device], timeout=timeout)
        except CommandError as exc:
            raise InfraError(f"tunefs of {device} failed: {exc}") from exc
