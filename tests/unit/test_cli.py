"""The `cloudbuild` dispatcher: usage, version, unknown commands, errors mapped to exit codes."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cloudbuild import __version__, cli
from cloudbuild.errors import BuildFailed, CloudbuildError, HostBroken, InfraError, Unchanged, UsageError
from cloudbuild.runner import run

REPO = Path(__file__).resolve().parents[2]


def cloudbuild(*args: str) -> tuple[int, str, str]:
    """Run `python -m cloudbuild ARGS` in a subprocess: (exit status, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = run([sys.executable, "-m", "cloudbuild", *args], check=False, env=env, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def test_no_arguments_prints_usage_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 1
    assert capsys.readouterr().out == cli.USAGE


@pytest.mark.parametrize("flag", ["-h", "--help", "help"])
def test_help_prints_usage(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([flag]) == 0
    out = capsys.readouterr().out
    for command in cli.SUBCOMMANDS:
        assert f"  {command} " in out
    assert "exit codes: 0 ok, 1 build failed" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"cloudbuild {__version__}\n"


def test_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["frobnicate"]) == 1
    err = capsys.readouterr().err
    assert "unknown command 'frobnicate'" in err
    assert "build" in err


def _entry_raising(error: BaseException) -> Callable[[str], Callable[[list[str]], int]]:
    def entry(command: str) -> Callable[[list[str]], int]:
        def main(argv: list[str]) -> int:
            raise error

        return main

    return entry


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (UsageError("--vm-memory needs an argument"), 1),
        (BuildFailed("the build failed"), 1),
        (Unchanged("same"), 2),
        (InfraError("attach timed out"), 3),
        (CloudbuildError("generic"), 3),
        (HostBroken("no /dev/kvm"), 4),
        (KeyboardInterrupt(), 3),
    ],
)
def test_errors_become_a_message_and_their_exit_code(
    error: BaseException, code: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "_entry", _entry_raising(error))
    assert cli.main(["build", "x"]) == code
    err = capsys.readouterr().err
    expected = "interrupted" if isinstance(error, KeyboardInterrupt) else str(error)
    assert err == f"cloudbuild build: {expected}\n"


def test_the_subcommand_gets_the_remaining_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def entry(command: str) -> Callable[[list[str]], int]:
        assert command == "gc"
        return lambda argv: seen.append(argv) or 0

    monkeypatch.setattr(cli, "_entry", entry)
    assert cli.main(["gc", "--dry-run", "x"]) == 0
    assert seen == [["--dry-run", "x"]]


def test_every_subcommand_names_an_importable_module_path() -> None:
    for command, (module, summary) in cli.SUBCOMMANDS.items():
        assert module.startswith("cloudbuild."), command
        assert summary


def test_python_m_cloudbuild_version() -> None:
    code, out, _ = cloudbuild("--version")
    assert (code, out) == (0, f"cloudbuild {__version__}\n")


def test_python_m_cloudbuild_unknown_command() -> None:
    code, _, err = cloudbuild("frobnicate")
    assert code == 1
    assert "unknown command 'frobnicate'" in err


def test_build_with_an_unknown_vm_type_is_not_supported(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["build", "--vm-type", "nosuchvm", "x"])
    assert code != 0
    assert "not supported" in capsys.readouterr().err


def test_build_with_an_unknown_vm_type_is_not_supported_in_a_subprocess() -> None:
    code, _, err = cloudbuild("build", "--vm-type", "nosuchvm", "x")
    assert code != 0
    assert "not supported" in err
    assert "Traceback" not in err
