"""Deadlines that phases pass down to every wait and every command they run."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from cloudbuild.errors import DeadlineExceeded


@dataclass
class Deadline:
    """A point in time by which `what` must be done; None seconds means no limit."""

    what: str
    seconds: float | None
    started: float = field(default_factory=time.monotonic)

    def remaining(self, *, floor: float = 0.0) -> float | None:
        """Seconds left (at least `floor`), or None when unlimited."""
        if self.seconds is None:
            return None
        return max(floor, self.started + self.seconds - time.monotonic())

    def expired(self) -> bool:
        return self.seconds is not None and time.monotonic() >= self.started + self.seconds

    def check(self) -> None:
        """Raise DeadlineExceeded when the deadline has passed."""
        if self.expired():
            raise DeadlineExceeded(f"{self.what} took longer than its deadline of {self.seconds:g}s")

    def elapsed(self) -> float:
        return time.monotonic() - self.started


class PhaseExpired(DeadlineExceeded):
    """A wait ended because its phase's deadline ran out, not its own limit: the thing waited
    for was slow within the phase, not stuck (no host health is charged for it)."""
