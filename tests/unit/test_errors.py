"""Every error class maps to obs-build's exit codes (0 ok, 1 failed, 2 unchanged, 3 infra, 4 host)."""

from __future__ import annotations

import inspect

import pytest

from cloudbuild import errors
from cloudbuild.errors import (
    BuildFailed,
    CloudbuildError,
    DeadlineExceeded,
    ExitCode,
    HostBroken,
    InfraError,
    Unchanged,
    UntrustedData,
    UsageError,
    exit_code_for,
)
from cloudbuild.runner import CommandError

EXPECTED: dict[type[BaseException], int] = {
    CloudbuildError: 3,
    UsageError: 1,
    BuildFailed: 1,
    Unchanged: 2,
    InfraError: 3,
    HostBroken: 4,
    UntrustedData: 3,
    DeadlineExceeded: 3,
}


def test_exit_codes_are_obs_builds() -> None:
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4]
    assert (ExitCode.OK, ExitCode.BUILD_FAILED, ExitCode.UNCHANGED) == (0, 1, 2)
    assert (ExitCode.INFRA, ExitCode.HOST_BROKEN) == (3, 4)


def test_every_error_class_in_errors_is_in_the_table() -> None:
    defined = {
        obj
        for _, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, BaseException) and obj.__module__ == errors.__name__
    }
    assert defined == set(EXPECTED)


@pytest.mark.parametrize(("cls", "code"), EXPECTED.items(), ids=[c.__name__ for c in EXPECTED])
def test_error_class_maps_to_its_exit_code(cls: type[CloudbuildError], code: int) -> None:
    error = cls("what broke")
    assert error.exit_code == code
    assert exit_code_for(error) == code
    assert str(error) == "what broke"


def test_command_error_is_an_infrastructure_error() -> None:
    error = CommandError(["mkfs.ext4", "/dev/x"], 1, "boom\nlast line\n")
    assert isinstance(error, InfraError)
    assert exit_code_for(error) == ExitCode.INFRA
    assert str(error) == "mkfs.ext4 exited 1: last line"
    assert error.argv == ["mkfs.ext4", "/dev/x"]


def test_subclasses_inherit_their_parents_code() -> None:
    class QuotaExceeded(InfraError):
        pass

    class BadRecipe(UsageError):
        pass

    assert exit_code_for(QuotaExceeded("x")) == ExitCode.INFRA
    assert exit_code_for(BadRecipe("x")) == ExitCode.BUILD_FAILED


@pytest.mark.parametrize(
    "error", [ValueError("x"), KeyError("k"), OSError(5, "EIO"), RuntimeError(), KeyboardInterrupt()]
)
def test_anything_else_is_an_infrastructure_problem(error: BaseException) -> None:
    assert exit_code_for(error) == ExitCode.INFRA
