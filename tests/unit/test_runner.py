"""runner: the one place that runs commands; failures carry argv, exit status and stderr."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from cloudbuild import log as cblog
from cloudbuild import runner
from cloudbuild.errors import ExitCode, InfraError, exit_code_for
from cloudbuild.runner import CommandError, run, spawn, terminate, which

PY = sys.executable


@pytest.fixture
def debug_logs() -> Iterator[None]:
    cblog.configure(level=logging.DEBUG)
    try:
        yield
    finally:
        cblog.configure()


def test_run_returns_the_output() -> None:
    proc = run([PY, "-c", "print('hello')"])
    assert proc.returncode == 0
    assert proc.stdout == "hello\n"


def test_run_accepts_path_arguments(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("content")
    assert run(["cat", tmp_path / "f"]).stdout == "content"


def test_run_passes_input_env_and_cwd(tmp_path: Path) -> None:
    code = "import os, sys; print(sys.stdin.read(), os.environ['X'], os.getcwd())"
    proc = run([PY, "-c", code], input="in", env={"X": "ex", "PATH": os.environ["PATH"]}, cwd=tmp_path)
    assert proc.stdout.split() == ["in", "ex", str(tmp_path)]


def test_run_binary_mode_encodes_str_input() -> None:
    proc = run(
        [PY, "-c", "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read()[::-1])"],
        input="ab",
        text=False,
    )
    assert proc.stdout == b"ba"


def test_failure_carries_argv_status_and_the_stderr_tail() -> None:
    argv = [PY, "-c", "import sys; sys.stderr.write('first\\nthe real reason\\n'); sys.exit(3)", "extra"]
    with pytest.raises(CommandError) as info:
        run(argv)
    error = info.value
    assert error.argv == argv
    assert error.returncode == 3
    assert not error.timed_out
    assert "the real reason" in error.stderr
    assert str(error) == f"{PY} exited 3: the real reason"
    assert isinstance(error, InfraError)
    assert exit_code_for(error) == ExitCode.INFRA


def test_failure_without_stderr_has_a_short_message() -> None:
    with pytest.raises(CommandError, match=r"^false exited 1$"):
        run(["false"])


def test_stderr_is_cut_to_its_tail() -> None:
    code = f"import sys; sys.stderr.write('x' * {runner.STDERR_TAIL * 3} + 'END'); sys.exit(1)"
    with pytest.raises(CommandError) as info:
        run([PY, "-c", code])
    assert len(info.value.stderr) == runner.STDERR_TAIL
    assert info.value.stderr.endswith("END")


def test_check_false_returns_the_failed_process() -> None:
    proc = run(["false"], check=False)
    assert proc.returncode == 1


def test_timeout_raises_a_command_error_that_says_so() -> None:
    started = time.monotonic()
    with pytest.raises(CommandError) as info:
        run(
            [PY, "-c", "import sys, time; sys.stderr.write('slow\\n'); sys.stderr.flush(); time.sleep(30)"],
            timeout=0.5,
        )
    assert time.monotonic() - started < 10
    error = info.value
    assert error.timed_out
    assert error.returncode is None
    assert str(error).startswith(f"{PY} timed out")
    assert exit_code_for(error) == ExitCode.INFRA


def test_command_not_found_is_a_command_error() -> None:
    with pytest.raises(CommandError) as info:
        run(["cloudbuild-no-such-command", "--x"])
    assert info.value.returncode == 127
    assert info.value.argv == ["cloudbuild-no-such-command", "--x"]
    assert "command not found" in str(info.value)


def test_run_logs_its_argv(debug_logs: None) -> None:
    with capture_logs() as logs:
        run(["true", "arg"])
    assert {"event": "run", "argv": ["true", "arg"], "log_level": "debug"}.items() <= logs[0].items()


def test_spawn_and_terminate_kill_the_whole_session(tmp_path: Path) -> None:
    pidfile = tmp_path / "child"
    # the child ignores nothing, the grandchild is in the same session: both must go
    code = (
        "import subprocess, sys, time; "
        f"p = subprocess.Popen(['sleep', '60']); open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    with capture_logs() as logs:
        proc = spawn([PY, "-c", code], stdout=subprocess.DEVNULL)
    assert logs[0]["event"] == "spawn"
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    grandchild = int(pidfile.read_text())
    assert terminate(proc, grace=5) != 0
    deadline = time.monotonic() + 5
    while Path(f"/proc/{grandchild}").exists() and "Z" not in _state(grandchild):
        assert time.monotonic() < deadline, "the grandchild survived terminate()"
        time.sleep(0.02)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "Z"


def test_terminate_kills_what_ignores_sigterm() -> None:
    code = "import signal, time, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    proc = spawn([PY, "-c", code])
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    started = time.monotonic()
    assert terminate(proc, grace=0.3) == -9
    assert time.monotonic() - started < 5


def test_terminate_of_an_exited_process_returns_its_status() -> None:
    proc = spawn(["sh", "-c", "exit 7"])
    proc.wait()
    assert terminate(proc) == 7


def test_spawn_of_a_missing_command_is_a_command_error() -> None:
    with pytest.raises(CommandError, match="command not found"):
        spawn(["cloudbuild-no-such-command"])


def test_which_finds_executables_and_sbin_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert which("sh") is not None
    assert which("cloudbuild-no-such-command") is None
    tool = tmp_path / "tool"
    tool.write_text("#!/bin/sh\n")
    assert which("tool", extra_dirs=(str(tmp_path),)) is None  # not executable
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert which("tool", extra_dirs=(str(tmp_path),)) == tool
    assert which("mkfs.ext4") is not None  # /usr/sbin even without it on PATH


def test_the_message_names_the_reason_not_an_indented_hint() -> None:
    # mount(8): the reason, then "       dmesg(1) may have more information ..."
    stderr = "mount: /mnt: wrong fs type, bad option.\n       dmesg(1) may have more information.\n"
    assert (
        str(CommandError(["mount", "x"], 32, stderr))
        == "mount exited 32: mount: /mnt: wrong fs type, bad option."
    )
    assert str(CommandError(["x"], 1, "   only indented\n\n")) == "x exited 1: only indented"
    assert str(CommandError(["x"], 1, "a\nb\n\n  \n")) == "x exited 1: b"
