"""Round trips through real ext4/xfs images, and compatibility both ways with obs-build's perl."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cloudbuild.disk import blocklist, manifest
from cloudbuild.disk.extract import extract_results, main
from cloudbuild.errors import UntrustedData

from .conftest import (
    EXTRACTBUILD,
    PAD,
    ResultDisk,
    Snapshot,
    leftovers,
    mounted,
    reduced,
    require_tool,
    run,
    snapshot,
)

DEFAULT = manifest.DEFAULT_WRITE_FORMAT


def bare(snap: Snapshot) -> Snapshot:
    """Names, kinds, contents and targets only: what a manifest without trailers carries."""
    return reduced(snap, mtimes=False, modes=False)


def test_default_format_carries_mtimes_and_modes() -> None:
    assert DEFAULT == "obs+meta"


@pytest.mark.parametrize(("flavour", "modes"), [("obs+meta", True), ("obs+mtimes", False), ("mtime", False)])
def test_extract_restores_the_tree_with_mtimes(
    result_disk: ResultDisk, dest: Path, flavour: str, modes: bool
) -> None:
    report = extract_results(result_disk.image, result_disk.swaps[flavour], skip=PAD, dest=dest)
    assert snapshot(dest, modes=modes) == reduced(result_disk.expected, modes=modes)
    assert report.files == sum(1 for e in result_disk.expected.values() if e[0] == "f")
    assert leftovers(dest) == sorted(os.listdir(dest))  # no staging directory left beside dest


def test_extract_restores_permission_bits_and_content(result_disk: ResultDisk, dest: Path) -> None:
    extract_results(result_disk.image, result_disk.swaps[DEFAULT], skip=PAD, dest=dest)
    got = snapshot(dest)
    for name, mode in [
        (b"out/tool", 0o755),
        (b"out/secret", 0o600),
        (b"out/suid", 0o755),  # 04755 on the guest: setuid is never restored
        (b"out/private", 0o700),
        (b"out/private/readonly", 0o555),
        (b"out/private/readonly/inner", 0o444),
        (b"out/small", 0o644),
        (b"out/sub", 0o755),
    ]:
        assert got[name][2] == mode, name
        assert got[name] == result_disk.expected[name], name  # content and mtime too
    assert (dest / "out" / "tool").read_bytes() == b"#!/bin/sh\necho tool\n"
    assert subprocess.run([dest / "out" / "tool"], capture_output=True, check=True).stdout == b"tool\n"


@pytest.mark.parametrize("flavour", ["obs", "perl", "fibmap"])
def test_extract_restores_the_tree_from_mtime_less_manifests(
    result_disk: ResultDisk, dest: Path, flavour: str
) -> None:
    extract_results(result_disk.image, result_disk.swaps[flavour], skip=PAD, dest=dest)
    assert snapshot(dest, mtimes=False, modes=False) == bare(result_disk.expected)


def test_blocklist_obs_format_is_byte_identical_to_computeblocklists(result_disk: ResultDisk) -> None:
    assert result_disk.manifests["obs"] == result_disk.manifests["perl"]


def test_obs_mtimes_format_is_obs_lines_plus_a_trailer(result_disk: ResultDisk) -> None:
    obs = result_disk.manifests["obs"][:-PAD]
    with_trailer = result_disk.manifests["obs+mtimes"]
    assert with_trailer.startswith(obs + b"\n" + manifest.TRAILER_MTIMES + b"\n")


def test_obs_meta_format_is_obs_mtimes_plus_a_mode_trailer(result_disk: ResultDisk) -> None:
    """A cloudbuild that knows only the mtime trailer stops after it: it reads obs+meta as obs+mtimes."""
    obs_mtimes = result_disk.manifests["obs+mtimes"][:-PAD]
    meta = result_disk.manifests["obs+meta"]
    assert meta.startswith(obs_mtimes + manifest.TRAILER_MODES + b"\n")
    assert meta.endswith(b"\n\n" + b"\n" * PAD)
    trailer = meta[len(obs_mtimes) :].split(b"\n\n")[0].split(b"\n")[1:]
    assert b"out/tool 0755" in trailer and b"out/suid 0755" in trailer and b"out/private 0700" in trailer
    assert not any(line.startswith((b"out/sub/link ", b"out/dirlink ")) for line in trailer)  # symlinks


def test_unwritten_and_hole_extents_are_written_as_holes(result_disk: ResultDisk) -> None:
    lines = result_disk.manifests["obs"].split(b"\n")
    unwritten = next(line for line in lines if line.startswith(b"f out/unwritten "))
    tokens = unwritten.split(b" ")[4:]
    assert tokens and all(t.startswith(b"0-") or t == b"0" for t in tokens)
    # and the disk under the unwritten extent is not zero: copying it instead of a hole would show
    assert result_disk.unwritten
    fd = os.open(result_disk.image, os.O_RDONLY)
    try:
        for physical, length, flags in result_disk.unwritten:
            assert flags & blocklist.FIEMAP_EXTENT_UNWRITTEN
            assert os.pread(fd, min(length, 4096), physical) == b"\xaa" * min(length, 4096)
    finally:
        os.close(fd)


def test_perl_extractbuild_reads_cloudbuild_manifests(result_disk: ResultDisk, dest: Path) -> None:
    for flavour in ("obs", "obs+mtimes", "obs+meta"):
        target = dest / flavour
        target.mkdir()
        run(
            [
                "perl",
                EXTRACTBUILD,
                "--disk",
                result_disk.image,
                "--input",
                result_disk.swaps[flavour],
                "--skip",
                str(PAD),
            ],
            cwd=target,
        )
        assert snapshot(target, mtimes=False, modes=False) == bare(result_disk.expected), flavour


def test_perl_extractbuild_refuses_the_inline_mtime_format_before_creating_anything(
    result_disk: ResultDisk, dest: Path
) -> None:
    proc = subprocess.run(
        [
            "perl",
            EXTRACTBUILD,
            "--disk",
            result_disk.image,
            "--input",
            result_disk.swaps["mtime"],
            "--skip",
            str(PAD),
        ],
        cwd=dest,
        capture_output=True,
    )
    assert proc.returncode != 0
    assert os.listdir(dest) == []


def test_cloudbuild_and_perl_extract_identical_trees_from_perl_manifest(
    result_disk: ResultDisk, dest: Path
) -> None:
    (dest / "perl").mkdir()
    (dest / "cloudbuild").mkdir()
    swap = result_disk.swaps["perl"]
    run(
        ["perl", EXTRACTBUILD, "--disk", result_disk.image, "--input", swap, "--skip", str(PAD)],
        cwd=dest / "perl",
    )
    extract_results(result_disk.image, swap, skip=PAD, dest=dest / "cloudbuild")
    assert snapshot(dest / "perl", mtimes=False) == snapshot(dest / "cloudbuild", mtimes=False)  # modes too


def test_cli_extracts_into_the_current_directory_and_reads_stdin(
    result_disk: ResultDisk, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(dest)
    with open(result_disk.swaps[DEFAULT], "rb") as swap:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "cloudbuild.disk.extract",
                "--disk",
                str(result_disk.image),
                "--skip",
                "512",
                "-v",
            ],
            stdin=swap,
            capture_output=True,
            env={**os.environ, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": ""},
        )
    assert proc.returncode == 0, proc.stderr
    assert b"out/big\n" in proc.stdout
    assert b"out/high\xff\xfebytes\n" in proc.stdout  # names are printed as the bytes they are
    assert snapshot(dest) == result_disk.expected


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_qcow2_image_extracts_identically(result_disk: ResultDisk, dest: Path, compat: str) -> None:
    qcow = dest.parent.parent / f"root-{compat}.qcow2"
    run(
        [
            require_tool("qemu-img"),
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            f"compat={compat}",
            result_disk.image,
            qcow,
        ]
    )
    try:
        extract_results(qcow, result_disk.swaps[DEFAULT], skip=PAD, dest=dest, qcow2=True, max_size=1 << 30)
        assert snapshot(dest) == result_disk.expected
    finally:
        qcow.unlink()


def test_compressed_qcow2_is_refused_cleanly(result_disk: ResultDisk, dest: Path) -> None:
    qcow = dest.parent.parent / "root-compressed.qcow2"
    run([require_tool("qemu-img"), "convert", "-c", "-f", "raw", "-O", "qcow2", result_disk.image, qcow])
    try:
        with pytest.raises(UntrustedData, match="compressed"):
            extract_results(qcow, result_disk.swaps["obs"], skip=PAD, dest=dest, qcow2=True, max_size=1 << 30)
        assert leftovers(dest) == []
    finally:
        qcow.unlink()


def test_max_size_below_the_results_refuses_and_leaves_nothing(result_disk: ResultDisk, dest: Path) -> None:
    code = main(
        [
            "--disk",
            str(result_disk.image),
            "--input",
            str(result_disk.swaps["obs"]),
            "--skip",
            "512",
            "--dest",
            str(dest),
            "--max-size",
            str(4 * 1024 * 1024),
        ]
    )
    assert code == 3
    assert leftovers(dest) == []


def test_existing_name_in_destination_is_refused_and_nothing_moved(
    result_disk: ResultDisk, dest: Path
) -> None:
    (dest / "OTHER").mkdir()
    with pytest.raises(UntrustedData, match="already exists"):
        extract_results(result_disk.image, result_disk.swaps["obs"], skip=PAD, dest=dest)
    assert leftovers(dest) == ["OTHER"]
    assert os.listdir(dest / "OTHER") == []


def test_written_through_blocklist_function_with_dir_fd(result_disk: ResultDisk, tmp_path: Path) -> None:
    """The function API the guest agent calls gives the same manifest as the command."""
    with mounted(result_disk.image, tmp_path / "mnt", readonly=True) as mnt:
        names = run(["find", "out", "OTHER", "-print0"], cwd=mnt).stdout.split(b"\0")[:-1]
        fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            import io

            buf = io.BytesIO()
            count = blocklist.write_manifest(names, buf, padstart=PAD, padend=PAD, fmt="mtime", dir_fd=fd)
            default = io.BytesIO()  # what the guest agent calls: no fmt
            blocklist.write_manifest(names, default, padstart=PAD, padend=PAD, dir_fd=fd)
        finally:
            os.close(fd)
    assert buf.getvalue() == result_disk.manifests["mtime"]
    assert default.getvalue() == result_disk.manifests["obs+meta"]
    assert count == len(result_disk.expected)


def test_block_device_disk_extracts_identically(result_disk: ResultDisk, dest: Path) -> None:
    device = run(["losetup", "--find", "--show", "--read-only", result_disk.image]).stdout.decode().strip()
    try:
        report = extract_results(Path(device), result_disk.swaps[DEFAULT], skip=PAD, dest=dest)
    finally:
        run(["losetup", "-d", device])
    assert snapshot(dest) == result_disk.expected
    assert report.copied > 0


@pytest.mark.parametrize("mode", ["copy_file_range", "sendfile", "pread"])
def test_every_copy_method_copies_the_same_bytes(tmp_path: Path, mode: str) -> None:
    from cloudbuild.disk.extract import _Copier

    src = tmp_path / "src"
    data = os.urandom(3 * 1024 * 1024 + 5)
    src.write_bytes(data)
    copier = _Copier()
    copier.mode = mode
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT)
    try:
        copier.copy(sfd, 1000, dfd, 7, len(data) - 1000)
        assert copier.mode == mode
    finally:
        os.close(sfd)
        os.close(dfd)
    assert (tmp_path / "dst").read_bytes() == bytes(7) + data[1000:]


def test_disk_and_swap_as_block_devices_like_the_vm_flow(result_disk: ResultDisk, dest: Path) -> None:
    devices = []
    try:
        for path in (result_disk.image, result_disk.swaps[DEFAULT]):
            devices.append(run(["losetup", "--find", "--show", "--read-only", path]).stdout.decode().strip())
        code = main(["--disk", devices[0], "--input", devices[1], "--skip", "512", "--dest", str(dest)])
    finally:
        for device in devices:
            run(["losetup", "-d", device])
    assert code == 0
    assert snapshot(dest) == result_disk.expected
