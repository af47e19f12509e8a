"""The one place that runs external commands.

Every command is logged with its argv, has a timeout, and a failure raises `CommandError`
carrying the exit status and the tail of stderr, so an error message says what actually broke.
Long-running processes (a VM, a container) are started with `spawn()` and stopped with
`terminate()`; nothing else in the code base calls `subprocess` directly.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from cloudbuild.errors import InfraError
from cloudbuild.log import get_logger

log = get_logger(__name__)

Arg = str | os.PathLike[str]

DEFAULT_TIMEOUT = 600.0
STDERR_TAIL = 2000


class CommandError(InfraError):
    """An external command failed or timed out."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str, *, timed_out: bool = False):
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        self.timed_out = timed_out
        tail = _reason(stderr)
        what = "timed out" if timed_out else f"exited {returncode}"
        super().__init__(f"{argv[0]} {what}" + (f": {tail}" if tail else ""))


def _reason(stderr: str) -> str:
    """The line of stderr that says what broke: the last one, skipping indented continuation lines
    (mount ends with "       dmesg(1) may have more information ..." after the real reason)."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if not line[:1].isspace():
            return line.strip()
    return lines[-1].strip() if lines else ""


def _argv(argv: Sequence[Arg]) -> list[str]:
    return [os.fspath(a) for a in argv]


def run(
    argv: Sequence[Arg],
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    check: bool = True,
    input: bytes | str | None = None,
    capture: bool = True,
    text: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: Arg | None = None,
    stdout: int | IO[Any] | None = None,
) -> subprocess.CompletedProcess[Any]:
    """Run a command to completion; raise CommandError when it fails (unless check=False)."""
    args = _argv(argv)
    log.debug("run", argv=args, cwd=os.fspath(cwd) if cwd else None)
    if isinstance(input, str) and not text:
        input = input.encode()
    out = stdout if stdout is not None else (subprocess.PIPE if capture else None)
    try:
        # its own session, so a timeout kills the whole process tree, not only the direct child
        proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.PIPE if capture else None,
            text=text,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise CommandError(args, 127, f"{args[0]}: command not found") from exc
    try:
        stdout_data, stderr_data = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        terminate(proc, grace=2.0)
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise CommandError(args, None, stderr, timed_out=True) from exc
    except BaseException:
        terminate(proc, grace=2.0)  # interrupted: leave no orphan behind
        raise
    done: subprocess.CompletedProcess[Any] = subprocess.CompletedProcess(
        args, proc.returncode, stdout_data, stderr_data
    )
    if check and done.returncode != 0:
        err = stderr_data if isinstance(stderr_data, str) else (stderr_data or b"").decode(errors="replace")
        raise CommandError(args, done.returncode, err[-STDERR_TAIL:])
    return done


def which(name: str, *, extra_dirs: Sequence[str] = ("/usr/sbin", "/sbin")) -> Path | None:
    """Find an executable on PATH (plus the sbin folders a non-login root shell may lack)."""
    for folder in [*os.environ.get("PATH", "").split(os.pathsep), *extra_dirs]:
        candidate = Path(folder or ".") / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def spawn(
    argv: Sequence[Arg],
    *,
    stdin: int | IO[Any] | None = subprocess.DEVNULL,
    stdout: int | IO[Any] | None = subprocess.PIPE,
    stderr: int | IO[Any] | None = subprocess.STDOUT,
    env: Mapping[str, str] | None = None,
    cwd: Arg | None = None,
    new_session: bool = True,
    die_with_parent: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a long-running process (a VM, a container) in its own session so it can be killed whole.

    `die_with_parent`: the process gets SIGTERM when the thread that spawned it dies, even by
    SIGKILL (prctl PR_SET_PDEATHSIG), so a supervisor's sudden death stops its builds cleanly.
    """
    args = _argv(argv)
    log.info("spawn", argv=args)
    try:
        return subprocess.Popen(
            args,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=new_session,
            preexec_fn=_pdeathsig_setter() if die_with_parent else None,
        )
    except FileNotFoundError as exc:
        raise CommandError(args, 127, f"{args[0]}: command not found") from exc


def _pdeathsig_setter() -> Callable[[], None]:
    # libc is looked up here, before the fork: dlopen in a forked child of a threaded process can deadlock
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def terminate(proc: subprocess.Popen[Any], *, grace: float = 5.0) -> int:
    """Stop a spawned process and its session: SIGTERM, then SIGKILL after `grace` seconds."""
    if proc.poll() is not None:
        return proc.returncode
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()
