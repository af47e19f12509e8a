"""The `cloudbuild` command: a thin dispatcher to the modules that own each subcommand.

Each subcommand is `module:function(argv) -> int`, imported only when used so that
`cloudbuild --help` and the guest-side commands start fast and never import boto3.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from collections.abc import Callable, Sequence

from cloudbuild import __version__
from cloudbuild.errors import CloudbuildError, ExitCode

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "build": ("cloudbuild.commands.build", "run one build in a VM (or chroot) and collect its results"),
    "rootfs": ("cloudbuild.commands.rootfs", "create a minimal build root (busybox) or a Debian one"),
    "kill": ("cloudbuild.commands.kill", "stop a running build (marks it failed so nothing is extracted)"),
    "extract": ("cloudbuild.commands.extract", "copy results out of a raw/qcow2 disk by a blocklist manifest"),
    "blocklist": ("cloudbuild.commands.blocklist", "write the blocklist manifest of result files"),
    "gc": ("cloudbuild.commands.gc", "sweep cloud resources left by crashed workers (seen twice)"),
    "worker": ("cloudbuild.commands.worker", "take build jobs from a queue, build them, store the results"),
    "submit": ("cloudbuild.commands.submit", "queue a build job (a recipe or a job document); prints its id"),
    "status": (
        "cloudbuild.commands.status",
        "a job's state: queued, running, done (exit code), failed-permanently",
    ),
    "results": ("cloudbuild.commands.results", "fetch a finished job's artifacts, log and statistics"),
    "logs": ("cloudbuild.commands.logs", "a job's build log, live with --follow"),
    "image": ("cloudbuild.commands.image", "build or upload the builder/worker images of the clouds"),
}

USAGE = (
    "usage: cloudbuild [--version] COMMAND [ARGS...]\n\ncommands:\n"
    + "\n".join(f"  {name:<10} {summary}" for name, (_, summary) in SUBCOMMANDS.items())
    + "\n\n`cloudbuild COMMAND --help` describes a command.\n"
    + (
        "exit codes: 0 ok, 1 build failed or bad options, 2 unchanged, 3 infrastructure problem "
        "(retry elsewhere), 4 host broken\n"
    )
)


def _entry(command: str) -> Callable[[list[str]], int]:
    module_name, _ = SUBCOMMANDS[command]
    module = importlib.import_module(module_name)
    entry: Callable[[list[str]], int] = module.main
    return entry


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if args else 1
    if args[0] == "--version":
        print(f"cloudbuild {__version__}")
        return 0
    command = args.pop(0)
    if command not in SUBCOMMANDS:
        print(f"cloudbuild: unknown command '{command}' (one of {', '.join(SUBCOMMANDS)})", file=sys.stderr)
        return int(ExitCode.BUILD_FAILED)
    try:
        return _entry(command)(args)
    except CloudbuildError as exc:
        print(f"cloudbuild {command}: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print(f"cloudbuild {command}: interrupted", file=sys.stderr)
        return int(ExitCode.INFRA)
    except Exception as exc:  # a bug in cloudbuild is an infrastructure problem, never "build failed"
        traceback.print_exc()
        print(f"cloudbuild {command}: internal error: {exc!r}", file=sys.stderr)
        return int(ExitCode.INFRA)
