"""`cloudbuild blocklist`: the command line of the guest-side manifest writer (obs-build's
computeblocklists); the work is `cloudbuild.disk.blocklist.write_manifest`.

The guest agent never imports this module (it calls `write_manifest` directly), so argparse stays
out of the agent's boot path.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from cloudbuild.commands.usage import UsageParser
from cloudbuild.disk import manifest
from cloudbuild.disk.blocklist import BlocklistError, write_manifest
from cloudbuild.errors import UsageError


def _warn(message: str) -> None:
    sys.stderr.write(f"blocklist: {message}\n")


def _read_names(stream: BinaryIO, sep: bytes) -> Iterator[bytes]:
    pending = b""
    while True:
        chunk = stream.read(1 << 16)
        if not chunk:
            break
        pending += chunk
        *names, pending = pending.split(sep)
        yield from names
    if pending:
        yield pending


def _parser() -> UsageParser:
    parser = UsageParser(
        prog="cloudbuild blocklist",
        description="Write the blocklist manifest of result files (obs-build's computeblocklists).",
    )
    parser.add_argument("--padstart", type=int, default=0, metavar="N", help="newlines before the manifest")
    parser.add_argument("--padend", type=int, default=0, metavar="N", help="newlines after the manifest")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="print each name on stderr")
    parser.add_argument("--manifest", metavar="FILE", help="read more names from FILE ('-': stdin)")
    parser.add_argument("-0", dest="null", action="store_true", help="names in --manifest end with NUL")
    parser.add_argument(
        "--format",
        choices=manifest.WRITE_FORMATS,
        default=manifest.DEFAULT_WRITE_FORMAT,
        help="obs: exactly today's computeblocklists' output (inline mtimes); obs+modes (default): "
        "plus a mode trailer that extractbuild ignores; obs-2018: exactly the 2018..2025 "
        "computeblocklists' output (no mtimes); obs-2018+meta: plus mtime and mode trailers; "
        "obs-2018+mtimes: plus the mtime trailer",
    )
    parser.add_argument("--fibmap", action="store_true", help="use FIBMAP instead of FIEMAP")
    parser.add_argument("files", nargs="*", metavar="FILE", help="names to list before those of --manifest")
    return parser


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except UsageError as exc:
        _warn(str(exc))
        return int(exc.exit_code)
    if args.padstart < 0 or args.padend < 0:
        _warn("--padstart/--padend must not be negative")
        return 1
    names: list[Iterable[bytes | str]] = [[os.fsencode(f) for f in args.files]]
    stream: BinaryIO | None = None
    if args.manifest:
        try:
            stream = sys.stdin.buffer if args.manifest == "-" else open(args.manifest, "rb")  # noqa: SIM115
        except OSError as exc:
            _warn(f"--manifest: {exc}")
            return 1
        names.append(_read_names(stream, b"\0" if args.null else b"\n"))
    # the whole manifest is built before anything is written: a failure writes nothing
    buf = io.BytesIO()
    try:
        write_manifest(
            (name for group in names for name in group),
            buf,
            padstart=args.padstart,
            padend=args.padend,
            verbose=args.verbose,
            fmt=args.format,
            use_fibmap=args.fibmap,
        )
    except (OSError, ValueError, BlocklistError) as exc:
        _warn(str(exc))
        return 1
    finally:
        if stream is not None and stream is not sys.stdin.buffer:
            stream.close()
    sys.stdout.buffer.write(buf.getvalue())
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
