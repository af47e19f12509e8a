"""Host steps without a VM: staging a root image and taking results back (swap and folder channels)."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from cloudbuild.backend import Backend, BootResult, BuildSlot, Console
from cloudbuild.buildroot import stage
from cloudbuild.buildroot.builddata import load_build_data
from cloudbuild.buildroot.hoststeps import DiskHostSteps, check_dest, statistics_path
from cloudbuild.commands.rootfs import busybox_rootfs
from cloudbuild.deadline import Deadline
from cloudbuild.disk import blocklist, buildstatus
from cloudbuild.errors import UntrustedData, UsageError
from cloudbuild.options import VmOptions
from cloudbuild.volume import VolumePair


class RecordingBackend(Backend):
    name = "recording"
    guest_swap_device = "/dev/disk/by-id/virtio-1"

    def __init__(self, options: VmOptions):
        super().__init__(options)
        self.seen: list[str] = []

    def verify(self) -> None: ...

    def volumes(self, slot: BuildSlot) -> VolumePair:
        raise NotImplementedError

    def fixup(self, buildroot: Path) -> None:
        self.seen.append("fixup:" + ",".join(sorted(p.name for p in buildroot.iterdir())))

    def kernel_files(self, buildroot: Path) -> None:
        self.seen.append("kernel_files")

    def boot_and_wait(
        self, pair: VolumePair, slot: BuildSlot, *, timeout: float | None, console: Console
    ) -> BootResult:
        raise NotImplementedError

    def kill(self) -> None: ...


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("rootfs")
    busybox_rootfs(target)
    return target


def recipe(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "data").mkdir(parents=True)
    (src / "data" / "input").write_text("input")
    (src / "build.sh").write_text("#!/bin/sh\n")
    (src / "build.sh").chmod(0o755)
    return src / "build.sh"


def test_rootfs_kinds(tmp_path: Path, rootfs: Path) -> None:
    assert stage.rootfs_kind(rootfs) == "dir"
    tar = tmp_path / "root.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        t.add(rootfs / "bin", arcname="bin")
    assert stage.rootfs_kind(tar) == "tar"
    (tmp_path / "unnamed").write_bytes(tar.read_bytes())
    assert stage.rootfs_kind(tmp_path / "unnamed") == "tar"
    (tmp_path / "junk").write_bytes(b"nothing we know")
    with pytest.raises(UsageError, match="neither"):
        stage.rootfs_kind(tmp_path / "junk")
    with pytest.raises(UsageError, match="no such"):
        stage.rootfs_kind(tmp_path / "missing")


def test_build_variables_have_obs_builds_and_ours(tmp_path: Path) -> None:
    options = VmOptions(vm_type="qemu", jobs=3, watchdog=True, filesystem="xfs")
    variables = stage.build_variables(options, tmp_path / "build.sh", build_id="b1", guest_swap="/dev/vdb")
    assert variables["RECIPEFILE"] == "build.sh" and variables["BUILD_JOBS"] == "3"
    assert variables["VM_SWAP"] == "/dev/vdb" and variables["VM_WATCHDOG"] == "true"
    assert variables["VMDISK_MOUNT_OPTIONS"] == "-o noatime" and variables["VMDISK_FILESYSTEM"] == "xfs"
    assert variables["BUILD_RESULTS"] == "/.build.out/results" and variables["BUILD_ID"] == "b1"
    assert variables["DO_STATISTICS"] == "1" and variables["repos"] == []
    keys = list(variables)
    assert keys.index("RECIPEFILE") < keys.index("ABUILD_TARGET") < keys.index("BUILD_RESULTS")


def test_prepare_root_makes_the_filesystem_and_stages_everything(tmp_path: Path, rootfs: Path) -> None:
    image = tmp_path / "root.img"
    subprocess.run(["truncate", "-s", "64M", image], check=True)
    options = VmOptions(vm_type="qemu", rootfs=str(rootfs), jobs=2)
    steps = DiskHostSteps(options, recipe(tmp_path), build_id="b2", workdir=tmp_path / "work")
    backend = RecordingBackend(options)
    steps.prepare_root(image, backend, Deadline("prepare", 60))
    assert backend.seen[0].startswith("fixup:") and ".build" in backend.seen[0]
    assert backend.seen[1] == "kernel_files"
    mnt = tmp_path / "check"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop,ro", image, mnt], check=True)
    try:
        data = load_build_data(mnt / ".build/build.data")
        assert data["RECIPEFILE"] == "build.sh" and data["VM_SWAP"] == "/dev/disk/by-id/virtio-1"
        assert (mnt / ".build/.date").read_text().startswith("@")
        assert (mnt / ".build-srcdir/data/input").read_text() == "input"
        assert (mnt / ".build.out/results").is_dir() and (mnt / "bin/sh").exists()
    finally:
        subprocess.run(["umount", mnt], check=True)


def test_prepare_root_from_a_tarball_in_a_folder(tmp_path: Path, rootfs: Path) -> None:
    tar = tmp_path / "root.tar"
    subprocess.run(["tar", "-cf", tar, "-C", rootfs, "."], check=True)
    options = VmOptions(vm_type="qemu", rootfs=str(tar))
    folder = tmp_path / "root"
    folder.mkdir()

    class FolderBackend(RecordingBackend):
        channel = "directory"

    DiskHostSteps(options, recipe(tmp_path), build_id="b3", workdir=tmp_path / "w").prepare_root(
        folder, FolderBackend(options), Deadline("prepare", 60)
    )
    assert (folder / "bin/busybox").is_file() and (folder / ".build/build.data").is_file()


def test_extract_by_manifest_moves_results_and_statistics(tmp_path: Path) -> None:
    image = tmp_path / "root.img"
    subprocess.run(["truncate", "-s", "64M", image], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", image], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    swap = tmp_path / "swap.img"
    swap.write_bytes(b"\0" * (1 << 20))
    subprocess.run(["mount", "-o", "loop", image, mnt], check=True)
    try:
        out = mnt / ".build.out"
        (out / "results/sub").mkdir(parents=True)
        (out / "results/sub/file").write_bytes(b"payload" * 1000)
        (out / "_statistics").write_text("MAX_mb_used_memory: 5\n")
        subprocess.run(["sync"], check=True)
        buf = io.BytesIO()
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        try:
            names = ["results", "results/sub", "results/sub/file", "_statistics"]
            blocklist.write_manifest(names, buf, padstart=512, padend=512, dir_fd=fd)
        finally:
            os.close(fd)
        swap.write_bytes(buf.getvalue().ljust(1 << 20, b"\0"))
        buildstatus.write(swap, 0)
    finally:
        subprocess.run(["umount", mnt], check=True)
    options = VmOptions(vm_type="qemu", rootfs="/nonexistent")
    steps = DiskHostSteps(options, tmp_path / "build.sh", build_id="b4", workdir=tmp_path)
    assert steps.read_status(swap) == 0
    dest = tmp_path / "dest"
    steps.extract(image, swap, dest, Deadline("extract", 60))
    assert (dest / "sub/file").read_bytes() == b"payload" * 1000
    assert statistics_path(dest).read_text() == "MAX_mb_used_memory: 5\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dest")] == []
    with pytest.raises(UsageError, match="must not exist or be an empty folder"):
        check_dest(dest)


def test_extract_from_a_folder_refuses_a_symlinked_results_folder(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / ".build.out").mkdir(parents=True)
    (root / ".build.out/results").symlink_to("/etc")
    options = VmOptions(vm_type="qemu", rootfs="/nonexistent")
    steps = DiskHostSteps(options, tmp_path / "build.sh", build_id="b5", workdir=tmp_path)
    with pytest.raises(UntrustedData):
        steps.extract(root, None, tmp_path / "dest", Deadline("extract", 60))
    assert not (tmp_path / "dest").exists()
