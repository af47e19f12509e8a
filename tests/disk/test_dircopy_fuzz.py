"""The fuzzers' directory channel: hostile result trees (as a chroot/lxc build leaves them) drawn
from a grammar of dangerous entries, copied by `dircopy.copy_results`, and the invariants checked.
For a long run: CLOUDBUILD_FUZZ_EXAMPLES=20000 pytest tests/disk/test_dircopy_fuzz.py
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudbuild.disk import dircopy
from cloudbuild.errors import UntrustedData

FUZZ_EXAMPLES = int(os.environ.get("CLOUDBUILD_FUZZ_EXAMPLES", "100"))
_COMPONENTS = ["a", "b", "c d", "e%f", "\udcff", "..", ".", "x" * 200]
_TARGETS = st.one_of(
    st.sampled_from(
        ["a", "../a", "../../a", "..", ".", "./a", "/etc", "/", "a/../..", "b/c", "../outside", "x" * 300]
    ),
    st.lists(st.sampled_from(_COMPONENTS), min_size=1, max_size=6).map("/".join),
)

Op = tuple[str, str, object]


@st.composite
def _tree(draw: st.DrawFn) -> list[Op]:
    dirs = [""]
    ops: list[Op] = []
    for i in range(draw(st.integers(1, 14))):
        parent = draw(st.sampled_from(dirs))
        name = f"{parent}/n{i}" if parent else f"n{i}"
        kind = draw(st.sampled_from(["dir", "file", "file", "link", "link", "fifo", "hardlink", "setuid"]))
        if kind == "dir":
            dirs.append(name)
            ops.append(("dir", name, draw(st.sampled_from([0o755, 0o700, 0o3777, 0o555]))))
        elif kind == "file":
            ops.append(("file", name, draw(st.integers(0, 5000))))
        elif kind == "link":
            ops.append(("link", name, draw(_TARGETS)))
        else:
            ops.append((kind, name, None))
    return ops


def _build(src: Path, outside: Path, ops: list[Op]) -> None:
    for kind, name, arg in ops:
        path = src / name
        if kind == "dir":
            path.mkdir()
        elif kind == "file":
            path.write_bytes(os.urandom(int(arg)))  # type: ignore[call-overload]
        elif kind == "link":
            os.symlink(os.fsencode(str(arg)), path)
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "hardlink":
            os.link(outside / "secret", path)
        elif kind == "setuid":
            path.write_bytes(b"#!/bin/sh\n")
            os.chmod(path, 0o6755)
    for kind, name, arg in reversed(ops):  # directory modes last, deepest first
        if kind == "dir":
            os.chmod(src / name, int(arg))  # type: ignore[call-overload]


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_tree(), max_size=st.sampled_from([0, 3000, 100_000]))
def test_fuzz_directory_channel_stays_inside_its_bounds(ops: list[Op], max_size: int) -> None:
    with tempfile.TemporaryDirectory() as sandbox:
        box = Path(sandbox)
        outside = box / "outside"
        outside.mkdir()
        (outside / "secret").write_bytes(b"host secret")
        src = box / "root" / "results"
        src.mkdir(parents=True)
        _build(src, outside, ops)
        dest = box / "jobs" / "dest"
        try:
            report = dircopy.copy_results(src, dest, max_size=max_size, trusted=box / "root")
        except UntrustedData:
            assert not dest.exists()
            assert os.listdir(box / "jobs") == []  # no stage left
            return
        finally:
            assert sorted(os.listdir(outside)) == ["secret"]
            assert (outside / "secret").read_bytes() == b"host secret"
        assert os.listdir(box / "jobs") == ["dest"]
        real_dest = os.path.realpath(dest)
        total = 0
        for dirpath, dirnames, filenames in os.walk(dest):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                st_ = os.lstat(path)
                assert not st_.st_mode & 0o7000  # never setuid, setgid or sticky
                assert stat.S_ISDIR(st_.st_mode) or stat.S_ISREG(st_.st_mode) or stat.S_ISLNK(st_.st_mode)
                if stat.S_ISLNK(st_.st_mode):
                    resolved = os.path.realpath(path)
                    assert resolved == real_dest or resolved.startswith(real_dest + os.sep), (path, resolved)
                elif stat.S_ISREG(st_.st_mode):
                    total += st_.st_size
        assert total <= max_size
        assert total == report.bytes
        assert all(why for _, why in report.skipped)
