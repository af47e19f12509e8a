from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cloudbuild.errors import UsageError
from cloudbuild.options import VmOptions, parse
from cloudbuild.volume import Role, VolumeState
from local_backends.localvolume import LocalVolume, default_paths, local_volumes


def test_owned_image_is_created_attached_as_its_path_and_deleted(tmp_path: Path) -> None:
    volume = LocalVolume(Role.ROOT, tmp_path / "root.img", 8)
    assert volume.state() is VolumeState.ABSENT
    volume.create()
    assert (tmp_path / "root.img").stat().st_size == 8 * 1024 * 1024
    assert volume.attach() == tmp_path / "root.img"
    assert volume.state() is VolumeState.AVAILABLE
    volume.release()
    assert not (tmp_path / "root.img").exists()
    volume.release()  # idempotent


def test_user_image_is_reused_and_kept(tmp_path: Path) -> None:
    image = tmp_path / "mine.img"
    image.write_bytes(b"old contents")
    volume = LocalVolume(Role.ROOT, image, 8, owned=False)
    volume.create()
    assert image.read_bytes() == b"old contents"  # reused as it is (mkfs follows for a root)
    volume.release()
    assert image.exists()


def test_vmdisk_clean_recreates_an_existing_image_but_keeps_a_user_one(tmp_path: Path) -> None:
    image = tmp_path / "mine.img"
    image.write_bytes(b"old contents")
    volume = LocalVolume(Role.SWAP, image, 4, owned=False, clean=True)
    volume.create()
    assert image.stat().st_size == 4 * 1024 * 1024
    assert image.read_bytes()[:12] == b"\0" * 12
    volume.release()
    assert image.exists()


def test_block_device_is_never_recreated_or_deleted(tmp_path: Path) -> None:
    # a block device node of our own (loop major 7, a minor no loop uses): the host's /dev/loopN
    # come and go as other tests attach and remove loop devices
    device = tmp_path / "blockdev"
    os.mknod(device, stat.S_IFBLK | 0o600, os.makedev(7, 1000))
    volume = LocalVolume(Role.SWAP, device, 4, owned=True, clean=True)
    volume.create()
    volume.delete()
    assert device.exists() and volume.is_block_device


def test_neither_file_nor_device_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="neither an image file nor a block device"):
        LocalVolume(Role.ROOT, tmp_path, 4).create()


def test_default_paths_follow_obs_build_with_root(tmp_path: Path) -> None:
    options = VmOptions(vm_type="qemu", root=str(tmp_path / "buildroot"))
    assert default_paths(options, tmp_path / "work") == (
        tmp_path / "buildroot.img",
        tmp_path / "buildroot.swap",
    )
    assert default_paths(VmOptions(vm_type="qemu"), tmp_path / "work") == (
        tmp_path / "work" / "root.img",
        tmp_path / "work" / "swap.img",
    )


def test_local_volumes_from_options(tmp_path: Path) -> None:
    options = parse(
        [
            "--vm-type", "qemu", "--vm-disk", str(tmp_path / "r.img"), "--vm-disk-size", "100",
            "--vm-swap-size", "50", "--vmdisk-clean",
        ]
    )  # fmt: skip
    pair = local_volumes(options, tmp_path / "work")
    assert isinstance(pair.root, LocalVolume) and isinstance(pair.swap, LocalVolume)
    assert (pair.root.path, pair.root.size_mib, pair.root.owned, pair.root.clean) == (
        tmp_path / "r.img",
        100,
        False,
        True,
    )
    assert (pair.swap.path, pair.swap.size_mib, pair.swap.owned) == (tmp_path / "work" / "swap.img", 50, True)
    # --root images are obs-build's, kept between builds
    kept = local_volumes(VmOptions(vm_type="qemu", root=str(tmp_path / "b")), tmp_path / "work")
    assert not kept.root.owned and kept.swap is not None and not kept.swap.owned


def test_swap_cannot_be_the_root(tmp_path: Path) -> None:
    options = VmOptions(vm_type="qemu", vm_image=str(tmp_path / "x.img"), vm_swap=str(tmp_path / "x.img"))
    with pytest.raises(UsageError, match="is the root disk too"):
        local_volumes(options, tmp_path)
