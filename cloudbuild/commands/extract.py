"""`cloudbuild extract`: the command line of the host-side extractor (obs-build's extractbuild);
the work is `cloudbuild.disk.extract`.

SIGTERM, SIGINT and SIGHUP end the command as an infrastructure problem (exit 3) after the
staging folder is removed: a killed extraction never leaves partial results in DEST.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from cloudbuild.commands.usage import UsageParser
from cloudbuild.disk import manifest
from cloudbuild.disk.extract import extract_results
from cloudbuild.errors import CloudbuildError, InfraError, UsageError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Stopped(InfraError):
    """A stop signal arrived: the extraction was abandoned and its staging folder removed."""


def _parser() -> UsageParser:
    parser = UsageParser(
        prog="cloudbuild extract",
        description="Copy result files out of a raw/qcow2 disk by a blocklist manifest (obs-build's extractbuild).",
    )
    parser.add_argument(
        "--disk", required=True, type=Path, metavar="IMAGE", help="root disk: image or block device"
    )
    parser.add_argument(
        "--input", type=Path, metavar="FILE", help="manifest source (swap disk); default stdin"
    )
    parser.add_argument(
        "--skip", type=int, default=0, metavar="N", help="bytes of build status before the manifest"
    )
    parser.add_argument("--qcow2", "--qcow", action="store_true", help="the disk is a qcow2 image")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="print each name")
    parser.add_argument(
        "--dest", type=Path, default=Path("."), metavar="DIR", help="where to extract (default: .)"
    )
    parser.add_argument(
        "--max-size",
        type=int,
        metavar="BYTES",
        help="limit on the bytes of all files (default: the size of the image file or device)",
    )
    parser.add_argument(
        "--manifest-format",
        choices=manifest.DIALECTS,
        default=manifest.DEFAULT_DIALECT,
        help="obs (default): today's obs-build lines with inline mtimes (computeblocklists since "
        "2026-01); obs-2018: the lines without mtimes of obs-build 2018..2025 (Debian's package)",
    )
    return parser


@contextlib.contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """Turn the first stop signal into `Stopped` (so every `finally` cleans up); later ones are
    ignored, so that the cleanup itself is not interrupted."""

    def stop(signum: int, _frame: FrameType | None) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Stopped(f"stopped by {signal.Signals(signum).name}; nothing was extracted")

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(args: argparse.Namespace) -> None:
    if args.max_size is not None and args.max_size < 0:
        raise UsageError("--max-size must not be negative")
    extract_results(
        args.disk,
        sys.stdin.buffer if args.input is None else args.input,
        skip=args.skip,
        dest=args.dest,
        max_size=args.max_size,
        qcow2=args.qcow2,
        dialect=args.manifest_format,
        verbose=args.verbose,
    )


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
        with _stop_signals_raise():
            _run(args)
    except CloudbuildError as exc:
        sys.stdout.flush()
        print(f"cloudbuild extract: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except OSError as exc:  # the host's I/O (reading the disk, writing dest): retry elsewhere
        sys.stdout.flush()
        print(f"cloudbuild extract: {exc}", file=sys.stderr)
        return int(InfraError.exit_code)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
