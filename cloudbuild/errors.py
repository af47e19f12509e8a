"""Exception types and the exit codes they map to.

The exit codes are obs-build's, because build farms already dispatch on them:
0 ok, 1 build failed, 2 unchanged, 3 infrastructure problem (retry elsewhere), 4 host broken.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    BUILD_FAILED = 1
    UNCHANGED = 2
    INFRA = 3
    HOST_BROKEN = 4


class CloudbuildError(Exception):
    """Base of every error cloudbuild raises on purpose; str(error) is the one-line message."""

    exit_code: ExitCode = ExitCode.INFRA


class UsageError(CloudbuildError):
    """Bad options or input: running the same thing elsewhere would fail the same way."""

    exit_code = ExitCode.BUILD_FAILED


class BuildFailed(CloudbuildError):
    """The recipe ran and failed."""

    exit_code = ExitCode.BUILD_FAILED


class Unchanged(CloudbuildError):
    """The build produced the same result as before."""

    exit_code = ExitCode.UNCHANGED


class InfraError(CloudbuildError):
    """Something outside the recipe went wrong; the job should be retried elsewhere."""

    exit_code = ExitCode.INFRA


class HostBroken(CloudbuildError):
    """This worker host is unfit for builds (repeated attach failures, unusable hypervisor)."""

    exit_code = ExitCode.HOST_BROKEN


class UntrustedData(InfraError):
    """Data from the guest (status, manifest, console) was malformed or hostile."""


class DeadlineExceeded(InfraError):
    """A phase or waiter ran past its deadline."""


def exit_code_for(error: BaseException) -> ExitCode:
    """Map any exception to an exit code: ours carry one, anything else is an infrastructure bug."""
    if isinstance(error, CloudbuildError):
        return error.exit_code
    return ExitCode.INFRA
