"""The directory Volume of chroot/lxc builds: deleting a guest-controlled tree never reaches the host."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cloudbuild.errors import InfraError
from cloudbuild.volume import VolumeState
from local_backends.dirvolume import DirectoryVolume, mounts_below


def test_delete_never_follows_symlinks_out_of_the_tree(tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "precious").write_text("keep me")
    volume = DirectoryVolume(tmp_path / "root")
    volume.create()
    assert volume.attach() == tmp_path / "root"
    (tmp_path / "root" / "etc").mkdir()
    os.symlink(host, tmp_path / "root" / "etc" / "host-dir")
    os.symlink(host / "precious", tmp_path / "root" / "precious-link")
    volume.release()
    assert volume.state() is VolumeState.ABSENT
    assert (host / "precious").read_text() == "keep me"


def test_delete_refuses_while_something_is_mounted_inside(tmp_path: Path) -> None:
    volume = DirectoryVolume(tmp_path / "root")
    volume.create()
    inside = tmp_path / "root" / "proc"
    inside.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(inside)], check=True)
    try:
        assert mounts_below(tmp_path / "root") == [str(inside)]
        with pytest.raises(InfraError, match="still has mounts"):
            volume.delete()
        assert inside.is_dir()
    finally:
        subprocess.run(["umount", str(inside)], check=True)
    volume.delete()
    assert not (tmp_path / "root").exists()


def test_a_supplied_folder_is_wiped_not_deleted(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "old").mkdir()
    (folder / "old" / "file").write_text("x")
    os.symlink("/etc", folder / "link")
    volume = DirectoryVolume(folder, owned=False)
    volume.create()
    volume.wipe(folder)
    volume.release()
    assert folder.is_dir() and list(folder.iterdir()) == []
