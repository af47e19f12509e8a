"""retry: transient failures are retried, logic errors never, waits end at their deadline."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from cloudbuild import retry
from cloudbuild.deadline import Deadline, PhaseExpired
from cloudbuild.errors import DeadlineExceeded, ExitCode, exit_code_for
from cloudbuild.retry import Policy, call_with_retries, retrying, wait_for


class Throttled(Exception):
    pass


class Broken(Exception):
    pass


def is_throttled(exc: BaseException) -> bool:
    return isinstance(exc, Throttled)


FAST = Policy(deadline=30.0, initial=0.5, maximum=4.0, attempts=5)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """Record the backoffs instead of sleeping them."""
    recorded: list[float] = []
    monkeypatch.setattr(retry, "_sleep", recorded.append)
    yield recorded


class Flaky:
    """Fails `failures` times with `error`, then returns `value`."""

    def __init__(self, failures: int, error: type[Exception] = Throttled, value: str = "done"):
        self.failures = failures
        self.error = error
        self.value = value
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error(f"failure {self.calls}")
        return self.value


def test_transient_failures_are_retried_until_success(sleeps: list[float]) -> None:
    flaky = Flaky(3)
    assert call_with_retries(flaky, is_transient=is_throttled, what="describe", policy=FAST) == "done"
    assert flaky.calls == 4
    assert len(sleeps) == 3
    assert all(0 < s <= FAST.maximum + 1 for s in sleeps)  # exponential with jitter, capped


def test_non_transient_failures_are_not_retried(sleeps: list[float]) -> None:
    flaky = Flaky(1, error=Broken)
    with pytest.raises(Broken, match="failure 1"):
        call_with_retries(flaky, is_transient=is_throttled, what="describe", policy=FAST)
    assert flaky.calls == 1
    assert sleeps == []


def test_retries_stop_after_the_attempts_and_raise_the_last_error(sleeps: list[float]) -> None:
    flaky = Flaky(100)
    with pytest.raises(Throttled, match="failure 5"):
        call_with_retries(flaky, is_transient=is_throttled, what="describe", policy=FAST)
    assert flaky.calls == FAST.attempts


def test_retries_stop_at_the_policy_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "_sleep", lambda s: time.sleep(0.01))
    flaky = Flaky(10**9)
    started = time.monotonic()
    with pytest.raises(Throttled):
        call_with_retries(
            flaky, is_transient=is_throttled, what="x", policy=Policy(deadline=0.2, attempts=10**6)
        )
    assert time.monotonic() - started < 5
    assert flaky.calls > 1


def test_a_retry_is_logged_with_its_attempt(sleeps: list[float]) -> None:
    with capture_logs() as logs:
        call_with_retries(Flaky(1), is_transient=is_throttled, what="attach vol-1", policy=FAST)
    assert logs == [
        {"logger": "cloudbuild.retry", "event": "retrying", "what": "attach vol-1", "attempt": 1,
         "error": "failure 1", "log_level": "warning"}
    ]  # fmt: skip


def test_retrying_decorator(sleeps: list[float]) -> None:
    flaky = Flaky(2)

    @retrying(is_transient=is_throttled, what="decorated", policy=FAST)
    def describe(prefix: str, *, suffix: str = "") -> str:
        """Doc."""
        return prefix + flaky() + suffix

    assert describe("<", suffix=">") == "<done>"
    assert flaky.calls == 3
    assert describe.__name__ == "describe"
    assert describe.__doc__ == "Doc."


def test_wait_for_returns_the_first_real_value(sleeps: list[float]) -> None:
    answers = iter([None, False, None, "/dev/nvme1n1"])
    assert wait_for(lambda: next(answers), what="device", timeout=60, interval=0.1) == "/dev/nvme1n1"
    assert len(sleeps) == 3


def test_wait_for_backs_off_up_to_the_cap(sleeps: list[float]) -> None:
    answers = iter([None] * 8 + [1])
    wait_for(lambda: next(answers), what="x", timeout=600, interval=1.0, max_interval=4.0)
    assert sleeps == pytest.approx([1.0, 1.5, 2.25, 3.375, 4.0, 4.0, 4.0, 4.0])


def test_wait_for_jitter_lengthens_each_interval_by_up_to_its_fraction(sleeps: list[float]) -> None:
    answers = iter([None] * 40 + [1])
    wait_for(lambda: next(answers), what="x", timeout=600, interval=1.0, max_interval=1.0, jitter=0.25)
    assert all(1.0 <= s <= 1.25 for s in sleeps) and len(set(sleeps)) > 1


def test_wait_for_without_a_cap_polls_at_the_interval(sleeps: list[float]) -> None:
    answers = iter([None] * 4 + [1])
    wait_for(lambda: next(answers), what="x", timeout=600, interval=0.5)
    assert sleeps == [0.5] * 4


def test_wait_for_raises_deadline_exceeded_naming_what_it_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "_sleep", lambda s: time.sleep(0.005))
    calls = 0

    def never() -> None:
        nonlocal calls
        calls += 1

    started = time.monotonic()
    with pytest.raises(
        DeadlineExceeded, match=r"^timed out after 0.2s waiting for vol-1 to become available$"
    ):
        wait_for(never, what="vol-1 to become available", timeout=0.2, interval=0.01)
    assert 0.2 <= time.monotonic() - started < 5
    assert calls > 1
    assert exit_code_for(DeadlineExceeded("x")) == ExitCode.INFRA


def test_wait_for_lets_a_probe_error_through(sleeps: list[float]) -> None:
    def probe() -> None:
        raise Broken("api says no")

    with pytest.raises(Broken, match="api says no"):
        wait_for(probe, what="x", timeout=60)
    assert sleeps == []


def test_wait_for_accepts_falsy_values_other_than_none_and_false(sleeps: list[float]) -> None:
    assert wait_for(lambda: 0, what="x", timeout=1) == 0
    assert wait_for(lambda: "", what="x", timeout=1) == ""
    assert sleeps == []


def test_wait_for_ends_by_the_phase_deadline_and_names_the_phase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "_sleep", lambda s: time.sleep(0.005))
    with pytest.raises(PhaseExpired) as info:
        wait_for(
            lambda: None,
            what="vol-1 to attach",
            timeout=600,
            interval=0.01,
            deadline=Deadline("prepare", 0.1),
        )
    assert (
        str(info.value) == "prepare took longer than its deadline of 0.1s (while waiting for vol-1 to attach)"
    )


def test_wait_for_under_a_roomy_deadline_ends_by_its_own_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "_sleep", lambda s: time.sleep(0.005))
    with pytest.raises(DeadlineExceeded) as info:
        wait_for(lambda: None, what="x", timeout=0.1, interval=0.01, deadline=Deadline("prepare", 600))
    assert not isinstance(info.value, PhaseExpired)
