"""LXC-only behaviour (the container configuration); the real builds shared with chroot are in
test_directory_builds.py."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_container_config_keeps_the_build_away_from_the_host(tmp_path: Path) -> None:
    from cloudbuild.errors import UsageError
    from local_backends.machines.lxc import container_config

    text = container_config(
        name="cloudbuild-b1",
        tree=Path("/cache/tree"),
        buildroot=tmp_path / "root",
        status_dir=tmp_path / "st",
        memory_mib=512,
    )
    lines = text.splitlines()
    assert "lxc.rootfs.path = dir:/cache/tree" in lines and "lxc.rootfs.options = ro" in lines
    assert f"lxc.mount.entry = {tmp_path / 'root'} mnt/buildroot none bind,create=dir 0 0" in lines
    assert "lxc.net.0.type = empty" in lines
    assert any(line.startswith("lxc.cap.drop = ") and "sys_boot" in line for line in lines)
    assert "--no-poweroff" in next(line for line in lines if line.startswith("lxc.init.cmd"))
    assert "lxc.cgroup.memory.limit_in_bytes = 512M" in lines
    with pytest.raises(UsageError, match="white space"):
        container_config(
            name="x", tree=Path("/a b"), buildroot=tmp_path, status_dir=tmp_path, memory_mib=None
        )
