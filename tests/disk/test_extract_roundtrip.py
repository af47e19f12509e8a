"""Round trips through real ext4/xfs images, and compatibility both ways with obs-build's perl."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cloudbuild.commands.extract import main
from cloudbuild.disk import blocklist, manifest
from cloudbuild.disk.extract import extract_results
from cloudbuild.errors import UntrustedData

from .conftest import (
    EXTRACTBUILD,
    PAD,
    PEER_EXTRACTBUILD,
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


def test_default_format_is_todays_obs_build_with_modes() -> None:
    assert DEFAULT == "obs+modes"
    assert manifest.DEFAULT_DIALECT == "obs"


def equal_mtimes_where_perl_sets_them(got: Snapshot, want: Snapshot) -> None:
    """Today's extractbuild keeps the mtime of non-empty files only: it sets a directory's right
    after mkdir (creating its entries then changes it), sets none on symlinks, and its empty-file
    branch returns before the utime. Everything else is compared exactly."""
    assert reduced(got, mtimes=False) == reduced(want, mtimes=False)
    kept = [name for name, (kind, content, _m, _t) in want.items() if kind == "f" and content[0] > 0]  # type: ignore[index]
    assert len(kept) > 10
    assert {name: got[name][3] for name in kept} == {name: want[name][3] for name in kept}


@pytest.mark.parametrize(
    ("flavour", "dialect", "modes"),
    [
        ("obs+modes", "obs", True),
        ("obs", "obs", False),
        ("perl", "obs", False),
        ("fibmap", "obs", False),
        ("obs-2018+meta", "obs-2018", True),
        ("obs-2018+mtimes", "obs-2018", False),
    ],
)
def test_extract_restores_the_tree_with_mtimes(
    result_disk: ResultDisk, dest: Path, flavour: str, dialect: manifest.Dialect, modes: bool
) -> None:
    report = extract_results(result_disk.image, result_disk.swaps[flavour], skip=PAD, dest=dest, dialect=dialect)
    assert snapshot(dest, modes=modes) == reduced(result_disk.expected, modes=modes)
    assert report.files == sum(1 for e in result_disk.expected.values() if e[0] == "f")
    assert leftovers(dest) == sorted(os.listdir(dest))  # no staging directory left


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


@pytest.mark.parametrize("flavour", ["obs-2018", "perl-2018"])
def test_extract_restores_the_tree_from_2018_manifests(result_disk: ResultDisk, dest: Path, flavour: str) -> None:
    extract_results(result_disk.image, result_disk.swaps[flavour], skip=PAD, dest=dest, dialect="obs-2018")
    assert snapshot(dest, mtimes=False, modes=False) == bare(result_disk.expected)


def test_blocklist_obs_format_is_byte_identical_to_todays_computeblocklists(result_disk: ResultDisk) -> None:
    assert result_disk.manifests["obs"] == result_disk.manifests["perl"]
    assert result_disk.manifests["fibmap"] == result_disk.manifests["perl"]


def test_blocklist_obs_2018_format_is_byte_identical_to_debians_computeblocklists(result_disk: ResultDisk) -> None:
    assert result_disk.manifests["obs-2018"] == result_disk.manifests["perl-2018"]


def test_default_format_is_obs_lines_plus_a_mode_trailer(result_disk: ResultDisk) -> None:
    obs = result_disk.manifests["obs"][:-PAD]
    default = result_disk.manifests[DEFAULT]
    assert default.startswith(obs + b"\n" + manifest.TRAILER_MODES + b"\n")
    assert default.endswith(b"\n\n" + b"\n" * PAD)
    trailer = default[len(obs) + 1 :].split(b"\n\n")[0].split(b"\n")[1:]
    assert b"out/tool 0755" in trailer and b"out/suid 0755" in trailer and b"out/private 0700" in trailer
    assert not any(line.startswith((b"out/sub/link ", b"out/dirlink ")) for line in trailer)  # symlinks


def test_obs_2018_formats_are_2018_lines_plus_trailers(result_disk: ResultDisk) -> None:
    """A cloudbuild that knows only the mtime trailer stops after it: it reads obs-2018+meta as
    obs-2018+mtimes."""
    lines = result_disk.manifests["obs-2018"][:-PAD]
    mtimes = result_disk.manifests["obs-2018+mtimes"]
    assert mtimes.startswith(lines + b"\n" + manifest.TRAILER_MTIMES + b"\n")
    meta = result_disk.manifests["obs-2018+meta"]
    assert meta.startswith(mtimes[:-PAD] + manifest.TRAILER_MODES + b"\n")


def test_todays_and_the_2018_form_differ_only_by_the_inline_mtimes(result_disk: ResultDisk) -> None:
    today = result_disk.manifests["obs"][PAD:-PAD].split(b"\n")[:-1]
    old = result_disk.manifests["obs-2018"][PAD:-PAD].split(b"\n")[:-1]
    assert len(today) == len(old) == len(result_disk.expected)
    for new_line, old_line in zip(today, old, strict=True):
        kind, name, mtime, *rest = new_line.split(b" ")
        assert b" ".join([kind, name, *rest]) == old_line
        assert int(mtime) == result_disk.expected[manifest.unescape(name, "name")][3]


def test_unwritten_and_hole_extents_are_written_as_holes(result_disk: ResultDisk) -> None:
    lines = result_disk.manifests["obs"].split(b"\n")
    unwritten = next(line for line in lines if line.startswith(b"f out/unwritten "))
    tokens = unwritten.split(b" ")[5:]  # f NAME MTIME SIZE BLKSIZE EXTENT...
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


def perl_extract(script: Path, image: Path, swap: Path, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["perl", script, "--disk", image, "--input", swap, "--skip", str(PAD)], cwd=cwd, capture_output=True
    )


@pytest.mark.parametrize("flavour", ["obs", "obs+modes"])
def test_todays_perl_extractbuild_reads_cloudbuild_manifests(
    result_disk: ResultDisk, dest: Path, flavour: str
) -> None:
    proc = perl_extract(PEER_EXTRACTBUILD, result_disk.image, result_disk.swaps[flavour], dest)
    assert proc.returncode == 0, proc.stderr
    equal_mtimes_where_perl_sets_them(snapshot(dest, modes=False), reduced(result_disk.expected, modes=False))


def test_cloudbuild_reads_todays_perl_manifest_like_todays_perl(result_disk: ResultDisk, dest: Path) -> None:
    """Both directions, today's form: what today's computeblocklists wrote, extracted by today's
    extractbuild and by `cloudbuild extract` with no format option, gives the same tree."""
    (dest / "perl").mkdir()
    (dest / "cloudbuild").mkdir()
    proc = perl_extract(PEER_EXTRACTBUILD, result_disk.image, result_disk.swaps["perl"], dest / "perl")
    assert proc.returncode == 0, proc.stderr
    code = main(
        [
            "--disk",
            str(result_disk.image),
            "--input",
            str(result_disk.swaps["perl"]),
            "--skip",
            str(PAD),
            "--dest",
            str(dest / "cloudbuild"),
        ]
    )
    assert code == 0
    want = reduced(result_disk.expected, modes=False)
    assert snapshot(dest / "cloudbuild", modes=False) == want  # every mtime, symlinks' too
    equal_mtimes_where_perl_sets_them(snapshot(dest / "perl", modes=False), want)


@pytest.mark.parametrize("flavour", ["obs-2018", "obs-2018+mtimes", "obs-2018+meta"])
def test_debians_perl_extractbuild_reads_cloudbuild_2018_manifests(
    result_disk: ResultDisk, dest: Path, flavour: str
) -> None:
    proc = perl_extract(EXTRACTBUILD, result_disk.image, result_disk.swaps[flavour], dest)
    assert proc.returncode == 0, proc.stderr
    assert snapshot(dest, mtimes=False, modes=False) == bare(result_disk.expected)


@pytest.mark.parametrize(("script", "flavour"), [(EXTRACTBUILD, DEFAULT), (PEER_EXTRACTBUILD, "obs-2018")])
def test_perl_extractbuild_fails_on_the_other_form(
    result_disk: ResultDisk, dest: Path, script: Path, flavour: str
) -> None:
    """Why the 2018 form stays writable: Debian's package cannot read the default (it fails part
    way, after creating directories: docs/results.md says which worker needs which format)."""
    proc = perl_extract(script, result_disk.image, result_disk.swaps[flavour], dest)
    assert proc.returncode != 0


@pytest.mark.parametrize(("flavour", "dialect"), [("perl-2018", "obs"), ("perl", "obs-2018")])
def test_the_wrong_dialect_is_refused_and_leaves_nothing(
    result_disk: ResultDisk, dest: Path, flavour: str, dialect: manifest.Dialect
) -> None:
    with pytest.raises(UntrustedData):
        extract_results(result_disk.image, result_disk.swaps[flavour], skip=PAD, dest=dest, dialect=dialect)
    assert leftovers(dest) == []


def test_cloudbuild_and_perl_extract_identical_trees_from_debians_perl_manifest(
    result_disk: ResultDisk, dest: Path
) -> None:
    (dest / "perl").mkdir()
    (dest / "cloudbuild").mkdir()
    swap = result_disk.swaps["perl-2018"]
    run(
        ["perl", EXTRACTBUILD, "--disk", result_disk.image, "--input", swap, "--skip", str(PAD)],
        cwd=dest / "perl",
    )
    extract_results(result_disk.image, swap, skip=PAD, dest=dest / "cloudbuild", dialect="obs-2018")
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
                "cloudbuild.commands.extract",
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
            count = blocklist.write_manifest(names, buf, padstart=PAD, padend=PAD, fmt="obs", dir_fd=fd)
            default = io.BytesIO()  # what the guest agent calls: no fmt
            blocklist.write_manifest(names, default, padstart=PAD, padend=PAD, dir_fd=fd)
        finally:
            os.close(fd)
    assert buf.getvalue() == result_disk.manifests["obs"]
    assert default.getvalue() == result_disk.manifests[DEFAULT]
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
