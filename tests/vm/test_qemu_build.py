"""Real builds in real (qemu/TCG) machines, through the `cloudbuild` command.

Each test boots one VM from a busybox build root (`cloudbuild rootfs`) and checks what comes
back into --dest, the exit code and that no qemu process outlives the build.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from local_backends.machines.kvm import kvm_problem
from tests.vm import localbuild
from tests.vm.localbuild import recipe, tree

pytestmark = pytest.mark.vm

CLI = [sys.executable, "-m", "cloudbuild"]


def qemu_processes(marker: str) -> list[int]:
    """qemu processes whose command line mentions `marker` (this test's folder)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and b"qemu-system" in cmdline[0] and any(marker.encode() in arg for arg in cmdline):
            found.append(int(entry))
    return found


rootfs = localbuild.rootfs
cache = localbuild.cache


@pytest.fixture(autouse=True)
def no_qemu_left(tmp_path: Path) -> Iterator[None]:
    yield
    left = qemu_processes(str(tmp_path))
    for pid in left:
        os.kill(pid, 9)
    assert not left, f"qemu processes left behind: {left}"


def build(
    tmp_path: Path,
    rootfs: Path,
    cache: Path,
    script: Path,
    *extra: str,
    timeout: float = 240,
    env_extra: dict[str, str] | None = None,
    wrapper: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        **(env_extra or {}),
        "CLOUDBUILD_CACHE_DIR": str(cache),
        "TMPDIR": str(tmp_path),  # the build's work folder (images) lives under the test's folder
    }
    argv = [
        *wrapper,
        *CLI,
        "build",
        "--vm-type",
        "qemu",
        "--rootfs",
        str(rootfs),
        "--dest",
        str(tmp_path / "out"),
        "--vm-disk-size",
        "512",
        "--vm-swap-size",
        "64",
        "--log-format",
        "json",
        *extra,
        str(script),
    ]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def test_success_returns_results_byte_exact_with_log_and_statistics(
    tmp_path: Path, rootfs: Path, cache: Path
) -> None:
    # the recipe's folder comes along: the "source" is generated on the host, checked in the guest
    src = tmp_path / "recipe"
    src.mkdir()
    big = os.urandom(3 * 1024 * 1024 + 123)
    (src / "input.bin").write_bytes(big)
    script = recipe(
        src,
        'test "$(pwd)" = /.build-srcdir\n'
        "grep -q '^SigIgn:[[:space:]]*0*$' /proc/self/status\n"  # no signal ignored (SIGPIPE!)
        "test -e /proc/1 && test -d /sys/block && test -c /dev/null && test -d /dev/pts && test -d /dev/shm\n"
        'mkdir -p "$BUILD_RESULTS/pkg/deep/er"\n'
        'cp input.bin "$BUILD_RESULTS/pkg/deep/er/big.bin"\n'
        'printf "hello\\n" > "$BUILD_RESULTS/pkg/hello.txt"\n'
        'printf "#!/bin/sh\\necho tool\\n" > "$BUILD_RESULTS/pkg/tool"\n'
        'chmod 755 "$BUILD_RESULTS/pkg/tool"\n'
        'chmod 700 "$BUILD_RESULTS/pkg/deep"\n'
        'ln -s deep/er/big.bin "$BUILD_RESULTS/pkg/link"\n'
        'ln -s .. "$BUILD_RESULTS/up"\n'  # inside the manifest's tree, outside DEST: dropped
        'ln -s ../.. "$BUILD_RESULTS/pkg/up"\n'
        ': > "$BUILD_RESULTS/empty"\n'
        'echo "recipe ran"\n',
    )
    proc = build(tmp_path, rootfs, cache, script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert tree(out) == {
        "pkg": "d",
        "pkg/deep": "d",
        "pkg/deep/er": "d",
        "pkg/deep/er/big.bin": hashlib.sha256(big).hexdigest(),
        "pkg/hello.txt": hashlib.sha256(b"hello\n").hexdigest(),
        "pkg/tool": hashlib.sha256(b"#!/bin/sh\necho tool\n").hexdigest(),
        "pkg/link": "l:deep/er/big.bin",
        "empty": hashlib.sha256(b"").hexdigest(),
    }
    # permission bits travel (the manifest's mode trailer): the executable stays executable
    assert stat.S_IMODE((out / "pkg" / "tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "pkg" / "deep").stat().st_mode) == 0o700
    assert subprocess.run([out / "pkg" / "tool"], capture_output=True, check=True).stdout == b"tool\n"
    log = (tmp_path / "out.log").read_text(errors="replace")
    assert "recipe ran" in log and "2nd stage started in virtual machine" in log
    statistics = dict(line.split(": ", 1) for line in (tmp_path / "out.statistics").read_text().splitlines())
    for key in (
        "MAX_mb_used_on_disk",
        "MAX_mb_used_memory",
        "IO_requests_read",
        "TIME_main_build",
        "TIME_total",
    ):
        assert statistics[key].isdigit(), key
    assert int(statistics["MAX_mb_used_memory"]) > 0
    assert '"phase": "boot"' in proc.stderr and '"phase": "extract"' in proc.stderr
    # the images lived in a private work folder, which is gone
    assert not list(tmp_path.glob("cloudbuild-*"))


def test_xfs_root_boots_with_its_modules_and_returns_results(
    tmp_path: Path, rootfs: Path, cache: Path
) -> None:
    script = recipe(
        tmp_path / "recipe",
        "grep ' / xfs ' /proc/mounts || grep -q ' xfs ' /proc/mounts\n"
        'dd if=/dev/urandom of="$BUILD_RESULTS/blob" bs=64k count=40 2>/dev/null\n',
    )
    proc = build(tmp_path, rootfs, cache, script, "--vm-disk-filesystem", "xfs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "blob").stat().st_size == 40 * 65536


def test_failing_recipe_gives_1_its_log_and_statistics_and_nothing_in_dest(
    tmp_path: Path, rootfs: Path, cache: Path
) -> None:
    script = recipe(
        tmp_path / "recipe", 'echo partial > "$BUILD_RESULTS/partial"\necho "about to fail"\nexit 7\n'
    )
    proc = build(tmp_path, rootfs, cache, script)
    assert proc.returncode == 1, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())
    assert "about to fail" in (tmp_path / "out.log").read_text(errors="replace")
    assert "exited 7" in (tmp_path / "out.log").read_text(errors="replace")
    statistics = (tmp_path / "out.statistics").read_text()  # obs-build's _statistics on failure too
    assert "TIME_main_build: " in statistics and "MAX_mb_used_memory: " in statistics
    assert "IO_requests_write: " in statistics


def test_a_build_started_under_linux32_runs_its_recipe_as_i686(
    tmp_path: Path, rootfs: Path, cache: Path
) -> None:
    """As OBS workers start i586 builds: the host's personality goes into build.data, the agent
    switches the recipe to it inside the x86_64 machine."""
    if os.uname().machine != "x86_64":
        pytest.fail("linux32 means i686 on x86_64 hosts only")
    script = recipe(tmp_path / "recipe", 'uname -m > "$BUILD_RESULTS/machine"\n')
    proc = build(tmp_path, rootfs, cache, script, wrapper=("linux32",))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "machine").read_text() == "i686\n"
    log = (tmp_path / "out.log").read_text(errors="replace")
    assert "machine type: x86_64" in log and "switching personality to 8..." in log


def test_a_distribution_initrd_gets_the_agent_appended_and_boots(
    tmp_path: Path, rootfs: Path, cache: Path
) -> None:
    """--vm-initrd with the host's own Debian initrd: our archive is appended to it, our /init
    loads the disk and ext4 drivers from it (with its modprobe) and starts the agent."""
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    initrds = [Path(f"/boot/initrd.img-{k.name.removeprefix('vmlinuz-')}") for k in kernels]
    pairs = [(k, i) for k, i in zip(kernels, initrds, strict=True) if i.is_file()]
    if not pairs:
        pytest.fail("no /boot/initrd.img-* next to a kernel: scripts/setup --test installs initramfs-tools")
    kernel, initrd = pairs[-1]
    script = recipe(tmp_path / "recipe", 'echo booted > "$BUILD_RESULTS/ok"\n')
    proc = build(tmp_path, rootfs, cache, script, "--vm-kernel", str(kernel), "--vm-initrd", str(initrd))
    assert proc.returncode == 0, (tmp_path / "out.log").read_text(errors="replace")[-3000:]
    assert (tmp_path / "out" / "ok").read_text() == "booted\n"


def test_hanging_recipe_is_killed_by_the_build_timeout(tmp_path: Path, rootfs: Path, cache: Path) -> None:
    script = recipe(tmp_path / "recipe", 'echo "hanging"\nsleep 3600\n')
    started = time.monotonic()
    proc = build(tmp_path, rootfs, cache, script, "--build-timeout", "20")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert time.monotonic() - started < 90
    assert "timeout" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_watchdog_kills_a_machine_whose_marker_stays_open(tmp_path: Path, rootfs: Path, cache: Path) -> None:
    # the guest closes the host's START marker once it runs; the recipe opens one and hangs
    script = recipe(tmp_path / "recipe", 'echo "### WATCHDOG MARKER START ###"\nsleep 3600\n')
    started = time.monotonic()
    proc = build(
        tmp_path, rootfs, cache, script, "--vm-watchdog", env_extra={"CLOUDBUILD_WATCHDOG_TIMEOUT": "25"}
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "watchdog" in proc.stderr
    assert time.monotonic() - started < 120
    log = (tmp_path / "out.log").read_text(errors="replace")
    assert "### WATCHDOG MARKER END ###" in log  # the guest's, after booting
    assert "### WATCHDOG TRIGGERED, KILLING VM ###" in log
    assert "2nd stage started" in log  # it fired on the recipe's marker, not during the boot


def test_guest_powering_off_without_status_gives_3(tmp_path: Path, rootfs: Path, cache: Path) -> None:
    script = recipe(tmp_path / "recipe", "sync\necho o > /proc/sysrq-trigger\nsleep 60\n")
    proc = build(tmp_path, rootfs, cache, script)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "no build status" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_guest_kernel_panic_is_a_crash_and_gives_3(tmp_path: Path, rootfs: Path, cache: Path) -> None:
    script = recipe(tmp_path / "recipe", "echo c > /proc/sysrq-trigger\nsleep 60\n")
    proc = build(tmp_path, rootfs, cache, script)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "kernel panic" in proc.stderr
    assert "Kernel panic - not syncing" in (tmp_path / "out.log").read_text(errors="replace")
    assert not (tmp_path / "out").exists()


def test_sigterm_stops_the_machine_and_cleans_up(tmp_path: Path, rootfs: Path, cache: Path) -> None:
    script = recipe(tmp_path / "recipe", 'echo "recipe sleeping"\nsleep 3600\n')
    env = {**os.environ, "CLOUDBUILD_CACHE_DIR": str(cache), "TMPDIR": str(tmp_path)}
    argv = [*CLI, "build", "--vm-type", "qemu", "--rootfs", str(rootfs), "--dest", str(tmp_path / "out")]
    proc = subprocess.Popen(
        [*argv, "--vm-disk-size", "512", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + 120
    while b"recipe sleeping" not in seen and time.monotonic() < deadline:  # the console echo
        chunk = proc.stdout.read1(4096)  # type: ignore[attr-defined]
        if not chunk:
            break
        seen += chunk
    assert b"recipe sleeping" in seen
    proc.terminate()
    assert proc.wait(timeout=30) == 3
    assert not qemu_processes(str(tmp_path))
    assert not list(tmp_path.glob("cloudbuild-*"))  # work folder and images removed


HOSTILE = (
    "BUILDSTATUS0"
    + "\n" * 500
    + "d results\nf results/../../escaped 5 4096 1\nf /tmp/absolute-escape 5 4096 1\n"
    + "l results/passwd /etc/passwd\n\n"
)


def test_swap_scribbler_cannot_make_the_host_write_outside_dest(
    tmp_path: Path, rootfs: Path, cache: Path
) -> None:
    # a background process keeps writing a status + hostile manifest onto the swap disk while
    # the recipe "succeeds": the agent must kill it before it writes the real manifest. It holds
    # the swap disk open and has a device node of its own in the build root, so neither the
    # unmount of /dev nor swapon's exclusive open stops it: only the kill does.
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "hostile").write_text(HOSTILE)
    script = recipe(
        tmp_path / "recipe",
        "swapoff /dev/vdb\n"  # the agent turned it on: an active swap device cannot be opened
        "cp -a /dev/vdb /tmp/swapdisk\n"
        "( exec 3</tmp/swapdisk; while :; do dd if=hostile of=/tmp/swapdisk conv=notrunc,fsync 2>/dev/null; "
        "done ) </dev/null >/dev/null 2>&1 &\n"
        "sleep 1\n"
        "kill -0 $!\n"
        'echo ok > "$BUILD_RESULTS/ok.txt"\n',
    )
    proc = build(tmp_path, rootfs, cache, script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tree(tmp_path / "out") == {"ok.txt": hashlib.sha256(b"ok\n").hexdigest()}
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/absolute-escape").exists()


def test_hostile_manifest_with_status_0_is_refused(tmp_path: Path, rootfs: Path, cache: Path) -> None:
    # the recipe writes BUILDSTATUS0 + a hostile manifest itself and powers off before the agent
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "hostile").write_text(HOSTILE)
    script = recipe(
        tmp_path / "recipe",
        "swapoff /dev/vdb\ndd if=hostile of=/dev/vdb conv=notrunc,fsync\nsync\necho o > /proc/sysrq-trigger\nsleep 60\n",
    )
    proc = build(tmp_path, rootfs, cache, script)
    assert proc.returncode == 3, (tmp_path / "out.log").read_text(errors="replace")[-3000:]
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/absolute-escape").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_memory_and_jobs_reach_the_guest(tmp_path: Path, rootfs: Path, cache: Path) -> None:
    script = recipe(
        tmp_path / "recipe",
        'nproc > "$BUILD_RESULTS/nproc"\n'
        'grep MemTotal /proc/meminfo > "$BUILD_RESULTS/meminfo"\n'
        'echo "$BUILD_JOBS" > "$BUILD_RESULTS/jobs"\n',
    )
    proc = build(tmp_path, rootfs, cache, script, "--vm-memory", "700", "--jobs", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "nproc").read_text().strip() == "2"
    assert (out / "jobs").read_text().strip() == "2"
    mem_kib = int((out / "meminfo").read_text().split()[1])
    assert 550 * 1024 < mem_kib <= 700 * 1024


def test_kvm_refuses_a_host_without_usable_kvm(tmp_path: Path, rootfs: Path, cache: Path) -> None:
    script = recipe(tmp_path / "recipe", 'echo ok > "$BUILD_RESULTS/ok"\n')
    env = {**os.environ, "CLOUDBUILD_CACHE_DIR": str(cache), "TMPDIR": str(tmp_path)}
    started = time.monotonic()
    proc = subprocess.run(
        [
            *CLI,
            "build",
            "--vm-type",
            "kvm",
            "--rootfs",
            str(rootfs),
            "--dest",
            str(tmp_path / "out"),
            str(script),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    problem = kvm_problem()
    if problem is None:  # a host with working KVM builds
        assert proc.returncode == 0, proc.stderr[-3000:]
        return
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert time.monotonic() - started < 30
    assert "--vm-type qemu" in proc.stderr
    if Path("/sys/module/kvm_pvm").exists():
        assert "kvm_pvm" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_shell_instead_of_the_recipe_on_the_machines_console(
    tmp_path: Path, rootfs: Path, cache: Path
) -> None:
    localbuild.drive_shell(tmp_path, cache, "qemu", rootfs, "--vm-disk-size", "512", "--vm-swap-size", "64")


def test_shell_after_a_failed_recipe_on_the_machines_console(
    tmp_path: Path, rootfs: Path, cache: Path
) -> None:
    localbuild.drive_shell_after_fail(
        tmp_path, cache, "qemu", rootfs, "--vm-disk-size", "512", "--vm-swap-size", "64"
    )
