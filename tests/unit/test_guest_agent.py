"""The guest agent on the host: the whole 2nd stage except the VM (root folder mode, --container)."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudbuild.buildroot import stage
from cloudbuild.commands.rootfs import busybox_rootfs
from cloudbuild.disk import buildstatus
from cloudbuild.disk.extract import extract_results
from cloudbuild.guest import agent
from cloudbuild.options import VmOptions


def test_arguments_default_to_the_kernel_command_line() -> None:
    config = agent.parse_args(
        [], {"root": "/dev/vda", "rootfstype": "xfs", "rootflags": "noatime", "cloudbuild.swap": "/dev/vdb"}
    )
    assert (config.root_device, config.fstype, config.mount_options, config.swap) == (
        "/dev/vda",
        "xfs",
        "noatime",
        "/dev/vdb",
    )
    assert config.poweroff and not config.container
    config = agent.parse_args(["--root-dir=/srv/root", "--container", "--swap", "/x"], {"root": "/dev/vda"})
    assert (config.root_dir, config.root_device, config.swap, config.poweroff) == (
        "/srv/root",
        None,
        "/x",
        False,
    )
    with pytest.raises(SystemExit):
        agent.parse_args([], {})
    with pytest.raises(SystemExit):
        agent.parse_args(["--bogus"], {"root": "/dev/vda"})


def test_result_paths_are_find_like_and_never_follow_links(tmp_path: Path) -> None:
    top = tmp_path / "out"
    (top / "results/a/b").mkdir(parents=True)
    (top / "results/a/b/f").write_text("x")
    (top / "results/ln").symlink_to("/etc")
    (top / "results/dirlink").symlink_to("a")
    os.mkfifo(top / "results/fifo")
    (top / "_statistics").write_text("K: 1\n")
    paths = agent.result_paths(str(top), ["results", "_statistics", "missing"])
    assert paths == [
        "results",
        "results/dirlink",
        "results/ln",
        "results/a",
        "results/a/b",
        "results/a/b/f",
        "_statistics",
    ]


@pytest.fixture
def mounted_root(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """An ext4 image with a busybox root, loop-mounted (the agent's view in a VM, minus the VM)."""
    image = tmp_path / "root.img"
    subprocess.run(["truncate", "-s", "128M", image], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", image], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", image, mnt], check=True)
    try:
        busybox_rootfs(mnt)
        yield image, mnt
    finally:
        subprocess.run(["umount", mnt], check=False)


def stage_recipe(root: Path, tmp_path: Path, body: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "build.sh").write_text("#!/bin/sh\nset -e\n" + body)
    (src / "build.sh").chmod(0o755)
    variables = stage.build_variables(
        VmOptions(vm_type="lxc"), src / "build.sh", build_id="test", guest_swap=None
    )
    stage.stage_build_root(root, src / "build.sh", variables)


def folder_root(tmp_path: Path, body: str, *, vm_type: str = "qemu", **extra: str) -> tuple[Path, Path]:
    """A busybox build root in a plain folder, staged with `body` as the recipe; and a swap file."""
    root = tmp_path / "root"
    busybox_rootfs(root)
    src = tmp_path / "src"
    src.mkdir()
    (src / "build.sh").write_text("#!/bin/sh\n" + body)
    (src / "build.sh").chmod(0o755)
    variables = stage.build_variables(
        VmOptions(vm_type=vm_type), src / "build.sh", build_id="t", guest_swap=None, extra=extra
    )
    stage.stage_build_root(root, src / "build.sh", variables)
    swap = tmp_path / "swap.img"
    swap.write_bytes(b"\0" * 65536)
    return root, swap


def run_agent(root: Path, swap: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "cloudbuild.guest.agent",
            "--root-dir",
            str(root),
            "--swap",
            str(swap),
            "--container",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_agent_runs_the_recipe_and_hands_back_results_through_the_swap(
    mounted_root: tuple[Path, Path], tmp_path: Path
) -> None:
    image, root = mounted_root
    stage_recipe(
        root,
        tmp_path,
        'test "$(pwd)" = /.build-srcdir\n'
        'mkdir -p "$BUILD_RESULTS/d"\n'
        'cp /bin/busybox "$BUILD_RESULTS/d/blob"\n'  # no /dev here: the container mode mounts nothing
        'ln -s d/blob "$BUILD_RESULTS/link"\n'
        # a leftover process that really runs (the shell opens /dev/null for it): the agent must kill it
        "sleep 300 >/dev/null 2>&1 &\n"
        "echo $! > /tmp/leftover.pid\n"
        "kill -0 $!\n",
    )
    os.mknod(root / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # no devtmpfs in container mode
    swap = tmp_path / "swap.img"
    swap.write_bytes(b"\0" * (1 << 20))
    proc = run_agent(root, swap)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2nd stage started" in proc.stdout and "build status 0" in proc.stdout
    assert buildstatus.read(swap) == 0
    blob = (root / ".build.out/results/d/blob").read_bytes()
    assert "TIME_main_build: " in (root / ".build.out/_statistics").read_text()
    leftover = int((root / "tmp/leftover.pid").read_text())
    assert not _alive(leftover), f"the build's leftover process {leftover} outlived the agent"
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _root_of(p) == str(root)]
    subprocess.run(["umount", root], check=True)
    dest = tmp_path / "dest"
    dest.mkdir()
    extract_results(image, swap, skip=512, dest=dest)
    assert (dest / "results/d/blob").read_bytes() == blob
    assert os.readlink(dest / "results/link") == "d/blob"
    assert "MAX_mb_used_memory: " in (dest / "_statistics").read_text()
    subprocess.run(["mount", "-o", "loop", image, root], check=True)  # the fixture unmounts


def _alive(pid: int) -> bool:
    """Running (a killed process may linger as a zombie until the host's init reaps it)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text.rpartition(")")[2].split()[0] not in ("Z", "X")


def _root_of(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/root")
    except OSError:
        return None


def test_a_failed_recipe_hands_back_its_statistics_and_nothing_else(
    mounted_root: tuple[Path, Path], tmp_path: Path
) -> None:
    image, root = mounted_root
    stage_recipe(root, tmp_path, 'echo x > "$BUILD_RESULTS/x"\nexit 3\n')
    swap = tmp_path / "swap.img"
    swap.write_bytes(b"\0" * 65536)
    proc = run_agent(root, swap)
    assert proc.returncode == 1
    assert "exited 3" in proc.stdout
    assert buildstatus.read(swap) == 1
    subprocess.run(["umount", root], check=True)
    try:
        dest = tmp_path / "dest"
        dest.mkdir()
        extract_results(image, swap, skip=512, dest=dest)
        assert sorted(os.listdir(dest)) == ["_statistics"]  # the results of a failed build stay behind
        assert "TIME_main_build: " in (dest / "_statistics").read_text()
    finally:
        subprocess.run(["mount", "-o", "loop", image, root], check=True)  # the fixture unmounts


def test_agent_without_build_data_reports_an_infrastructure_failure(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    swap = tmp_path / "swap.img"
    swap.write_bytes(b"\0" * 4096)
    proc = run_agent(tmp_path / "root", swap)
    assert proc.returncode == 3
    assert "cannot read" in proc.stdout
    assert buildstatus.read(swap) == 3
    assert hashlib.sha256(swap.read_bytes()[12:]).digest() == hashlib.sha256(b"\0" * (4096 - 12)).digest()


def test_exit_file_is_written_for_swapless_machines_without_following_planted_links(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / ".build").mkdir(parents=True)
    victim = tmp_path / "host-file"
    victim.write_text("precious\n")
    (root / ".build" / "_exitcode").symlink_to(victim)
    agent.write_exit_file(str(root), 1)
    assert victim.read_text() == "precious\n"
    exit_file = root / ".build" / "_exitcode"
    assert not exit_file.is_symlink() and exit_file.read_text() == "1\n"
    # a /.build that is itself a planted link gets nothing written through it
    other = tmp_path / "other"
    other.mkdir()
    (other / "outside").mkdir()
    (other / ".build").symlink_to(other / "outside")
    agent.write_exit_file(str(other), 0)
    assert list((other / "outside").iterdir()) == []


def test_build_results_climbing_out_of_the_root_is_refused(tmp_path: Path) -> None:
    """BUILD_RESULTS with `..` in build.data would put _statistics (and the manifest's top) outside
    the build root; in container mode that is a host folder."""
    outside = tmp_path / "outside" / "results"
    outside.mkdir(parents=True)
    climbing = "/.." * len((tmp_path / "root").parts) + str(outside)
    root, swap = folder_root(tmp_path, "true\n", BUILD_RESULTS=climbing)
    proc = run_agent(root, swap)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"BUILD_RESULTS {climbing!r} is not an absolute path" in proc.stdout
    assert buildstatus.read(swap) == 3
    assert list(outside.parent.iterdir()) == [outside]  # no _statistics next to it
    assert swap.read_bytes()[12:] == b"\0" * (65536 - 12)  # and no manifest of host files


@pytest.mark.parametrize(
    ("vm_type", "persona", "machine"),
    [("qemu", "8", "i686"), ("qemu", "0", "x86_64"), ("lxc", "8", "x86_64")],  # lxc never switches
)
def test_the_recipe_runs_under_the_personality_of_build_data(
    tmp_path: Path, vm_type: str, persona: str, machine: str
) -> None:
    if os.uname().machine != "x86_64":
        pytest.fail("this test knows the names of x86_64's personalities only")
    root, swap = folder_root(
        tmp_path, 'uname -m > "$BUILD_RESULTS/machine"\n', vm_type=vm_type, PERSONALITY=persona
    )
    proc = run_agent(root, swap)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (root / ".build.out/results/machine").read_text() == machine + "\n"
    assert ("switching personality to 8..." in proc.stdout) is (machine == "i686")


def test_a_personality_that_is_no_number_is_an_infrastructure_failure(tmp_path: Path) -> None:
    root, swap = folder_root(tmp_path, "true\n", PERSONALITY="8; reboot")
    proc = run_agent(root, swap)
    assert proc.returncode == 3
    assert "build.data: PERSONALITY '8; reboot' is not a personality number" in proc.stdout


@pytest.mark.parametrize(("vm_type", "expected"), [("qemu", "8"), ("none", "8"), ("lxc", "0")])
def test_build_data_records_the_personality_the_host_runs_under(vm_type: str, expected: str) -> None:
    """`linux32 cloudbuild build` (as OBS workers start i586 builds) writes PERSONALITY='8'."""
    code = (
        "from pathlib import Path; from cloudbuild.buildroot import stage; from cloudbuild.options import VmOptions;"
        f"print(stage.build_variables(VmOptions(vm_type={vm_type!r}), Path('/r/b.sh'), build_id='t',"
        " guest_swap=None)['PERSONALITY'])"
    )
    proc = subprocess.run(["linux32", sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout == expected + "\n"
