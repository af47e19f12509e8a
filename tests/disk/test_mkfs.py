"""Real mkfs on image files for every filesystem of the root volume, mounted with its default options.

Every tool is required: a missing one fails (runner raises CommandError "command not found").
reiserfs cannot be mounted by this kernel, so its filesystem is checked with reiserfsck/debugreiserfs.
Mounts go through `-o loop`, whose loop device the kernel frees at umount; the fixture checks that
no loop device is left pointing at a test image. Also: `--vmdisk-clean` on LocalVolume images and devices.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudbuild.disk.image import create_image, device_size, is_block_device, zero_head
from cloudbuild.disk.mkfs import FILESYSTEMS, filesystem, make_filesystem, mount_options
from cloudbuild.disk.mount import mounted
from cloudbuild.errors import InfraError, UsageError
from cloudbuild.options import DEFAULT_MOUNT_OPTIONS, parse
from cloudbuild.runner import run
from local_backends.localvolume import LocalVolume, local_volumes

MIB = 1024 * 1024
# the smallest images each mkfs accepts (xfsprogs wants 300 MiB)
SIZE_MIB = {"ext2": 32, "ext3": 32, "ext4": 32, "reiserfs": 40, "btrfs": 128, "xfs": 320}
MOUNTABLE = [name for name in FILESYSTEMS if name != "reiserfs"]


def loops_for(folder: Path) -> list[str]:
    out: str = run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"]).stdout
    return [line for line in out.splitlines() if str(folder) in line]


@pytest.fixture
def images(tmp_path: Path) -> Iterator[Path]:
    """A folder for images; afterwards: no loop device on them, and the images removed (they are big)."""
    folder = tmp_path / "images"
    folder.mkdir()
    yield folder
    leftover = loops_for(folder)
    for line in leftover:
        run(["losetup", "-d", line.split()[0]], check=False)
    for image in folder.glob("*.img"):
        image.unlink()
    assert leftover == [], f"loop devices left behind: {leftover}"


def mount_table_options(mountpoint: Path) -> set[str]:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(mountpoint):
            return set(fields[3].split(","))
    raise AssertionError(f"{mountpoint} is not mounted")


def dumpe2fs(image: Path) -> str:
    out: str = run(["dumpe2fs", "-h", image]).stdout
    return out


# --- image files ------------------------------------------------------------------------------


def test_create_image_allocates_the_size(images: Path) -> None:
    image = images / "sub" / "root.img"
    create_image(image, 16)
    assert device_size(image) == 16 * MIB
    assert os.stat(image).st_blocks * 512 >= 16 * MIB  # fallocate: really allocated
    assert not is_block_device(image)
    assert not is_block_device(images / "missing")


def test_create_image_falls_back_to_a_sparse_file(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "fallocate"
    fake.write_text("#!/bin/sh\necho 'fallocate: fallocate failed: Operation not supported' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    image = images / "sparse.img"
    create_image(image, 64)
    assert device_size(image) == 64 * MIB
    assert os.stat(image).st_blocks == 0


def test_zero_head_clears_the_start_without_truncating(images: Path) -> None:
    image = images / "swap.img"
    image.write_bytes(b"BUILDSTATUS0" + b"x" * 5000)
    zero_head(image)
    data = image.read_bytes()
    assert data[:1024] == b"\0" * 1024
    assert data[1024:] == b"x" * (5012 - 1024)


def test_block_devices_are_recognised() -> None:
    loop = Path("/dev/loop-control")
    assert stat.S_ISCHR(os.stat(loop).st_mode)
    assert not is_block_device(loop)
    assert any(is_block_device(Path("/dev") / name) for name in os.listdir("/dev") if name.startswith("loop"))


# --- mkfs and mount for every filesystem --------------------------------------------------------


def test_every_filesystem_has_a_size_here() -> None:
    assert set(SIZE_MIB) == set(FILESYSTEMS)


@pytest.mark.parametrize("fs", MOUNTABLE)
def test_mkfs_then_mount_with_the_default_options_and_write_a_file(
    fs: str, images: Path, tmp_path: Path
) -> None:
    image = images / f"{fs}.img"
    create_image(image, SIZE_MIB[fs])
    make_filesystem(image, fs)
    options = mount_options(fs, DEFAULT_MOUNT_OPTIONS)
    assert options == FILESYSTEMS[fs].mount_options
    mountpoint = tmp_path / "mnt"
    with mounted(image, mountpoint, fstype=fs, options=options) as root:
        assert "noatime" in mount_table_options(root)
        (root / "dir").mkdir()
        (root / "dir" / "file").write_bytes(b"result\n" * 1000)
        os.sync()
    assert not (mountpoint / "dir").exists()  # unmounted again
    with mounted(image, mountpoint, fstype=fs, options=options) as root:
        assert (root / "dir" / "file").read_bytes() == b"result\n" * 1000


def test_ext4_has_no_journal_and_no_mount_count_check(images: Path) -> None:
    image = images / "ext4.img"
    create_image(image, 32)
    make_filesystem(image, "ext4")
    header = dumpe2fs(image)
    features = next(line for line in header.splitlines() if line.startswith("Filesystem features:"))
    assert "has_journal" not in features
    assert "resize_inode" not in features
    assert "huge_file" not in features
    assert "Maximum mount count:      -1" in header  # tune2fs -c 0


def test_ext3_defaults_to_writeback_journaling(images: Path) -> None:
    image = images / "ext3.img"
    create_image(image, 32)
    make_filesystem(image, "ext3")
    header = dumpe2fs(image)
    assert "journal_data_writeback" in header
    assert "Maximum mount count:      -1" in header


def test_reiserfs_is_made_and_valid(images: Path) -> None:
    image = images / "reiserfs.img"
    create_image(image, SIZE_MIB["reiserfs"])
    make_filesystem(image, "reiserfs")
    info: str = run(["debugreiserfs", image]).stdout
    assert "Reiserfs super block" in info
    assert "format 3.6" in info
    assert "Filesystem state: consistent" in info
    check = run(["reiserfsck", "--check", "--yes", "--quiet", image])
    assert "No corruptions found" in check.stdout + check.stderr


def test_reiserfsck_would_notice_a_broken_filesystem(images: Path) -> None:
    # so that the check above means something
    image = images / "reiserfs.img"
    create_image(image, SIZE_MIB["reiserfs"])
    make_filesystem(image, "reiserfs")
    with open(image, "r+b") as handle:
        handle.seek(64 * 1024)  # the super block
        handle.write(b"\0" * 4096)
    assert run(["reiserfsck", "--check", "--yes", "--quiet", image], check=False).returncode != 0


# --- mkfs that refuses the extra options ------------------------------------------------------


def wrapper(bin_dir: Path, name: str, body: str) -> Path:
    """A script `name` on PATH that logs its arguments to name.log, then runs `body`."""
    bin_dir.mkdir(exist_ok=True)
    real = run(["sh", "-c", f"PATH=/usr/sbin:/sbin:$PATH command -v {name}"]).stdout.strip()
    assert real, f"{name} is needed"
    script = bin_dir / name
    script.write_text(f'#!/bin/sh\necho "$*" >> "{bin_dir / (name + ".log")}"\nREAL={real}\n{body}\n')
    script.chmod(0o755)
    return bin_dir / f"{name}.log"


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
    return folder


def test_mkfs_is_retried_without_the_extra_options_it_refuses(images: Path, bin_dir: Path) -> None:
    mkfs_log = wrapper(
        bin_dir,
        "mkfs.ext4",
        'for a in "$@"; do [ "$a" = -E ] && { echo "mkfs.ext4: invalid option -E" >&2; exit 1; }; done\n'
        'exec "$REAL" "$@"',
    )
    tune_log = wrapper(bin_dir, "tune2fs", 'exec "$REAL" "$@"')
    image = images / "ext4.img"
    create_image(image, 32)
    make_filesystem(image, "ext4")
    calls = mkfs_log.read_text().splitlines()
    assert len(calls) == 2
    assert "-E lazy_itable_init,discard" in calls[0]
    assert "-E" not in calls[1].split()
    assert calls[1].endswith(str(image))
    assert tune_log.read_text().splitlines() == [f"-c 0 {image}"]
    assert "Maximum mount count:      -1" in dumpe2fs(image)


def test_mkfs_that_fails_twice_is_an_infrastructure_error(images: Path, bin_dir: Path) -> None:
    log = wrapper(bin_dir, "mkfs.ext4", 'echo "mkfs.ext4: device busy" >&2; exit 1')
    tune_log = bin_dir / "tune2fs.log"
    wrapper(bin_dir, "tune2fs", 'exec "$REAL" "$@"')
    image = images / "ext4.img"
    create_image(image, 32)
    with pytest.raises(InfraError, match=r"mkfs.ext4 on .* failed: .*device busy"):
        make_filesystem(image, "ext4")
    assert len(log.read_text().splitlines()) == 2
    assert not tune_log.exists()


def test_mkfs_without_extras_is_not_retried(images: Path, bin_dir: Path) -> None:
    log = wrapper(bin_dir, "mkfs.xfs", 'echo "mkfs.xfs: no" >&2; exit 1')
    image = images / "xfs.img"
    create_image(image, 16)
    with pytest.raises(InfraError, match=r"mkfs.xfs on .* failed"):
        make_filesystem(image, "xfs")
    assert len(log.read_text().splitlines()) == 1


def test_a_failing_tunefs_is_an_infrastructure_error(images: Path, bin_dir: Path) -> None:
    wrapper(bin_dir, "tune2fs", 'echo "tune2fs: bad magic" >&2; exit 1')
    image = images / "ext2.img"
    create_image(image, 32)
    with pytest.raises(InfraError, match=r"tunefs of .* failed: .*bad magic"):
        make_filesystem(image, "ext2")


def test_mkfs_of_a_missing_tool_is_an_infrastructure_error(
    images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(FILESYSTEMS, "ext4", FILESYSTEMS["ext4"].__class__("ext4", ("cloudbuild-no-mkfs",)))
    with pytest.raises(InfraError, match="command not found"):
        make_filesystem(images / "x.img", "ext4")


# --- the table --------------------------------------------------------------------------------


def test_unknown_filesystem_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="filesystem 'zfs' is not supported"):
        filesystem("zfs")
    with pytest.raises(UsageError):
        make_filesystem(Path("/nonexistent"), "zfs")


def test_mkfs_table_is_obs_builds() -> None:
    assert FILESYSTEMS["ext4"].mkfs[:4] == ("mkfs.ext4", "-m", "0", "-q")
    assert FILESYSTEMS["ext4"].extra == ("-E", "lazy_itable_init,discard")
    assert FILESYSTEMS["ext3"].tunefs == ("tune2fs", "-c", "0", "-o", "journal_data_writeback")
    assert FILESYSTEMS["reiserfs"].mkfs == ("mkreiserfs", "-q", "-f")
    assert FILESYSTEMS["xfs"].mkfs == ("mkfs.xfs", "-f")


@pytest.mark.parametrize(
    ("configured", "expected"),
    [
        (DEFAULT_MOUNT_OPTIONS, "data=writeback,nobarrier,commit=150,noatime"),
        ("-o noatime,nodiratime", "noatime,nodiratime"),
        ("-onoatime", "noatime"),
        (" relatime ", "relatime"),
        ("", ""),
    ],
)
def test_mount_options(configured: str, expected: str) -> None:
    assert mount_options("ext3", configured) == expected


def test_mount_failure_is_an_infrastructure_error(images: Path, tmp_path: Path) -> None:
    image = images / "empty.img"
    create_image(image, 8)
    with pytest.raises(InfraError, match="cannot mount"), mounted(image, tmp_path / "m", fstype="ext4"):
        pass


# --- --vmdisk-clean (LocalVolume) -------------------------------------------------------------


def _volumes(*args: str, workdir: Path) -> tuple[LocalVolume, LocalVolume]:
    pair = local_volumes(parse(list(args)), workdir)
    assert isinstance(pair.root, LocalVolume) and isinstance(pair.swap, LocalVolume)
    return pair.root, pair.swap


def _mark(image: Path, size_mib: int) -> None:
    create_image(image, size_mib)
    with open(image, "r+b") as handle:
        handle.seek(3 * MIB)
        handle.write(b"OLD BUILD RESIDUE")


def _has_mark(image: Path) -> bool:
    with open(image, "rb") as handle:
        handle.seek(3 * MIB)
        return handle.read(17) == b"OLD BUILD RESIDUE"


def test_without_vmdisk_clean_old_images_are_reused(images: Path) -> None:
    root_img, swap_img = images / "root.img", images / "swap.img"
    _mark(root_img, 8)
    _mark(swap_img, 8)
    root, swap = _volumes(
        "--vm-disk", str(root_img), "--vm-swap", str(swap_img), "--vm-disk-size", "16", workdir=images
    )
    root.create()
    swap.create()
    assert _has_mark(root_img) and _has_mark(swap_img)
    assert device_size(root_img) == 8 * MIB  # reused as it is, not resized


def test_vmdisk_clean_deletes_old_image_files_and_creates_new_ones(images: Path) -> None:
    root_img, swap_img = images / "root.img", images / "swap.img"
    _mark(root_img, 8)
    _mark(swap_img, 8)
    root, swap = _volumes(
        "--vmdisk-clean", "--vm-disk", str(root_img), "--vm-swap", str(swap_img),
        "--vm-disk-size", "16", "--vm-swap-size", "12", workdir=images,
    )  # fmt: skip
    assert root.clean and swap.clean
    root.create()
    swap.create()
    assert not _has_mark(root_img) and not _has_mark(swap_img)
    assert (device_size(root_img), device_size(swap_img)) == (16 * MIB, 12 * MIB)
    # the user named them: cleaned, but kept after the build
    root.release()
    swap.release()
    assert root_img.exists() and swap_img.exists()


def test_vmdisk_clean_never_deletes_a_block_device(images: Path) -> None:
    backing = images / "disk.img"
    _mark(backing, 8)
    device = run(["losetup", "--find", "--show", backing]).stdout.strip()
    try:
        root, _ = _volumes("--vmdisk-clean", "--vm-disk", device, workdir=images)
        root.create()
        root.release()
        assert is_block_device(Path(device))
    finally:
        run(["losetup", "-d", device])
    assert _has_mark(backing)


def test_vmdisk_clean_then_mkfs_gives_a_fresh_filesystem(images: Path, tmp_path: Path) -> None:
    root_img = images / "root.img"
    create_image(root_img, 32)
    make_filesystem(root_img, "ext4")
    with mounted(root_img, tmp_path / "m", fstype="ext4", options="noatime") as mnt:
        (mnt / "residue").write_text("old")
    root, _ = _volumes("--vmdisk-clean", "--vm-disk", str(root_img), "--vm-disk-size", "32", workdir=images)
    root.create()
    make_filesystem(root_img, "ext4")
    with mounted(root_img, tmp_path / "m", fstype="ext4", options="noatime") as mnt:
        assert not (mnt / "residue").exists()
