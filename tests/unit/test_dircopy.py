"""dircopy: results from a guest-controlled folder are copied as hostile input."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path, PurePosixPath

import pytest

from cloudbuild.disk import dircopy, manifest
from cloudbuild.disk.dircopy import LINK_ESCAPES, LINK_REFUSED, copy_results, resolves_inside
from cloudbuild.errors import UntrustedData, UsageError

MIB = 1024 * 1024


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    results = root / "results"
    (results / "RPMS" / "noarch").mkdir(parents=True)
    (results / "RPMS" / "noarch" / "hello-1.0.rpm").write_bytes(bytes(range(256)) * 1000)
    (results / "OTHER").mkdir()
    (results / "OTHER" / "_statistics").write_text("MAX_mb_used_on_disk: 3\n")
    (results / "empty").write_bytes(b"")
    return root


def test_copies_files_and_folders_byte_exact_with_modes(tree: Path, tmp_path: Path) -> None:
    src = tree / "results"
    os.chmod(src / "OTHER" / "_statistics", 0o640)
    dest = tmp_path / "dest"
    report = copy_results(src, dest, max_size=10 * MIB)
    assert (dest / "RPMS" / "noarch" / "hello-1.0.rpm").read_bytes() == bytes(range(256)) * 1000
    assert (dest / "OTHER" / "_statistics").read_text() == "MAX_mb_used_on_disk: 3\n"
    assert stat.S_IMODE(os.stat(dest / "OTHER" / "_statistics").st_mode) == 0o640
    assert (dest / "empty").read_bytes() == b""
    assert (report.files, report.directories, report.bytes) == (3, 3, 256_000 + 23)
    assert report.skipped == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dest")] == []


def test_symlinks_are_recreated_never_followed(tree: Path, tmp_path: Path) -> None:
    src = tree / "results"
    os.symlink("noarch/hello-1.0.rpm", src / "RPMS" / "latest.rpm")
    os.symlink("../OTHER", src / "RPMS" / "other")
    os.symlink("/etc/shadow", src / "shadow")
    os.symlink("../../../../../../../etc/passwd", src / "OTHER" / "passwd")
    os.symlink("..", src / "parent")
    dest = tmp_path / "dest"
    report = copy_results(src, dest, max_size=10 * MIB)
    assert os.readlink(dest / "RPMS" / "latest.rpm") == "noarch/hello-1.0.rpm"
    assert os.readlink(dest / "RPMS" / "other") == "../OTHER"
    for gone in ("shadow", "OTHER/passwd", "parent"):
        assert not os.path.lexists(dest / gone)
    assert sorted(path for path, _ in report.skipped) == ["OTHER/passwd", "parent", "shadow"]
    # skipped by the link rule itself, not by the later re-resolution pass (which would also
    # remove `parent`: this tells the two apart)
    assert all(why.startswith(LINK_REFUSED) for _, why in report.skipped), report.skipped
    assert report.symlinks == 2


def test_links_through_dot_or_a_middle_dotdot_are_refused_by_the_one_link_rule(tree: Path, tmp_path: Path) -> None:
    """`here -> .` and `up -> here/..` chain out of the results; the manifest's link rule (which
    the swap channel applies too) refuses both lexically, and a harmless-looking
    `RPMS/noarch/../../OTHER` with them, as obs-build's computeblocklists does."""
    src = tree / "results"
    os.symlink(".", src / "here")
    os.symlink("here/..", src / "up")  # lexically inside, physically the parent of the results
    os.symlink("RPMS/noarch/../../OTHER", src / "ok")
    dest = tmp_path / "dest"
    report = copy_results(src, dest, max_size=10 * MIB)
    assert not any(os.path.lexists(dest / name) for name in ("here", "up", "ok"))
    assert sorted(path for path, _ in report.skipped) == ["here", "ok", "up"]
    assert all(why.startswith(LINK_REFUSED) for _, why in report.skipped), report.skipped


def test_the_re_resolution_pass_still_catches_a_chain_that_escapes(tmp_path: Path) -> None:
    """The second line of defence, on a stage built by hand (the rule keeps such links out)."""
    (tmp_path / "stage").mkdir()
    os.symlink(".", tmp_path / "stage" / "here")
    os.symlink("here/..", tmp_path / "stage" / "up")
    os.symlink("here/x", tmp_path / "stage" / "fine")
    assert not resolves_inside(tmp_path / "stage", PurePosixPath("up"))
    assert resolves_inside(tmp_path / "stage", PurePosixPath("fine"))
    copier = dircopy._Copier(MIB, 100, 10)
    copier.links = [PurePosixPath("up"), PurePosixPath("fine")]
    copier.report.symlinks = 2
    copier.drop_escaping_links(tmp_path / "stage")
    assert copier.report.skipped == [("up", LINK_ESCAPES)]
    assert not os.path.lexists(tmp_path / "stage" / "up")


def test_fifos_sockets_and_device_nodes_are_skipped(tree: Path, tmp_path: Path) -> None:
    src = tree / "results"
    os.mkfifo(src / "fifo")
    os.mknod(src / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(src / "disk", 0o600 | stat.S_IFBLK, os.makedev(7, 0))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "sock"))
    sock.close()
    dest = tmp_path / "dest"
    report = copy_results(src, dest, max_size=10 * MIB)
    assert sorted(os.listdir(dest)) == ["OTHER", "RPMS", "empty"]
    assert sorted(path for path, _ in report.skipped) == ["disk", "fifo", "null", "sock"]


def test_hardlinks_are_copied_as_plain_files(tree: Path, tmp_path: Path) -> None:
    src = tree / "results"
    secret = tree / "secret"
    secret.write_text("inside the build root\n")
    os.link(secret, src / "hardlink")
    dest = tmp_path / "dest"
    copy_results(src, dest, max_size=10 * MIB)
    assert (dest / "hardlink").read_text() == "inside the build root\n"
    assert os.stat(dest / "hardlink").st_nlink == 1


def test_setuid_bits_are_dropped(tree: Path, tmp_path: Path) -> None:
    src = tree / "results"
    os.chmod(src / "empty", 0o4755)
    os.chmod(src / "OTHER", 0o3777)
    dest = tmp_path / "dest"
    copy_results(src, dest, max_size=10 * MIB)
    assert stat.S_IMODE(os.stat(dest / "empty").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(dest / "OTHER").st_mode) == 0o777


def test_a_symlinked_results_folder_is_refused_and_nothing_is_left(tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "host-secrets"
    outside.mkdir()
    (outside / "id_rsa").write_text("KEY")
    os.rename(tree / "results", tree / "real")
    os.symlink(outside, tree / "results")
    dest = tmp_path / "dest"
    with pytest.raises(UntrustedData, match="not a directory"):
        copy_results(tree / "results", dest, max_size=10 * MIB)
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["host-secrets", "root"]


def test_a_symlink_above_the_results_folder_is_refused_below_the_trusted_top(
    tree: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere" / "results"
    outside.mkdir(parents=True)
    (tree / "home").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UntrustedData):
        copy_results(tree / "home" / "results", tmp_path / "dest", max_size=MIB, trusted=tree)
    assert not (tmp_path / "dest").exists()


def test_the_size_limit_counts_bytes_read_and_cleans_up(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(UntrustedData, match="larger than the limit"):
        copy_results(tree / "results", dest, max_size=1000)
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["root"]


def test_a_sparse_file_counts_at_its_full_length(tree: Path, tmp_path: Path) -> None:
    with open(tree / "results" / "sparse", "wb") as f:
        f.truncate(50 * MIB)
    with pytest.raises(UntrustedData):
        copy_results(tree / "results", tmp_path / "dest", max_size=20 * MIB)


def test_entry_and_depth_limits(tree: Path, tmp_path: Path) -> None:
    with pytest.raises(UntrustedData, match="entries"):
        copy_results(tree / "results", tmp_path / "d1", max_size=MIB * 10, max_entries=3)
    deep = tree / "results"
    for _ in range(10):
        deep = deep / "d"
    deep.mkdir(parents=True)
    with pytest.raises(UntrustedData, match="deeper"):
        copy_results(tree / "results", tmp_path / "d2", max_size=MIB * 10, max_depth=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def test_dest_must_be_absent_or_empty(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    copy_results(tree / "results", dest, max_size=10 * MIB)  # empty: fine
    with pytest.raises(UsageError):
        copy_results(tree / "results", dest, max_size=10 * MIB)


def test_a_file_swapped_for_a_symlink_while_copying_is_not_followed(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = tree / "results" / "OTHER" / "_statistics"
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    real_open = os.open

    def racing_open(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if path == "_statistics" and not flags & os.O_WRONLY and victim.exists() and not victim.is_symlink():
            victim.unlink()
            victim.symlink_to(secret)
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(dircopy.os, "open", racing_open)
    report = copy_results(tree / "results", tmp_path / "dest", max_size=10 * MIB)
    monkeypatch.undo()
    assert not os.path.lexists(tmp_path / "dest" / "OTHER" / "_statistics")
    assert ("OTHER/_statistics", "changed from a regular file while copying") in report.skipped


def test_a_folder_swapped_for_a_symlink_while_copying_is_not_followed(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tree / "results" / "OTHER"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "loot").write_text("host data")
    real_open = os.open

    def racing_open(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if path == "OTHER" and folder.is_dir() and not folder.is_symlink():
            os.rename(folder, tree / "moved")
            folder.symlink_to(outside)
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(dircopy.os, "open", racing_open)
    copy_results(tree / "results", tmp_path / "dest", max_size=10 * MIB)
    monkeypatch.undo()
    assert not (tmp_path / "dest" / "OTHER").exists()
    assert not (tmp_path / "dest" / "OTHER" / "loot").exists()


@pytest.mark.parametrize(
    ("rel", "target", "inside"),
    [
        ("a", "b", True),
        ("a", "../b", False),
        ("x/a", "../b", True),
        ("x/a", "../../b", False),
        ("x/a", "./../x/./y", False),  # '.' components: refused by both channels
        ("x/a", "../x/../y", False),  # '..' in the middle
        ("a", "/etc", False),
        ("a", "", False),
    ],
)
def test_the_directory_channel_keeps_exactly_the_links_the_manifest_rule_keeps(
    tree: Path, tmp_path: Path, rel: str, target: str, inside: bool
) -> None:
    assert (manifest.symlink_problem(rel.encode(), target.encode()) is None) is inside
    if not target:
        return  # Linux cannot create a symlink with an empty target: the rule's answer is all
    src = tree / "results"
    (src / "x").mkdir()
    os.symlink(target, src / rel)
    report = copy_results(src, tmp_path / "dest", max_size=10 * MIB)
    assert os.path.lexists(tmp_path / "dest" / rel) is inside
    assert [path for path, _ in report.skipped] == ([] if inside else [rel])
