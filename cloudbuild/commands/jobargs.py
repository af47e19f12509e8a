"""What the job commands (worker, submit, status, results, logs) share: an argument parser whose
mistakes are usage errors (exit 1, one line), and the queue/store URL options."""

from __future__ import annotations

import argparse
from typing import NoReturn

from cloudbuild.errors import UsageError


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive number of seconds")
    return value


def positive_int(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive number")
    return int(text)


def parser(prog: str, description: str, *, queue: bool = False) -> Parser:
    p = Parser(
        prog=f"cloudbuild {prog}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if queue:
        p.add_argument("--queue", required=True, metavar="URL", help="the job queue (dir:///abs/path)")
    p.add_argument("--store", required=True, metavar="URL", help="the result store (dir:///abs/path)")
    return p
