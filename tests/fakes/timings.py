"""The one place for the short timings of tests: fakes answer at once, so a wait that runs out
here means the code is wrong, not that the cloud was slow. Real defaults stay in the package."""

from __future__ import annotations

import threading

import pytest

from cloudbuild import retry
from cloudbuild.cloud.ec2.api import Ec2Limits
from cloudbuild.cloud.openstack.api import Timeouts

EC2 = Ec2Limits(
    create=5.0,
    attach=5.0,
    detach=5.0,
    device=5.0,
    flip_grace=0.2,
    running=5.0,
    stop=5.0,
    terminate=5.0,
    poll=0.005,
    poll_max=0.02,
    console_poll_max=0.02,
    broken_after=3,
)
"""EC2 waits against moto (every transition is instant there)."""

OPENSTACK = Timeouts(
    volume_ready=10, attach=2, detach=2, device=2, delete=10, poll=0.01, poll_max=0.05, console=0.02
)
"""OpenStack deadlines and poll intervals against the fake: every wait of a test build ends within seconds."""

SDK_WAIT = {"interval": 0.01, "wait": 5}
"""openstacksdk's own `wait_for_*` against the fake: poll fast, the fake advances per GET, not per second."""

RETRY_SLEEP_CAP = 0.02
"""The longest backoff sleep `cloudbuild.retry` takes in a test (the retry logic itself is kept)."""


def cap_retry_sleeps(monkeypatch: pytest.MonkeyPatch, cap: float = RETRY_SLEEP_CAP) -> None:
    monkeypatch.setattr(retry, "_sleep", lambda seconds: threading.Event().wait(min(seconds, cap)))
