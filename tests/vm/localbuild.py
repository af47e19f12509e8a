"""Helpers of the local-backend build tests (uml, lxc, chroot, and the xen/zvm/emulator flows on fakes)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cloudbuild.backend import Backend
from cloudbuild.build import BuildJob, BuildOutcome, run_build
from cloudbuild.buildroot.hoststeps import DiskHostSteps
from cloudbuild.options import VmOptions
from tests.fakes.console import RecordingConsole

CLI = [sys.executable, "-m", "cloudbuild"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox build root (`cloudbuild rootfs`)."""
    target = tmp_path_factory.mktemp("localrootfs") / "root"
    subprocess.run([*CLI, "rootfs", str(target)], check=True, capture_output=True)
    return target


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("localcache")


def recipe(folder: Path, body: str, name: str = "build.sh") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\nset -e\n" + body)
    path.chmod(0o755)
    return path


def cli_build(
    tmp_path: Path, cache: Path, vm_type: str, rootfs: Path, script: Path, *extra: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CLOUDBUILD_CACHE_DIR": str(cache), "TMPDIR": str(tmp_path)}
    argv = [
        *CLI,
        "build",
        "--vm-type",
        vm_type,
        "--rootfs",
        str(rootfs),
        "--dest",
        str(tmp_path / "out"),
        "--log-format",
        "json",
        *extra,
        str(script),
    ]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def spawn_build(
    tmp_path: Path, cache: Path, vm_type: str, rootfs: Path, script: Path, *extra: str
) -> subprocess.Popen[str]:
    env = {**os.environ, "CLOUDBUILD_CACHE_DIR": str(cache), "TMPDIR": str(tmp_path)}
    argv = [
        *CLI, "build", "--vm-type", vm_type, "--rootfs", str(rootfs), "--dest", str(tmp_path / "out"),
        "--log-format", "json", *extra, str(script),
    ]  # fmt: skip
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cli_kill(
    tmp_path: Path, cache: Path, vm_type: str, build_id: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CLOUDBUILD_CACHE_DIR": str(cache), "TMPDIR": str(tmp_path)}
    argv = [*CLI, "kill", "--vm-type", vm_type, "--build-id", build_id, "--log-format", "json", *extra]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def tree(top: Path) -> dict[str, str]:
    """relative path -> 'd', 'l:target' or the sha256 of the file (only these three kinds may exist)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(top))
            if path.is_symlink():
                out[rel] = "l:" + os.readlink(path)
            elif path.is_dir():
                out[rel] = "d"
            elif path.is_file():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[rel] = "SPECIAL"
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mounts_under(folder: Path) -> list[str]:
    text = Path("/proc/self/mountinfo").read_text()
    return [line.split()[4] for line in text.splitlines() if line.split()[4].startswith(str(folder))]


def processes_mentioning(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            root = os.readlink(f"/proc/{entry}/root")
        except OSError:
            continue
        if marker.encode() in cmdline or root.startswith(marker):
            found.append(int(entry))
    return found


def _loops(folder: Path) -> list[str]:
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(folder) in line]


def loop_devices_on(folder: Path, *, settle: float = 5.0) -> list[str]:
    """Loop devices still backed by files in `folder`, after giving autoclear (asynchronous) time."""
    from cloudbuild.errors import DeadlineExceeded
    from cloudbuild.retry import wait_for

    try:
        wait_for(lambda: not _loops(folder), what="loop devices to clear", timeout=settle, interval=0.05)
    except DeadlineExceeded:
        return _loops(folder)
    return []


def flow(
    backend: Backend, options: VmOptions, tmp_path: Path, script: Path, *, build_id: str = "t1", **job: Any
) -> tuple[BuildOutcome, RecordingConsole]:
    """The whole build through the orchestrator and the real host steps (in this process)."""
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    steps = DiskHostSteps(options, script, build_id=build_id, workdir=workdir)
    console = RecordingConsole()
    outcome = run_build(BuildJob(build_id, tmp_path / "out", workdir, **job), backend, steps, console)
    return outcome, console


HOSTILE_RECIPE = """\
R=$BUILD_RESULTS
mkdir -p $R/RPMS
cp input.bin $R/RPMS/input.bin
ln -s RPMS/input.bin $R/good-link
ln -s . $R/here
ln -s /etc/passwd $R/abs-link
ln -s ../../../../../../../../etc/passwd $R/rel-escape
ln -s here/.. $R/chain-escape
ln /bin/busybox $R/hardlink
mkfifo $R/fifo
mknod $R/null c 1 3
mknod $R/disk b 7 0
sleep 1000 &
echo planted
"""


def hostile_expected(input_sha: str, busybox_sha: str) -> dict[str, str]:
    """What may come back of HOSTILE_RECIPE: files, folders and the links the one link rule keeps
    (`here -> .` goes too: a '.' component, refused by both result channels)."""
    return {
        "RPMS": "d",
        "RPMS/input.bin": input_sha,
        "good-link": "l:RPMS/input.bin",
        "hardlink": busybox_sha,
    }


def wait_for_file(pattern: str, timeout: float = 60) -> Path:
    from cloudbuild.retry import wait_for

    def probe() -> Path | None:
        import glob

        found = glob.glob(pattern)
        return Path(found[0]) if found else None

    return wait_for(probe, what=pattern, timeout=timeout, interval=0.1)


class Terminal:
    """A terminal driven like a person at it (tmux on a private socket): type, read the screen."""

    def __init__(self, folder: Path):
        self.socket = folder / "tmux.sock"
        self.exit_file = folder / "terminal.exit"
        self.session = "build"

    def _tmux(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-S", str(self.socket), *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout

    def start(self, argv: list[str], env: dict[str, str]) -> None:
        import shlex

        command = f"{shlex.join(argv)}; echo $? > {shlex.quote(str(self.exit_file))}; sleep 600"
        subprocess.run(
            [
                "tmux",
                "-S",
                str(self.socket),
                "new-session",
                "-d",
                "-s",
                self.session,
                "-x",
                "160",
                "-y",
                "50",
                command,
            ],
            env={**env, "TERM": "xterm"},
            check=True,
            timeout=30,
        )

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-J", "-S", "-1000", "-t", self.session)

    def wait_for(self, text: str, timeout: float = 180) -> str:
        from cloudbuild.retry import wait_for

        def shown() -> str | None:
            screen = self.screen()
            return screen if text in screen else None

        return wait_for(
            shown,
            what=f"{text!r} on the terminal",
            timeout=timeout,
            interval=0.2,
        )

    def type(self, line: str) -> None:
        self._tmux("send-keys", "-t", self.session, "-l", line)
        self._tmux("send-keys", "-t", self.session, "Enter")

    def exit_code(self, timeout: float = 180) -> int:
        from cloudbuild.retry import wait_for

        text = wait_for(
            lambda: self.exit_file.read_text() if self.exit_file.exists() else None,
            what="the build to end",
            timeout=timeout,
            interval=0.2,
        )
        return int(text)

    def close(self) -> None:
        subprocess.run(["tmux", "-S", str(self.socket), "kill-server"], capture_output=True, timeout=30)


def build_argv(tmp_path: Path, vm_type: str, rootfs: Path, script: Path, *extra: str) -> list[str]:
    return [
        *CLI, "build", "--vm-type", vm_type, "--rootfs", str(rootfs), "--dest", str(tmp_path / "out"),
        "--log-format", "json", *extra, str(script),
    ]  # fmt: skip


def drive_shell(tmp_path: Path, cache: Path, vm_type: str, rootfs: Path, *extra: str) -> None:
    """`--shell` at a terminal: the recipe does not run; what is typed does, the exit code is the shell's."""
    script = recipe(tmp_path / "src", 'echo recipe-ran > "$BUILD_RESULTS/recipe"\n')
    env = {**os.environ, "CLOUDBUILD_CACHE_DIR": str(cache), "TMPDIR": str(tmp_path)}
    terminal = Terminal(tmp_path)
    try:
        terminal.start(build_argv(tmp_path, vm_type, rootfs, script, "--shell", *extra), env)
        terminal.wait_for("RUN_SHELL: a shell in the build root")
        terminal.type('echo "typed-$((6*7))" > "$BUILD_RESULTS/typed"; echo "screen-$((40+2))"')
        terminal.wait_for("screen-42")  # the shell's output, not the echo of what was typed
        terminal.type("exit 0")
        code = terminal.exit_code()
    finally:
        terminal.close()
    assert code == 0, (tmp_path / "out.log").read_text(errors="replace")[-3000:]
    assert tree(tmp_path / "out") == {"typed": sha(b"typed-42\n")}  # the recipe never ran


def drive_shell_after_fail(tmp_path: Path, cache: Path, vm_type: str, rootfs: Path, *extra: str) -> None:
    """`--shell-after-fail`: the failed recipe leaves a shell; after it the build is still failed (1)."""
    script = recipe(tmp_path / "src", 'echo partial > "$BUILD_RESULTS/partial"\nexit 3\n')
    env = {**os.environ, "CLOUDBUILD_CACHE_DIR": str(cache), "TMPDIR": str(tmp_path)}
    terminal = Terminal(tmp_path)
    try:
        terminal.start(build_argv(tmp_path, vm_type, rootfs, script, "--shell-after-fail", *extra), env)
        terminal.wait_for("RUN_SHELL_AFTER_FAIL: a shell in the build root")
        terminal.type('cat "$BUILD_RESULTS/partial"; echo "after-$((6*7))"')
        screen = terminal.wait_for("after-42")
        assert "partial" in screen.split("after-$((6*7))", 1)[1]  # the failed build's files are there
        terminal.type("exit 0")
        code = terminal.exit_code()
    finally:
        terminal.close()
    assert code == 1, (tmp_path / "out.log").read_text(errors="replace")[-3000:]
    assert not (tmp_path / "out").exists()
    assert "TIME_main_build: " in (tmp_path / "out.statistics").read_text()
