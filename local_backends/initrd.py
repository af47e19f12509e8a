"""A given initrd opened up: the build root's kernel modules merged into the worker's initrd (z/VM).

obs-build's z/VM path boots the worker's initrd with the build root's kernel; that initrd only
has the modules of the worker's own kernel, so the build root's `/lib/modules/<release>` trees
are merged into a copy of it: unpacked with `cpio`, the modules copied in, packed again with
`cpio -H newc` and gzip (every kernel since 2.6 reads that).
"""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import tempfile
from pathlib import Path

from cloudbuild.errors import InfraError, UsageError
from cloudbuild.log import get_logger
from cloudbuild.runner import CommandError, run

log = get_logger(__name__)

MODULE_FOLDERS = ("lib/modules", "usr/lib/modules")


def decompressed(data: bytes, name: str) -> bytes:
    """The cpio archive inside an initrd compressed with gzip, xz or zstd (or none)."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        try:
            out: bytes = run(["zstd", "-dc"], input=data, text=False, timeout=300).stdout
        except CommandError as exc:
            raise InfraError(f"cannot decompress {name} (zstd): {exc}") from exc
        return out
    if data[:6] in (b"070701", b"070702"):
        return data
    raise UsageError(f"--vm-initrd {name}: neither a cpio archive nor gzip, xz or zstd compressed")


def module_trees(buildroot: Path) -> list[Path]:
    """The build root's `<release>` folders of kernel modules (real folders, never links)."""
    trees: list[Path] = []
    for folder in MODULE_FOLDERS:
        top = buildroot / folder
        if (
            top.is_symlink()
            or not top.is_dir()
            or (folder == "lib/modules" and (buildroot / "lib").is_symlink())
        ):
            continue
        trees += [p for p in sorted(top.iterdir()) if p.is_dir() and not p.is_symlink()]
    return trees


def merge_modules(initrd: Path, buildroot: Path, target: Path) -> int:
    """`initrd` with the build root's kernel modules as `target` (gzip'd newc); how many trees merged."""
    trees = module_trees(buildroot)
    if not trees:
        shutil.copyfile(initrd, target)
        return 0
    archive = decompressed(initrd.read_bytes(), str(initrd))
    with tempfile.TemporaryDirectory(prefix="initrd-", dir=target.parent) as tmp:
        unpacked = Path(tmp) / "root"
        unpacked.mkdir()
        try:
            run(["cpio", "-i", "-d", "-m", "--quiet", "--no-absolute-filenames"], input=archive, text=False,
                cwd=unpacked, timeout=300)  # fmt: skip
            for tree in trees:
                dest = unpacked / "lib" / "modules" / tree.name
                if (unpacked / "lib").is_symlink():  # a merged-/usr initrd: lib -> usr/lib
                    dest = unpacked / "usr" / "lib" / "modules" / tree.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                run(["cp", "-a", "--", f"{tree}/.", f"{dest}/"], timeout=300)
            names = "\n".join(
                os.path.relpath(os.path.join(d, n), unpacked)
                for d, dirs, files in os.walk(unpacked)
                for n in (*dirs, *files)
            )
            packed = run(["cpio", "-o", "-H", "newc", "--quiet"], input=names + "\n", text=False,
                         cwd=unpacked, timeout=300).stdout  # fmt: skip
        except CommandError as exc:
            raise InfraError(f"cannot merge the build root's modules into {initrd}: {exc}") from exc
    target.write_bytes(gzip.compress(packed, compresslevel=6))
    log.info("merged the build root's modules into the initrd", releases=[t.name for t in trees])
    return len(trees)
