"""Every retry and every wait in cloudbuild goes through here (tenacity underneath).

Two kinds of policy:
- `call_with_retries` / `retrying`: repeat a call that failed *transiently* (cloud throttling,
  eventual consistency, 5xx, connection resets). What counts as transient is a predicate the
  caller (a cloud adapter) supplies; logic errors are never retried.
- `wait_for`: poll a probe until it yields a value (a device node appears, a volume becomes
  `available`, an instance stops), with a deadline, and raise `DeadlineExceeded` naming what it
  waited for. There are no sleep loops anywhere else.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import tenacity

from cloudbuild.deadline import Deadline, PhaseExpired
from cloudbuild.errors import DeadlineExceeded
from cloudbuild.log import get_logger

log = get_logger(__name__)

T = TypeVar("T")
P = ParamSpec("P")


@dataclass(frozen=True)
class Policy:
    """How long and how often to retry a transient failure."""

    deadline: float = 120.0  # seconds, over all attempts
    initial: float = 0.5  # first backoff
    maximum: float = 10.0  # backoff cap
    attempts: int = 20


CLOUD_API = Policy(deadline=300.0, initial=0.5, maximum=15.0, attempts=30)
"""Throttling and eventual consistency of a cloud API."""

# Tests shrink the real sleeps; production never touches this.
_sleep: Callable[[float], None] = time.sleep


def _before_sleep(what: str) -> Callable[[tenacity.RetryCallState], None]:
    def hook(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("retrying", what=what, attempt=state.attempt_number, error=str(exc)[:300])

    return hook


def _backoff(policy: Policy) -> tenacity.wait.wait_base:
    """Exponential backoff with jitter from `policy.initial` up to `policy.maximum`."""
    try:
        return tenacity.wait_exponential_jitter(multiplier=policy.initial, max=policy.maximum)
    except TypeError:  # tenacity before `multiplier` existed: `initial` was the factor (deprecated since)
        return tenacity.wait_exponential_jitter(initial=policy.initial, max=policy.maximum)


def call_with_retries(
    fn: Callable[[], T],
    *,
    is_transient: Callable[[BaseException], bool],
    what: str,
    policy: Policy = CLOUD_API,
) -> T:
    """Call `fn`, retrying it while it raises an exception `is_transient` accepts."""
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_transient),
        stop=tenacity.stop_after_delay(policy.deadline) | tenacity.stop_after_attempt(policy.attempts),
        wait=_backoff(policy),
        sleep=lambda s: _sleep(s),
        before_sleep=_before_sleep(what),
        reraise=True,
    )
    return retrying(fn)


def retrying(
    *, is_transient: Callable[[BaseException], bool], what: str, policy: Policy = CLOUD_API
) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """Decorator form of `call_with_retries`."""

    def decorate(fn: Callable[P, T]) -> Callable[P, T]:
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            return call_with_retries(
                lambda: fn(*args, **kwargs), is_transient=is_transient, what=what, policy=policy
            )

        wrapper.__name__ = getattr(fn, "__name__", "wrapped")
        wrapper.__doc__ = fn.__doc__
        return wrapper

    return decorate


def wait_for(
    probe: Callable[[], T | None],
    *,
    what: str,
    timeout: float,
    interval: float = 1.0,
    max_interval: float | None = None,
    jitter: float = 0.0,
    deadline: Deadline | None = None,
) -> T:
    """Poll `probe` until it returns something other than None/False; raise DeadlineExceeded after `timeout`.

    The interval grows by half each poll up to `max_interval` (default: `interval`), so fast
    events are seen fast and slow ones don't hammer an API. `jitter` (a fraction) lengthens each
    interval by a random part of it, so the waits of many slots started together spread out
    instead of polling a throttled API in lockstep. A `deadline` (the phase's) cuts the wait
    short when it ends first: then `PhaseExpired` names the phase and what was waited for.
    """
    remaining = deadline.remaining() if deadline is not None else None
    phase_bound = remaining is not None and remaining < timeout
    if phase_bound:
        assert deadline is not None and remaining is not None
        timeout = remaining
    cap = max_interval if max_interval is not None else interval
    growing = tenacity.wait_exponential(
        multiplier=interval, exp_base=1.5, min=interval, max=max(cap, interval)
    )

    def spread(state: tenacity.RetryCallState) -> float:
        return float(growing(state)) * (1.0 + random.uniform(0.0, jitter))

    started = time.monotonic()
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_result(lambda value: value is None or value is False),
        stop=tenacity.stop_after_delay(timeout),
        wait=spread,
        sleep=lambda s: _sleep(s),
        reraise=True,
    )
    try:
        result = retrying(probe)
    except tenacity.RetryError as exc:
        if phase_bound and deadline is not None:
            raise PhaseExpired(
                f"{deadline.what} took longer than its deadline of {deadline.seconds:g}s"
                f" (while waiting for {what})"
            ) from exc
        raise DeadlineExceeded(f"timed out after {timeout:g}s waiting for {what}") from exc
    log.debug("waited", what=what, seconds=round(time.monotonic() - started, 3))
    return result  # type: ignore[return-value]
