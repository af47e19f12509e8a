from __future__ import annotations

import io
import lzma
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from cloudbuild.errors import HostBroken
from local_backends import initramfs, kernel, kmod
from local_backends.cpio import CpioWriter
from local_backends.machines.kvm import kvm_problem


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, data) of a newc archive (a tiny reader to check the writer)."""
    entries: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        body = name_start + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data[body : body + size])
        pos = body + size + (-size % 4)


def test_cpio_writer_round_trip_and_the_system_cpio_agrees(tmp_path: Path) -> None:
    buf = io.BytesIO()
    cpio = CpioWriter(buf)
    cpio.file("a/b/c.txt", b"hello")
    cpio.symlink("bin/sh", "busybox")
    cpio.char_device("dev/console", 5, 1)
    cpio.file("a/b/c.txt", b"duplicate is ignored")
    cpio.close()
    entries = read_cpio(buf.getvalue())
    assert entries["a/b/c.txt"] == (stat.S_IFREG | 0o644, b"hello")
    assert stat.S_ISDIR(entries["a"][0]) and stat.S_ISDIR(entries["a/b"][0])
    assert entries["bin/sh"] == (stat.S_IFLNK | 0o777, b"busybox")
    assert stat.S_ISCHR(entries["dev/console"][0])
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=buf.getvalue(), capture_output=True, check=True)
    assert sorted(listing.stdout.decode().split()) == sorted(entries)


MODULES_DEP = """\
kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/fs/jbd2/jbd2.ko:
kernel/fs/mbcache.ko:
kernel/lib/crc16.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
"""


def fake_modules(tmp_path: Path) -> Path:
    folder = tmp_path / "lib/modules/6.1.0-test"
    folder.mkdir(parents=True)
    (folder / "modules.dep").write_text(MODULES_DEP)
    (folder / "modules.builtin").write_text("kernel/crypto/crc32c_generic.ko\n")
    for line in MODULES_DEP.splitlines():
        path = folder / line.split(":")[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        content = f"module {path.name}".encode()
        path.write_bytes(lzma.compress(content) if path.name.endswith(".xz") else content)
    return folder


def test_modules_resolve_dependencies_first_and_skip_builtins(tmp_path: Path) -> None:
    index = kmod.ModuleIndex.load(fake_modules(tmp_path))
    order = [kmod.module_name(p) for p in index.resolve(["virtio-blk", "crc32c_generic", "ext4"])]
    assert order == ["virtio_ring", "virtio", "virtio_blk", "jbd2", "mbcache", "crc16", "ext4"]
    with pytest.raises(HostBroken, match="nosuchfs"):
        index.resolve(["nosuchfs"])


def test_soft_dependencies_resolve_through_aliases_preferring_generic(tmp_path: Path) -> None:
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / "modules.dep").write_text(
        "kernel/fs/xfs/xfs.ko: kernel/lib/libcrc32c.ko\nkernel/lib/libcrc32c.ko:\n"
        "kernel/arch/x86/crypto/crc32c-intel.ko:\nkernel/crypto/crc32c_generic.ko:\n"
    )
    (folder / "modules.softdep").write_text("# comment\nsoftdep libcrc32c pre: crc32c post: nothing\n")
    (folder / "modules.alias").write_text("alias crc32c crc32c_intel\nalias crc32c crc32c_generic\n")
    order = [kmod.module_name(p) for p in kmod.ModuleIndex.load(folder).resolve(["xfs"])]
    assert order == ["crc32c_generic", "libcrc32c", "xfs"]


def test_compressed_modules_are_decompressed(tmp_path: Path) -> None:
    folder = fake_modules(tmp_path)
    assert kmod.module_bytes(folder / "kernel/fs/ext4/ext4.ko.xz") == b"module ext4.ko.xz"
    assert kmod.module_name("kernel/fs/ext4/ext4.ko.zst") == "ext4"


def test_missing_modules_dep_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(HostBroken, match="depmod"):
        kmod.ModuleIndex.load(tmp_path)


def fake_bzimage(release: str, payload: bytes) -> bytes:
    head = bytearray(0x1000)
    head[0x202:0x206] = b"HdrS"
    version_at = 0x800
    head[0x20E:0x210] = (version_at - 0x200).to_bytes(2, "little")
    text = f"{release} (builder@example) #1 SMP".encode() + b"\0"
    head[version_at : version_at + len(text)] = text
    return bytes(head) + b"junk" + payload + b"trailing junk"


def fake_elf(*, pvh: bool = True) -> bytes:
    """An ELF64 header, one PT_NOTE program header and a note ("Xen", type 18 = PVH entry)."""
    note = (4).to_bytes(4, "little") + (8).to_bytes(4, "little") + (18 if pvh else 5).to_bytes(4, "little")
    note += b"Xen\0" + (0x1000000).to_bytes(8, "little")
    header = bytearray(64)
    header[:5] = b"\x7fELF\x02"
    header[32:40] = (64).to_bytes(8, "little")  # e_phoff
    header[54:56] = (56).to_bytes(2, "little")  # e_phentsize
    header[56:58] = (1).to_bytes(2, "little")  # e_phnum
    phdr = bytearray(56)
    phdr[0:4] = (4).to_bytes(4, "little")  # PT_NOTE
    phdr[8:16] = (120).to_bytes(8, "little")  # p_offset
    phdr[32:40] = len(note).to_bytes(8, "little")  # p_filesz
    return bytes(header) + bytes(phdr) + note + os.urandom(3000)


def test_pvh_note_detection() -> None:
    assert kernel.has_pvh_note(fake_elf())
    assert not kernel.has_pvh_note(fake_elf(pvh=False))
    assert not kernel.has_pvh_note(b"\x7fELF" + os.urandom(100))


def test_kernel_release_and_vmlinux_extraction(tmp_path: Path) -> None:
    elf = fake_elf()
    bz = tmp_path / "vmlinuz-ignored"
    bz.write_bytes(fake_bzimage("6.1.0-99-amd64", lzma.compress(elf, format=lzma.FORMAT_XZ)))
    assert kernel.kernel_release(bz) == "6.1.0-99-amd64"
    assert kernel.extract_vmlinux(bz.read_bytes()) == elf
    cached = kernel.bootable_kernel(bz, cache=tmp_path / "cache")
    assert cached.read_bytes() == elf
    assert kernel.bootable_kernel(bz, cache=tmp_path / "cache") == cached  # second time: the cache
    plain = tmp_path / "vmlinuz-1.2.3"
    plain.write_bytes(b"no header, no payload")
    assert kernel.kernel_release(plain) == "1.2.3"
    assert kernel.bootable_kernel(plain, cache=tmp_path / "cache") == plain


def test_initramfs_has_init_agent_python_busybox_and_modules_and_is_cached(tmp_path: Path) -> None:
    modules = fake_modules(tmp_path)
    cache = tmp_path / "cache"
    built = initramfs.build_initramfs("6.1.0-test", modules, ["virtio_blk", "ext4"], cache=cache)
    entries = read_cpio(built.read_bytes())
    assert entries["init"][0] & 0o111 and b"cloudbuild.guest.agent" in entries["init"][1]
    assert stat.S_ISREG(entries["bin/busybox"][0]) and entries["bin/sh"][1] == b"busybox"
    assert entries["etc/cloudbuild/modules"][1].decode().split() == [
        "00-virtio_ring.ko", "01-virtio.ko", "02-virtio_blk.ko", "03-jbd2.ko", "04-mbcache.ko",
        "05-crc16.ko", "06-ext4.ko",
    ]  # fmt: skip
    assert entries["lib/modules/06-ext4.ko"][1] == b"module ext4.ko.xz"  # decompressed
    assert "usr/bin/python3" in entries and "dev/console" in entries
    names = set(entries)
    for module in ("agent", "sysops", "stats"):
        assert f"lib/cloudbuild/cloudbuild/guest/{module}.py" in names
        assert any(n.startswith(f"lib/cloudbuild/cloudbuild/guest/__pycache__/{module}.") for n in names)
    assert "lib/cloudbuild/cloudbuild/disk/blocklist.py" in names
    assert "lib/cloudbuild/cloudbuild/buildroot/builddata.py" in names
    assert any(n.endswith("/encodings/utf_8.py") for n in names)
    assert not any("site-packages" in n or "structlog" in n for n in names)  # stdlib only
    assert sum(len(d) for _, d in entries.values()) < 40 * 1024 * 1024
    again = initramfs.build_initramfs("6.1.0-test", modules, ["virtio_blk", "ext4"], cache=cache)
    assert again == built
    other = initramfs.build_initramfs("6.1.0-test", modules, ["virtio_blk"], cache=cache)
    assert other != built


def test_module_list_comes_from_the_filesystem_table() -> None:
    assert initramfs.module_list("xfs")[-2:] == ("libcrc32c", "xfs")
    assert "virtio_blk" in initramfs.module_list("ext4")


def test_kvm_problem_names_kvm_pvm_and_missing_virtualisation(tmp_path: Path) -> None:
    dev = tmp_path / "kvm"
    sysmod = tmp_path / "module"
    cpuinfo = tmp_path / "cpuinfo"
    sysmod.mkdir()
    cpuinfo.write_text("flags\t\t: fpu vme sse2 vmx\n")
    assert "does not exist" in (kvm_problem(dev=dev, sys_module=sysmod, cpuinfo=cpuinfo) or "")
    dev.write_text("")
    assert kvm_problem(dev=dev, sys_module=sysmod, cpuinfo=cpuinfo) is None
    (sysmod / "kvm_pvm").mkdir()
    assert "kvm_pvm" in (kvm_problem(dev=dev, sys_module=sysmod, cpuinfo=cpuinfo) or "")
    (sysmod / "kvm_pvm").rmdir()
    cpuinfo.write_text("flags\t\t: fpu vme sse2\n")
    assert "vmx/svm" in (kvm_problem(dev=dev, sys_module=sysmod, cpuinfo=cpuinfo) or "")


def test_build_root_kernel_boots_with_modules_copied_out_of_the_build_root(
    tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from cloudbuild.backend import BuildSlot
    from cloudbuild.options import VmOptions
    from local_backends.machines.qemu import QemuBackend

    monkeypatch.setenv("CLOUDBUILD_CACHE_DIR", str(tmp_path / "cache"))
    buildroot = tmp_path / "buildroot"
    modules = fake_modules(buildroot)  # lib/modules/6.1.0-test inside the build root
    (buildroot / ".build.kernel.qemu").write_bytes(fake_bzimage("6.1.0-test", b""))
    backend = QemuBackend(VmOptions(vm_type="qemu"))
    backend.volumes(BuildSlot("b", 0, tmp_path / "work"))
    backend.kernel_files(buildroot)
    assert backend.root_kernel is not None and backend.root_kernel.read_bytes()[0x202:0x206] == b"HdrS"
    assert backend.root_modules is not None
    assert (backend.root_modules / "kernel/fs/ext4/ext4.ko.xz").exists()
    assert not (backend.root_modules / "kernel/drivers/virtio/virtio_mmio.ko").exists()
    kernel_file, initrd = backend.boot_files()
    assert kernel_file == backend.root_kernel  # no payload to extract: booted as it is
    assert initrd is not None
    packed = {name.split("-", 1)[1]: data for name, (_, data) in read_cpio(initrd.read_bytes()).items()
              if name.startswith("lib/modules/")}  # fmt: skip
    assert packed["ext4.ko"] == b"module ext4.ko.xz" and "virtio_pci.ko" in packed
    assert modules.is_dir()
    backend.cleanup()
    assert not (tmp_path / "work" / "boot").exists()


def test_prune_keeps_the_newest_and_anything_recent(tmp_path: Path) -> None:
    now = time.time()
    for index in range(12):
        path = tmp_path / f"initramfs-r-{index:02d}.cpio"
        path.write_bytes(b"x")
        age = 7200 + index * 60 if index < 10 else 10  # 10 old ones, 2 fresh ones
        os.utime(path, (now - age, now - age))
    initramfs.prune(tmp_path, keep=3)
    left = sorted(p.name for p in tmp_path.iterdir())
    # the two fresh ones, and the newest old one (keep=3 counts the fresh ones)
    assert left == ["initramfs-r-00.cpio", "initramfs-r-10.cpio", "initramfs-r-11.cpio"]
