"""Real builds of the directory-channel backends through the `cloudbuild` command, the same cases for each:
chroot (`--vm-type none`: unshare + chroot on this host) and LXC. No process, mount or container
may outlive a test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm import localbuild
from tests.vm.localbuild import (
    HOSTILE_RECIPE,
    cli_build,
    cli_kill,
    hostile_expected,
    mounts_under,
    processes_mentioning,
    recipe,
    sha,
    spawn_build,
    tree,
    wait_for_file,
)

pytestmark = pytest.mark.vm
rootfs = localbuild.rootfs
cache = localbuild.cache
# lxc also gets a memory limit: its cgroup setting is part of what must work
EXTRA_ARGS = {"none": (), "lxc": ("--vm-memory", "256")}


@pytest.fixture(params=sorted(EXTRA_ARGS))
def vm(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def nothing_left(tmp_path: Path) -> Iterator[None]:
    yield
    assert mounts_under(tmp_path) == []
    assert list(tmp_path.glob("cloudbuild-*")) == []  # work folder (and lxcpath with the container) gone
    left = processes_mentioning(str(tmp_path))
    for pid in left:
        os.kill(pid, 9)
    assert left == []


def test_success_returns_results_byte_exact(tmp_path: Path, rootfs: Path, cache: Path, vm: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(2 * 1024 * 1024 + 7)
    (src / "input.bin").write_bytes(data)
    script = recipe(
        src,
        "mkdir -p $BUILD_RESULTS/RPMS/noarch\n"
        "cp input.bin $BUILD_RESULTS/RPMS/noarch/input.bin\n"
        "echo -n generated > $BUILD_RESULTS/RPMS/gen.txt\n"
        "ln -s noarch/input.bin $BUILD_RESULTS/RPMS/latest\n"
        "test -e /proc/self/status && test -c /dev/null && test -d /dev/pts\n"
        # the build must not reach the host's magic sysrq key ('h' only prints help, should it work)
        "if echo h > /proc/sysrq-trigger 2>/dev/null; then echo sysrq writable; exit 9; fi\n"
        "echo built in $(pwd)\n",
    )
    proc = cli_build(tmp_path, cache, vm, rootfs, script, *EXTRA_ARGS[vm])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tree(tmp_path / "out") == {
        "RPMS": "d",
        "RPMS/noarch": "d",
        "RPMS/noarch/input.bin": sha(data),
        "RPMS/gen.txt": sha(b"generated"),
        "RPMS/latest": "l:noarch/input.bin",
    }
    assert "built in /.build-srcdir" in (tmp_path / "out.log").read_text()
    assert "MAX_mb_used_on_disk" in (tmp_path / "out.statistics").read_text()
    assert list(tmp_path.glob("cloudbuild-*")) == []  # the work folder is gone


def test_planted_links_and_special_files_never_reach_the_host(
    tmp_path: Path, rootfs: Path, cache: Path, vm: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(100_000)
    (src / "input.bin").write_bytes(data)
    proc = cli_build(tmp_path, cache, vm, rootfs, recipe(src, HOSTILE_RECIPE))
    assert proc.returncode == 0, proc.stderr[-3000:]
    busybox = (rootfs / "bin" / "busybox").read_bytes()
    assert tree(tmp_path / "out") == hostile_expected(sha(data), sha(busybox))
    for skipped in ("abs-link", "rel-escape", "chain-escape", "here", "fifo", "null", "disk"):
        assert skipped in proc.stderr  # each one is named in a warning


def test_a_symlinked_results_folder_is_refused(tmp_path: Path, rootfs: Path, cache: Path, vm: str) -> None:
    script = recipe(tmp_path / "src", "rm -rf $BUILD_RESULTS\nln -s /etc $BUILD_RESULTS\n")
    proc = cli_build(tmp_path, cache, vm, rootfs, script)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_a_failing_recipe_fails_the_build_with_its_statistics_and_extracts_nothing(
    tmp_path: Path, rootfs: Path, cache: Path, vm: str
) -> None:
    script = recipe(
        tmp_path / "src", "mkdir -p $BUILD_RESULTS/RPMS\necho x > $BUILD_RESULTS/RPMS/x\nexit 7\n"
    )
    proc = cli_build(tmp_path, cache, vm, rootfs, script)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()
    assert "exited 7" in (tmp_path / "out.log").read_text()
    assert "TIME_main_build: " in (tmp_path / "out.statistics").read_text()  # on failure too


def test_the_build_timeout_stops_everything(tmp_path: Path, rootfs: Path, cache: Path, vm: str) -> None:
    script = recipe(tmp_path / "src", "sleep 1000\n")
    proc = cli_build(tmp_path, cache, vm, rootfs, script, "--build-timeout", "3")
    assert proc.returncode == 3, proc.stderr[-3000:]


def test_cloudbuild_kill_stops_the_build_which_then_fails(
    tmp_path: Path, rootfs: Path, cache: Path, vm: str
) -> None:
    script = recipe(tmp_path / "src", "touch $BUILD_RESULTS/started\nsleep 1000\n")
    build = spawn_build(tmp_path, cache, vm, rootfs, script, "--build-id", "killme")
    try:
        wait_for_file(str(tmp_path / "cloudbuild-killme-*/root/.build.out/results/started"))
        killed = cli_kill(tmp_path, cache, vm, "killme")
        assert killed.returncode == 0, killed.stderr
        _, stderr = build.communicate(timeout=60)
    finally:
        if build.poll() is None:
            build.kill()
    assert build.returncode == 1, stderr[-3000:]
    assert not (tmp_path / "out").exists()
    again = cli_kill(tmp_path, cache, vm, "killme")
    assert again.returncode == 0 and "no build killme is running" in again.stderr


# chroot only


def test_chroot_is_reachable_as_vm_type_chroot_too(tmp_path: Path, rootfs: Path, cache: Path) -> None:
    script = recipe(tmp_path / "src", "echo ok > $BUILD_RESULTS/ok\n")
    proc = cli_build(tmp_path, cache, "chroot", rootfs, script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "ok").read_text() == "ok\n"


def test_the_watchdog_stops_a_build_that_hangs_in_a_marked_section(
    tmp_path: Path, rootfs: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUDBUILD_WATCHDOG_TIMEOUT", "2")
    script = recipe(tmp_path / "src", "echo '### WATCHDOG MARKER START ###'\nsleep 1000\n")
    proc = cli_build(tmp_path, cache, "none", rootfs, script, "--vm-watchdog")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "WATCHDOG TRIGGERED" in (tmp_path / "out.log").read_text()


def test_a_planted_statistics_link_never_redirects_the_agent_onto_the_host(
    tmp_path: Path, rootfs: Path, cache: Path
) -> None:
    """The chroot's agent runs on the host: `_statistics` planted as a link to a host file must be
    replaced, never written through."""
    victim = tmp_path / "host-file"
    victim.write_text("precious\n")
    script = recipe(
        tmp_path / "src", f"ln -s {victim} /.build.out/_statistics\necho ok > $BUILD_RESULTS/ok\n"
    )
    proc = cli_build(tmp_path, cache, "none", rootfs, script)
    assert victim.read_text() == "precious\n"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TIME_main_build: " in (tmp_path / "out.statistics").read_text()


def test_shell_instead_of_the_recipe_at_the_terminal(tmp_path: Path, rootfs: Path, cache: Path) -> None:
    localbuild.drive_shell(tmp_path, cache, "none", rootfs)


def test_shell_after_a_failed_recipe_keeps_the_build_failed(
    tmp_path: Path, rootfs: Path, cache: Path
) -> None:
    localbuild.drive_shell_after_fail(tmp_path, cache, "none", rootfs)
