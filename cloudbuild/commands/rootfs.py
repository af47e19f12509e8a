"""`cloudbuild rootfs DIR`: a build root to start from.

- Default: a minimal root made offline in a second from busybox-static: /bin/sh and all
  busybox applets (sh, tar, gzip, sha256sum, awk, sed, ...), enough for a shell recipe.
- `--debootstrap SUITE [--include PKGS] [--mirror URL]`: a real Debian root (`debootstrap
  --variant=minbase`), e.g. `--include build-essential` for a compiler (needs the network).

DIR must not exist or be empty. The result is a folder for `cloudbuild build --rootfs DIR`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from cloudbuild import log as cblog
from cloudbuild.errors import HostBroken, InfraError, UsageError
from cloudbuild.runner import CommandError, run, which

log = cblog.get_logger(__name__)

DEFAULT_MIRROR = "http://deb.debian.org/debian"

PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cloudbuild rootfs",
        description="Create a build root: a minimal busybox one (offline, default) or a Debian one.",
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="where to create it (must not exist or be empty)")
    p.add_argument("--debootstrap", metavar="SUITE", help="a Debian root of SUITE (e.g. bookworm) instead")
    p.add_argument(
        "--include", default="", metavar="PKGS", help="comma-separated extra packages (debootstrap)"
    )
    p.add_argument(
        "--mirror", default=DEFAULT_MIRROR, metavar="URL", help=f"Debian mirror (default {DEFAULT_MIRROR})"
    )
    return p


def _check_target(target: Path) -> None:
    if target.is_symlink() or (target.exists() and (not target.is_dir() or any(target.iterdir()))):
        raise UsageError(f"{target}: must not exist or be an empty folder")


def busybox_rootfs(target: Path, *, busybox: Path | None = None) -> int:
    """Populate `target` with busybox-static and its applets; return the number of applets."""
    busybox = busybox or which("busybox")
    if busybox is None:
        raise HostBroken("busybox not found: install busybox-static")
    busybox = busybox.resolve()
    proc = run(["ldd", busybox], check=False, timeout=30)
    if proc.returncode == 0 and "=>" in proc.stdout:
        raise HostBroken(f"{busybox} is dynamically linked: install busybox-static")
    for folder in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "root",
        "tmp",
        "proc",
        "sys",
        "dev",
        "var/tmp",
    ):
        (target / folder).mkdir(parents=True, exist_ok=True)
    os.chmod(target / "tmp", 0o1777)
    os.chmod(target / "var/tmp", 0o1777)
    os.chmod(target / "root", 0o700)
    (target / "bin" / "busybox").write_bytes(busybox.read_bytes())
    os.chmod(target / "bin" / "busybox", 0o755)
    applets = run([target / "bin" / "busybox", "--list-full"], timeout=30).stdout.split()
    count = 0
    for applet in applets:
        if applet == "linuxrc" or "/" not in applet:
            continue
        link = target / applet
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(target / "bin" / "busybox", link.parent))
        count += 1
    (target / "etc" / "passwd").write_text(PASSWD)
    (target / "etc" / "group").write_text(GROUP)
    (target / "etc" / "hostname").write_text("cloudbuild\n")
    return count


def debootstrap_rootfs(target: Path, suite: str, *, include: str, mirror: str) -> None:
    tool = which("debootstrap")
    if tool is None:
        raise HostBroken("debootstrap not found: apt-get install -y --no-install-recommends debootstrap")
    argv: list[str | Path] = [tool, "--variant=minbase"]
    if include:
        argv.append(f"--include={include}")
    argv += [suite, target, mirror]
    try:
        run(argv, timeout=3600, capture=False)
    except CommandError as exc:
        raise InfraError(f"debootstrap {suite} failed: {exc}") from exc


def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(list(argv))
    target: Path = args.dir.absolute()
    _check_target(target)
    target.mkdir(parents=True, exist_ok=True)
    if args.debootstrap:
        debootstrap_rootfs(target, args.debootstrap, include=args.include, mirror=args.mirror)
        print(f"Debian {args.debootstrap} build root in {target}")
    else:
        if args.include:
            raise UsageError("--include needs --debootstrap (the busybox root has no package manager)")
        count = busybox_rootfs(target)
        print(f"busybox build root in {target} ({count} applets)")
    return 0
