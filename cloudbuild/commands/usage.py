"""The command-line parser of the commands: a bad option is a usage error (exit 1, one line),
never argparse's exit 2, which cloudbuild's exit codes reserve for "unchanged"."""

from __future__ import annotations

import argparse
from typing import NoReturn

from cloudbuild.errors import UsageError


class UsageParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")
