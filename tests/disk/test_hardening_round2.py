"""Hardening round 2 (issue 10): what a hostile guest tried around `cloudbuild extract` and the
directory channel, one test (or two) per item. Each was checked by planting the bug back.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import stat
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudbuild.buildroot import stage
from cloudbuild.buildroot.hoststeps import DiskHostSteps, read_statistics, statistics_path
from cloudbuild.commands.extract import main
from cloudbuild.deadline import Deadline
from cloudbuild.disk import buildstatus, dircopy, qcow2
from cloudbuild.disk.extract import STAGING_PREFIX, RawDisk, extract_stream
from cloudbuild.errors import DeadlineExceeded, UntrustedData
from cloudbuild.options import VmOptions

from .conftest import leftovers, run

MIB = 1024 * 1024
DISK_SIZE = MIB


@pytest.fixture()
def dest(tmp_path: Path) -> Path:
    """An empty destination alone in its parent (so anything left beside it shows)."""
    path = tmp_path / "sandbox" / "dest"
    path.mkdir(parents=True)
    return path


@pytest.fixture()
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(DISK_SIZE))
    return path


def steps(tmp_path: Path) -> DiskHostSteps:
    return DiskHostSteps(
        VmOptions(vm_type="qemu", rootfs="/nonexistent"),
        tmp_path / "build.sh",
        build_id="h",
        workdir=tmp_path,
    )


def swap_with(tmp_path: Path, text: bytes) -> Path:
    swap = tmp_path / "swap.raw"
    swap.write_bytes((b"\n" * 512 + text + b"\n" * 512).ljust(MIB, b"\0"))
    buildstatus.write(swap, 0)
    return swap


# 1. VM flow: a link out of the results folder --------------------------------------------------


def test_vm_flow_drops_a_link_that_leaves_the_folder_that_becomes_dest(tmp_path: Path, disk: Path) -> None:
    """`ln -s .. "$BUILD_RESULTS/up"` is inside the manifest's tree but would point at DEST's parent."""
    swap = swap_with(
        tmp_path,
        b"d results 5\nl results/up 5 ..\nd results/sub 5\nl results/sub/ok 5 ../f\nl results/sub/out 5 ../..\n"
        b"f results/f 5 2048 1024 1-2\n\n",
    )
    dest = tmp_path / "jobs" / "dest"
    steps(tmp_path).extract(disk, swap, dest, Deadline("extract", 600))
    assert not os.path.lexists(dest / "up")
    assert not os.path.lexists(dest / "sub" / "out")
    assert os.readlink(dest / "sub" / "ok") == "../f"
    assert (dest / "f").read_bytes() == disk.read_bytes()[1024:3072]


def test_plain_extract_keeps_links_that_stay_inside_the_manifest_tree(tmp_path: Path, disk: Path) -> None:
    """Without a folder that becomes DEST, the manifest rule alone applies (`results/up -> ..` is fine)."""
    dest = tmp_path / "dest"
    dest.mkdir()
    fd = os.open(disk, os.O_RDONLY)
    try:
        report = extract_stream(RawDisk(fd), io.BytesIO(b"d results 5\nl results/up 5 ..\n\n"), dest=dest)
        assert os.readlink(dest / "results" / "up") == ".."
        assert report.skipped == 0
        dest2 = tmp_path / "dest2"
        dest2.mkdir()
        report = extract_stream(
            RawDisk(fd),
            io.BytesIO(b"d results 5\nl results/up 5 ..\n\n"),
            dest=dest2,
            dest_subtree=b"results",
        )
        assert report.skipped == 1 and os.listdir(dest2 / "results") == []
    finally:
        os.close(fd)


# 2. chroot/lxc `_statistics`: only a regular file ----------------------------------------------


def guest_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / stage.OUT_DIR / stage.RESULTS).mkdir(parents=True)
    (root / stage.OUT_DIR / stage.RESULTS / "pkg.rpm").write_bytes(b"rpm")
    return root


def test_statistics_that_is_a_device_node_is_never_read(tmp_path: Path) -> None:
    root = guest_root(tmp_path)
    node = root / stage.OUT_DIR / stage.STATISTICS
    os.mknod(node, 0o644 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero: endless
    assert read_statistics(root) is None
    node.unlink()
    os.mknod(node, 0o644 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null: short, so only the type tells
    assert read_statistics(root) is None
    dest = tmp_path / "dest"
    steps(tmp_path).extract(root, None, dest, Deadline("extract", 60))
    assert (dest / "pkg.rpm").read_bytes() == b"rpm"
    assert not statistics_path(dest).exists()


@contextlib.contextmanager
def fifo_with_a_writer(path: Path) -> Iterator[None]:
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # lets the writer open without blocking
    writer = os.open(path, os.O_WRONLY)
    try:
        yield
    finally:
        os.close(writer)
        os.close(reader)


def test_statistics_fifo_with_a_writer_is_skipped_not_an_internal_error(tmp_path: Path) -> None:
    root = guest_root(tmp_path)
    with fifo_with_a_writer(root / stage.OUT_DIR / stage.STATISTICS):
        dest = tmp_path / "dest"
        steps(tmp_path).extract(root, None, dest, Deadline("extract", 60))
    assert (dest / "pkg.rpm").read_bytes() == b"rpm"
    assert not statistics_path(dest).exists()


def test_statistics_regular_file_bounded_and_a_late_failure_leaves_dest_empty(tmp_path: Path) -> None:
    root = guest_root(tmp_path)
    statistics = root / stage.OUT_DIR / stage.STATISTICS
    statistics.write_bytes(b"MAX_mb_used_memory: 5\n")
    assert read_statistics(root) == b"MAX_mb_used_memory: 5\n"
    statistics.write_bytes(b"x" * (64 * 1024 + 1))
    assert read_statistics(root) is None
    statistics.write_bytes(b"MAX_mb_used_memory: 5\n")
    dest = tmp_path / "dest"
    statistics_path(dest).mkdir()  # DEST.statistics cannot be written
    with pytest.raises(IsADirectoryError):
        steps(tmp_path).extract(root, None, dest, Deadline("extract", 60))
    assert not dest.exists()


# 3. chroot/lxc: bounded work re-resolving symlinks ---------------------------------------------


def test_resolving_symlinks_has_a_total_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "results"
    (src / "d").mkdir(parents=True)
    long_target = "/".join(["d"] * 1000)  # passes the link rule; walked component by component
    for i in range(40):
        os.symlink(long_target, src / f"l{i}")
    monkeypatch.setattr(dircopy, "MAX_RESOLVE_BYTES", 30 * len(long_target))
    with pytest.raises(UntrustedData, match="too much work"):
        dircopy.copy_results(src, tmp_path / "dest", max_size=MIB)
    assert sorted(os.listdir(tmp_path)) == ["results"]
    budget = dircopy.ResolveBudget(hops=1, target_bytes=MIB)  # d/x -> y -> z: two hops
    (src / "d" / "x").symlink_to("y")
    (src / "d" / "y").symlink_to("z")
    with pytest.raises(UntrustedData, match="too much work"):
        dircopy.resolves_inside(src, Path("d/x"), budget=budget)  # type: ignore[arg-type]


def test_resolving_a_long_target_costs_one_lookup_per_component(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No path walk from the top per component (that made `x/../x/..`-style targets quadratic)."""
    stage_ = tmp_path / "stage"
    (stage_ / "d" / "d").mkdir(parents=True)
    (stage_ / "link").symlink_to("/".join(["d", "d", *["missing"] * 500]))
    looked_up: list[str] = []
    real_lstat = os.lstat

    def recording(path: str, *args: object, **kwargs: object) -> os.stat_result:
        looked_up.append(os.fsdecode(path))
        return real_lstat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(dircopy.os, "lstat", recording)
    assert dircopy.resolves_inside(stage_, Path("link"))  # type: ignore[arg-type]
    assert looked_up and all("/" not in name for name in looked_up), looked_up[-1][:80]
    assert len(looked_up) <= 3  # d, d, the first missing one: the rest is lexical


# 4. chroot/lxc memory: entries counted while the directory is read -----------------------------


def test_a_huge_directory_is_refused_while_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "results"
    src.mkdir()
    for i in range(500):
        (src / f"f{i:04d}").write_bytes(b"")
    read = []
    real_scandir = os.scandir

    class Counting:
        def __init__(self, fd: int) -> None:
            self.inner = real_scandir(fd)

        def __enter__(self) -> Iterator[os.DirEntry[str]]:
            return self

        def __exit__(self, *exc: object) -> None:
            self.inner.close()

        def __iter__(self) -> Iterator[os.DirEntry[str]]:
            for entry in self.inner:
                read.append(entry.name)
                yield entry

    monkeypatch.setattr(dircopy.os, "scandir", Counting)
    with pytest.raises(UntrustedData, match="more than 10 entries"):
        dircopy.copy_results(src, tmp_path / "dest", max_size=MIB, max_entries=10)
    assert len(read) == 11  # not all 500
    read.clear()
    monkeypatch.setattr(dircopy, "MAX_NAME_BYTES", 50)
    with pytest.raises(UntrustedData, match="names of more than 50 bytes"):
        dircopy.copy_results(src, tmp_path / "dest", max_size=MIB)
    assert len(read) == 11  # 5 bytes a name: the 11th passes 50
    assert sorted(os.listdir(tmp_path)) == ["results"]


# 5. qcow2 with a huge virtual size --------------------------------------------------------------


def crafted_qcow2(path: Path) -> None:
    """2 MiB clusters, a virtual size of 2**60, an all-unallocated L1 table (16 MiB, sparse)."""
    cluster_bits = 21
    size = 1 << 60
    l1_entries = size >> (cluster_bits + cluster_bits - 3)
    l1_offset = 1 << cluster_bits
    header = struct.pack(
        ">IIQIIQIIQQIIQ", qcow2.MAGIC, 2, 0, 0, cluster_bits, size, 0, l1_entries, l1_offset, 0, 0, 0, 0
    )
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(l1_offset + 8 * l1_entries)


def test_qcow2_default_limit_is_the_image_file_size(tmp_path: Path, dest: Path) -> None:
    image = tmp_path / "huge.qcow2"
    crafted_qcow2(image)
    fd = os.open(image, os.O_RDONLY)
    try:
        disk = qcow2.Qcow2Image(fd)
        assert disk.data_limit == image.stat().st_size
        text = b"f big 5 %d 4096 1-%d\n\n" % (1 << 40, (1 << 28))
        with pytest.raises(UntrustedData, match="limit"):
            extract_stream(disk, io.BytesIO(text), dest=dest)
    finally:
        os.close(fd)
    assert leftovers(dest) == []


def test_qcow2_unallocated_spans_are_mapped_in_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "huge.qcow2"
    crafted_qcow2(image)
    calls = []
    real = qcow2.Qcow2Image._cluster

    def counting(self: qcow2.Qcow2Image, vcluster: int) -> int | None:
        calls.append(vcluster)
        return real(self, vcluster)

    monkeypatch.setattr(qcow2.Qcow2Image, "_cluster", counting)
    fd = os.open(image, os.O_RDONLY)
    try:
        pieces = list(qcow2.Qcow2Image(fd).map(1 << 21, 1 << 41))  # a million 2 MiB clusters
    finally:
        os.close(fd)
    assert pieces == [(None, 1 << 41)]
    assert len(calls) < 10


# 6. SIGTERM during `cloudbuild extract` ---------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_removes_the_staging_folder_and_exits_3(disk: Path, dest: Path, signum: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloudbuild.commands.extract", "-v", "--disk", str(disk), "--dest", str(dest)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    # more entries than the extractor reads ahead, then no end: it blocks reading the manifest
    proc.stdin.write(b"d a 5\nf a/x 5 2048 1024 1-2\n" + b"".join(b"f a/y%d 5 0\n" % i for i in range(40)))
    proc.stdin.flush()
    for want in (b"a\n", b"a/x\n", b"a/y0\n"):  # printed before each entry: a/x is complete
        got = proc.stdout.readline()
        if got != want:
            proc.kill()
            pytest.fail(f"{got!r} != {want!r}: {proc.communicate()[1].decode()}")
    staging = [p for p in dest.iterdir() if p.name.startswith(STAGING_PREFIX)]
    assert len(staging) == 1 and (staging[0] / "a" / "x").stat().st_size == 2048
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert (
        err.decode()
        .strip()
        .splitlines()[-1]
        .startswith(f"cloudbuild extract: stopped by {signal.Signals(signum).name}")
    )
    assert leftovers(dest) == []


# 7. a deadline that bites inside the copy loops -------------------------------------------------


class ExpiresAfter(Deadline):
    """A deadline that runs out after `checks` checks: deterministic, no clock in the test."""

    def __init__(self, checks: int) -> None:
        super().__init__("extract", 3600)
        self.left = checks

    def expired(self) -> bool:
        self.left -= 1
        return self.left < 0


def test_the_extract_deadline_stops_a_slow_extraction_midway(tmp_path: Path, disk: Path) -> None:
    text = b"d results 5\n" + b"".join(b"f results/f%d 5 2048 1024 1-2\n" % i for i in range(100)) + b"\n"
    dest = tmp_path / "jobs" / "dest"
    deadline = ExpiresAfter(20)
    with pytest.raises(DeadlineExceeded):
        steps(tmp_path).extract(disk, swap_with(tmp_path, text), dest, deadline)
    assert deadline.left < 0
    assert not dest.exists() and os.listdir(dest.parent) == []


def test_the_directory_channel_deadline_stops_midway(tmp_path: Path) -> None:
    root = guest_root(tmp_path)
    for i in range(100):
        (root / stage.OUT_DIR / stage.RESULTS / f"f{i}").write_bytes(b"x")
    dest = tmp_path / "jobs" / "dest"
    with pytest.raises(DeadlineExceeded):
        steps(tmp_path).extract(root, None, dest, ExpiresAfter(20))
    assert not dest.exists() and os.listdir(dest.parent) == []


# 8. DEST bind-mounted from the same filesystem --------------------------------------------------


def test_dest_bind_mounted_from_the_same_filesystem(tmp_path: Path, disk: Path) -> None:
    source = tmp_path / "elsewhere"
    source.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    run(["mount", "--bind", source, dest])
    try:
        code = main(["--disk", str(disk), "--dest", str(dest), "--input", str(manifest_file(tmp_path))])
        assert code == 0
        assert (dest / "one").read_bytes() == disk.read_bytes()[1024:2048]
        assert sorted(os.listdir(dest)) == ["one"]
    finally:
        run(["umount", dest])
    assert sorted(os.listdir(source)) == ["one"]


def manifest_file(tmp_path: Path) -> Path:
    path = tmp_path / "one.manifest"
    path.write_bytes(b"f one 5 1024 1024 1\n\n")
    return path


# 9. --skip with a huge number -------------------------------------------------------------------


def test_a_huge_skip_is_a_one_line_error_exit_1(
    tmp_path: Path, disk: Path, dest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "--disk",
            str(disk),
            "--input",
            str(manifest_file(tmp_path)),
            "--dest",
            str(dest),
            "--skip",
            "9" * 30,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("cloudbuild extract: --skip 999")
    assert leftovers(dest) == []


def test_a_bad_option_is_a_one_line_usage_error_exit_1(
    disk: Path, dest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--disk", str(disk), "--dest", str(dest), "--manifest-format", "mtime"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("cloudbuild extract: argument --manifest-format: invalid choice")
    assert leftovers(dest) == []
