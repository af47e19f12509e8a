"""The emulator's swap-less path (local_backends/e2manifest.py, debugfs in userspace) writes the
default manifest format, the same bytes the guest-side writer gives for the same tree."""

from __future__ import annotations

import io
import os
from pathlib import Path

from cloudbuild.disk import blocklist, manifest
from local_backends import e2manifest

from .conftest import make_fs, mounted


def test_debugfs_manifest_is_the_default_format_byte_for_byte(tmp_path: Path) -> None:
    image = tmp_path / "root.img"
    make_fs(image, "ext4", 16)
    with mounted(image, tmp_path / "mnt") as mnt:
        out = mnt / ".build.out"
        (out / "results" / "RPMS").mkdir(parents=True)
        (out / "results" / "RPMS" / "a b%.rpm").write_bytes(os.urandom(70_000))
        (out / "results" / "empty").write_bytes(b"")
        (out / "results" / "link").symlink_to("RPMS/a b%.rpm")
        (out / "_statistics").write_bytes(b"MAX_mb_used_memory: 9\n")
        os.chmod(out / "results" / "RPMS", 0o700)
        os.chmod(out / "results" / "RPMS" / "a b%.rpm", 0o640)
        when = 1_700_000_000
        for path in sorted(out.rglob("*"), reverse=True):
            when += 11
            os.utime(path, (when, when), follow_symlinks=False)
        os.sync()
        names = sorted(os.fsencode(p.relative_to(out)) for p in out.rglob("*"))
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        try:
            buf = io.BytesIO()
            blocklist.write_manifest(names, buf, dir_fd=fd)
        finally:
            os.close(fd)
    text = e2manifest.image_manifest(image)
    assert manifest.DEFAULT_WRITE_FORMAT == "obs+modes"
    assert text == buf.getvalue()
    parsed = list(manifest.parse(io.BytesIO(text)))  # the default dialect reads it
    assert {e.name: e.mtime for e in parsed if not isinstance(e, manifest.Mode)}[b"results/link"] > when - 100
    assert manifest.Mode(b"results/RPMS", 0o700, True) in parsed
