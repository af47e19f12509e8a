"""Staging the build root on the host (obs-build's vm_first_stage, minus the package install).

Layout inside the root volume, the contract with the guest agent (`cloudbuild/guest/agent.py`):

    /.build/build.data      obs-build's variables (every one vm_first_stage writes) + ours below
    /.build/.date           `@<epoch>`: the fallback time for a machine with a broken clock
    /.build-srcdir/         the recipe's folder; RECIPEFILE names the recipe inside it
    /.build.out/results/    $BUILD_RESULTS: what the recipe puts here comes back into --dest
    /.build.out/_statistics written by the agent, comes back as DEST.statistics

Variables cloudbuild adds to obs-build's: BUILD_RESULTS, BUILD_ID, VMDISK_FILESYSTEM.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from cloudbuild.buildroot.builddata import fill_defaults, write_build_data
from cloudbuild.disk.mount import mounted
from cloudbuild.errors import InfraError, UsageError
from cloudbuild.guest import personality
from cloudbuild.log import get_logger
from cloudbuild.options import VmOptions
from cloudbuild.runner import CommandError, run

log = get_logger(__name__)

BUILD_DIR = ".build"
SRCDIR = ".build-srcdir"
OUT_DIR = ".build.out"
RESULTS = "results"
STATISTICS = "_statistics"
GUEST_RESULTS = f"/{OUT_DIR}/{RESULTS}"

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".tar.zst", ".tzst")


def rootfs_kind(source: Path) -> str:
    """`dir`, `tar` or `image` (a filesystem image: ext*, xfs, btrfs, squashfs, ...)."""
    if source.is_dir():
        return "dir"
    if not source.is_file():
        raise UsageError(f"--rootfs {source}: no such directory, tarball or image")
    if source.name.endswith(_TAR_SUFFIXES):
        return "tar"
    with open(source, "rb") as f:
        head = f.read(0x10048)
    if (
        head[1080:1082] == b"\x53\xef"
        or head[:4] in (b"XFSB", b"hsqs")
        or head[0x10040:0x10048] == b"_BHRfS_M"
    ):
        return "image"
    if head[257:262] == b"ustar" or head[:3] == b"\x1f\x8b\x08" or head[:6] == b"\xfd7zXZ\x00":
        return "tar"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "tar"
    raise UsageError(f"--rootfs {source}: neither a directory, a tarball nor a filesystem image")


def copy_rootfs(source: Path, target: Path, *, workdir: Path, timeout: float | None = 1800) -> None:
    """Fill `target` with the build root from a directory, a tarball or a filesystem image."""
    kind = rootfs_kind(source)
    log.info("copying the build root", rootfs=str(source), kind=kind)
    try:
        if kind == "dir":
            run(["cp", "-a", "--", f"{source}/.", f"{target}/"], timeout=timeout)
        elif kind == "tar":
            run(["tar", "-xpf", source, "--numeric-owner", "-C", target], timeout=timeout)
        else:
            with mounted(source, workdir / "rootfs-image", fstype="auto", options="ro") as image:
                run(["cp", "-a", "--", f"{image}/.", f"{target}/"], timeout=timeout)
    except CommandError as exc:
        raise InfraError(f"cannot copy the build root from {source}: {exc}") from exc
    if not (target / "bin" / "sh").exists() and not (target / "bin").is_symlink():
        raise UsageError(f"--rootfs {source}: no /bin/sh in it (make one with `cloudbuild rootfs DIR`)")


def build_variables(
    options: VmOptions,
    recipe: Path,
    *,
    build_id: str,
    guest_swap: str | None,
    extra: Mapping[str, str | Sequence[str]] | None = None,
) -> dict[str, str | list[str]]:
    """build.data for this build: obs-build's variables with their defaults, then ours."""
    from cloudbuild.disk.mkfs import mount_options

    given: dict[str, str | Sequence[str]] = {
        "RECIPEFILE": recipe.name,
        "BUILD_JOBS": str(options.jobs),
        "BUILD_ARCH": platform.machine(),
        "PERSONALITY": str(personality.for_build_data(options.vm_type)),
        "MYHOSTNAME": socket.gethostname(),
        "VM_TYPE": options.vm_type,
        "DO_STATISTICS": "1",
        "VM_WATCHDOG": "true" if options.watchdog else "",
        "VMDISK_MOUNT_OPTIONS": f"-o {mount_options(options.filesystem, options.mount_options)}",
        "BUILD_RESULTS": GUEST_RESULTS,
        "BUILD_ID": build_id,
        "VMDISK_FILESYSTEM": options.filesystem,
    }
    if options.shell:
        given["RUN_SHELL"] = "1"
    if options.shell_after_fail:
        given["RUN_SHELL_AFTER_FAIL"] = "1"
    if guest_swap:
        given["VM_SWAP"] = guest_swap
    given.update(extra or {})
    return fill_defaults(given)


def stage_build_root(root: Path, recipe: Path, variables: Mapping[str, str | Sequence[str]]) -> None:
    """Write /.build, /.build-srcdir and /.build.out into the (mounted or folder) build root."""
    build_dir = root / BUILD_DIR
    shutil.rmtree(build_dir, ignore_errors=True)
    build_dir.mkdir(mode=0o755)
    write_build_data(build_dir / "build.data", variables)
    (build_dir / ".date").write_text(f"@{int(time.time())}\n")
    srcdir = root / SRCDIR
    shutil.rmtree(srcdir, ignore_errors=True)
    try:
        run(["cp", "-a", "--", f"{recipe.parent}/.", f"{srcdir}/"], timeout=600)
    except CommandError as exc:
        raise InfraError(f"cannot copy the recipe folder {recipe.parent}: {exc}") from exc
    shutil.rmtree(root / OUT_DIR, ignore_errors=True)
    (root / OUT_DIR / RESULTS).mkdir(parents=True, mode=0o755)
    for sub in ("proc", "sys", "dev", "tmp"):
        (root / sub).mkdir(exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
