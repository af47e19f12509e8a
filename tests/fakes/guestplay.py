"""The build guest, played by a fake hypervisor (xl, vmcp, an emulator script) on real disk images.

It does what a guest does at the end of a build, on the images the host prepared: write the
result files into the root filesystem (loop-mounted here: this is test code playing the guest),
write the blocklist manifest of those files after a 512-byte pad onto the swap with the real
writer (`cloudbuild.disk.blocklist`), then `BUILDSTATUS<n>` at offset 0. The host side then
extracts them through the real extraction code, so a test proves the whole channel.

`spec` (JSON, kept in the fake's state):
    {"status": 0, "files": {"results/RPMS/a.rpm": "text" | {"repeat": "ab", "size": 5000}},
     "symlinks": {"results/RPMS/latest.rpm": "a.rpm"}, "console": "build log ..."}
Names are relative to /.build.out, the folder the host extracts (results/ and _statistics).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cloudbuild.disk import blocklist, buildstatus

OUT_DIR = ".build.out"  # the agent's folder: results/ and _statistics (cloudbuild/buildroot/stage.py)


def content(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode()
    pattern = value["repeat"].encode()
    size = int(value["size"])
    return (pattern * (size // len(pattern) + 1))[:size]


@contextlib.contextmanager
def loop_mounted(image: Path, *, fstype: str | None = None) -> Iterator[Path]:
    mnt = Path(tempfile.mkdtemp(prefix="fakeguest-"))
    argv = ["mount", "-o", "loop"] + (["-t", fstype] if fstype else []) + [str(image), str(mnt)]
    subprocess.run(argv, check=True, capture_output=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True, capture_output=True)
        mnt.rmdir()


def play(root: Path, swap: Path | None, spec: dict[str, Any]) -> dict[str, Any]:
    """Run the 'build' on the images; return what the guest saw (for the test to assert on)."""
    seen: dict[str, Any] = {}
    status = int(spec.get("status", 0))
    with loop_mounted(root) as mnt:
        seen["root_entries"] = sorted(os.listdir(mnt))
        data = mnt / ".build" / "build.data"
        seen["build_data"] = data.read_text(errors="replace") if data.is_file() else None
        out = mnt / OUT_DIR
        out.mkdir(exist_ok=True)
        names: list[str] = []
        for name, value in spec.get("files", {}).items():
            path = out / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content(value))
            names.append(name)
        for name, mode in spec.get("modes", {}).items():
            (out / name).chmod(int(mode))
        for name, target in spec.get("symlinks", {}).items():
            path = out / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(target)
            names.append(name)
        # like `find RPMS OTHER`: every folder before what it holds
        listed: list[str] = []
        for name in names:
            parts = name.split("/")
            for i in range(1, len(parts)):
                folder = "/".join(parts[:i])
                if folder not in listed:
                    listed.append(folder)
            listed.append(name)
        os.sync()
        buf = io.BytesIO()
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        try:
            blocklist.write_manifest(listed, buf, padstart=512, padend=512, dir_fd=fd)
        finally:
            os.close(fd)
    if swap is not None and status in (0, 2):  # the manifest
        fd = os.open(swap, os.O_WRONLY)
        try:
            os.pwrite(fd, buf.getvalue(), 0)
        finally:
            os.close(fd)
    if swap is not None:
        buildstatus.write(swap, status)
    elif not spec.get("no_exit_file"):
        # no swap (an emulator without one): obs-build's guest leaves its status in the root
        with loop_mounted(root) as mnt:
            (mnt / ".build").mkdir(exist_ok=True)
            (mnt / ".build" / "_exitcode").write_text(f"{status}\n")
    return seen
