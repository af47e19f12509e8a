"""The guest kernel: which one to boot, its release, and its uncompressed form (cached).

qemu boots an uncompressed ELF `vmlinux` through its PVH entry point about twice as fast as
the bzImage under TCG (the kernel no longer decompresses itself in emulated code), so the
vmlinux is extracted once per kernel and cached.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import tempfile
import zlib
from pathlib import Path

from cloudbuild.errors import HostBroken, UsageError
from cloudbuild.log import get_logger
from cloudbuild.runner import CommandError, run

log = get_logger(__name__)

ELF_MAGIC = b"\x7fELF"
_VERSION_KEY = re.compile(r"(\d+)|(\D+)")
# magic -> how to decompress: compressed kernels embed their payload after the setup code
_PAYLOADS: tuple[tuple[str, bytes], ...] = (
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("xz", b"\xfd7zXZ\x00"),
    ("gzip", b"\x1f\x8b\x08"),
)


def cache_dir() -> Path:
    """Where derived boot files live: $CLOUDBUILD_CACHE_DIR, $XDG_CACHE_HOME/cloudbuild,
    /var/cache/cloudbuild (root) or ~/.cache/cloudbuild."""
    if os.environ.get("CLOUDBUILD_CACHE_DIR"):
        return Path(os.environ["CLOUDBUILD_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "cloudbuild"
    if os.geteuid() == 0:
        return Path("/var/cache/cloudbuild")
    return Path.home() / ".cache" / "cloudbuild"


def _version_key(name: str) -> list[tuple[int, str]]:
    return [(int(num), "") if num else (0, text) for num, text in _VERSION_KEY.findall(name)]


def host_kernel(boot: Path = Path("/boot")) -> Path:
    """The newest /boot/vmlinuz-* that has its modules installed (the seed boots the host's kernel)."""
    candidates = sorted(boot.glob("vmlinuz-*"), key=lambda p: _version_key(p.name), reverse=True)
    for kernel in candidates:
        if (Path("/lib/modules") / kernel.name.removeprefix("vmlinuz-")).is_dir():
            return kernel
    if candidates:
        return candidates[0]
    raise HostBroken(
        f"no kernel in {boot} to boot the build machine: install linux-image-amd64 or pass --vm-kernel"
    )


def kernel_release(kernel: Path) -> str:
    """The release (`uname -r`) of a kernel file: from a bzImage's setup header, else its file name."""
    with open(kernel, "rb") as f:
        head = f.read(0x10000)
    if head[0x202:0x206] == b"HdrS":
        offset = int.from_bytes(head[0x20E:0x210], "little") + 0x200
        text = head[offset : offset + 256].split(b"\0", 1)[0].decode("ascii", "replace")
        if text.split():
            return text.split()[0]
    for prefix in ("vmlinuz-", "vmlinux-", "bzImage-"):
        if kernel.name.startswith(prefix):
            return kernel.name[len(prefix) :]
    raise UsageError(f"--vm-kernel {kernel}: cannot tell its release; name it vmlinuz-RELEASE")


def _decompress(kind: str, data: bytes) -> bytes:
    if kind == "xz":
        return lzma.LZMADecompressor().decompress(data)
    if kind == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
    try:
        proc = run(["zstd", "-dc"], input=data, text=False, timeout=120)
    except CommandError:
        return b""
    out: bytes = proc.stdout
    return out


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The ELF inside a compressed kernel (what scripts/extract-vmlinux does), None when not found."""
    if bzimage.startswith(ELF_MAGIC):
        return bzimage
    for kind, magic in _PAYLOADS:
        start = bzimage.find(magic)
        while start >= 0:
            try:
                payload = _decompress(kind, bzimage[start:])
            except (lzma.LZMAError, zlib.error, OSError, EOFError):
                payload = b""
            if payload.startswith(ELF_MAGIC):
                return payload
            start = bzimage.find(magic, start + 1)
    return None


XEN_ELFNOTE_PHYS32_ENTRY = 18  # the PVH entry point qemu needs to boot an ELF kernel directly


def has_pvh_note(elf: bytes) -> bool:
    """Whether an x86-64 ELF kernel has the PVH entry note (CONFIG_PVH) qemu boots it through."""
    if len(elf) < 64 or elf[:4] != ELF_MAGIC or elf[4] != 2:  # ELFCLASS64 only
        return False
    phoff = int.from_bytes(elf[32:40], "little")
    phentsize = int.from_bytes(elf[54:56], "little")
    phnum = int.from_bytes(elf[56:58], "little")
    for index in range(min(phnum, 64)):
        header = elf[phoff + index * phentsize : phoff + (index + 1) * phentsize]
        if len(header) < 56 or int.from_bytes(header[0:4], "little") != 4:  # PT_NOTE
            continue
        offset = int.from_bytes(header[8:16], "little")
        end = offset + int.from_bytes(header[32:40], "little")
        while offset + 12 <= min(end, len(elf)):
            namesz, descsz, kind = (
                int.from_bytes(elf[offset + i : offset + i + 4], "little") for i in (0, 4, 8)
            )
            name = elf[offset + 12 : offset + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and kind == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            offset += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def bootable_kernel(kernel: Path, *, cache: Path | None = None) -> Path:
    """The uncompressed vmlinux of `kernel` from the cache (extracted on first use), else `kernel` itself."""
    st = kernel.stat()
    key = hashlib.sha256(f"{kernel.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = (cache or cache_dir()) / "kernels"
    target = folder / f"vmlinux-{key}"
    if target.exists():
        return target
    vmlinux = extract_vmlinux(kernel.read_bytes())
    if vmlinux is None or not has_pvh_note(vmlinux):
        log.info("kernel has no vmlinux with a PVH entry, booting it as it is", kernel=str(kernel))
        return kernel
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".vmlinux-")
    with os.fdopen(fd, "wb") as f:
        f.write(vmlinux)
    os.replace(tmp, target)
    log.info("extracted vmlinux", kernel=str(kernel), vmlinux=str(target), size=len(vmlinux))
    return target
