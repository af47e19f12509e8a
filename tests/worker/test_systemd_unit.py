"""The shipped systemd unit agrees with the worker: it drains on SIGTERM, systemd waits longer
than the drain, and a broken host (exit 4) or bad options (exit 1) are not restarted."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

from cloudbuild.errors import ExitCode

UNIT = Path(__file__).parents[2] / "packaging" / "cloudbuild-worker@.service"


def _unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_the_unit_drains_and_waits_longer_than_the_drain() -> None:
    service = _unit()["Service"]
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    drain = re.search(r"--drain-timeout (\d+)", service["ExecStart"])
    assert drain is not None, "ExecStart must pin --drain-timeout so TimeoutStopSec can exceed it"
    assert int(service["TimeoutStopSec"]) > int(drain.group(1))


def test_the_unit_restarts_on_failure_but_not_a_broken_host() -> None:
    service = _unit()["Service"]
    assert service["Restart"] == "on-failure"
    kept_down = {int(code) for code in service["RestartPreventExitStatus"].split()}
    assert kept_down == {int(ExitCode.HOST_BROKEN), int(ExitCode.BUILD_FAILED)}  # exit 4, and 1 = bad options
    assert int(ExitCode.INFRA) not in kept_down
