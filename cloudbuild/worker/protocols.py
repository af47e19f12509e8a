"""What the supervisor needs from a queue and a store, and nothing more.

Shaped so that the embedded `dir://` pair, SQS + S3 and Redis Streams + Swift all fit:
- a queue delivers a message *at least once*; `claim` hands out a lease that `renew` extends
  (SQS: ChangeMessageVisibility; Redis: XCLAIM JUSTID; dir: a lease file with a deadline);
  an expired lease makes the message claimable again (SQS does that itself; Redis: XAUTOCLAIM;
  dir: any worker's `claim` reclaims it). `Claim.attempt` is the delivery count the queue keeps
  (SQS: ApproximateReceiveCount; Redis: the XPENDING delivery count).
- `ack` only after the result is stored; `release` gives the message back at once;
  `dead_letter` parks it for good (SQS's redrive policy may have done that already).
- a store publishes a result *once*: files under an attempt's own prefix, then `status.json`
  created only if absent (dir: link(2); S3: If-None-Match: *; Swift: a conditional PUT), so a
  duplicate delivery racing to the finish yields one visible result, never a mix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cloudbuild.errors import InfraError

T = TypeVar("T")


class Io(Protocol):
    """Calls a queue/store operation, retrying it while the queue or store is unreachable."""

    def __call__(self, fn: Callable[[], T], what: str) -> T: ...


class Unreachable(InfraError):
    """The queue or store cannot be reached now; worth retrying with backoff."""


class LeaseLost(InfraError):
    """This worker's claim on a job is gone (the lease expired and someone else may hold it)."""


@dataclass(frozen=True)
class Claim:
    """One delivery of one message to one worker."""

    message_id: str  # the job id for jobs `submit` queued; the queue's own name for anything else
    attempt: int  # deliveries so far, this one included (1 on the first)
    body: bytes
    token: str  # the queue's handle of this delivery (a folder, an SQS receipt handle, a stream id)


class Queue(Protocol):
    """A job queue with leases (at-least-once delivery)."""

    url: str

    def put(self, message_id: str, body: bytes) -> None:
        """Queue a message under `message_id` (refused if that id is already queued)."""

    def claim(self, owner: str, lease: float) -> Claim | None:
        """The next claimable message (expired leases included) leased to `owner`, or None."""

    def renew(self, claim: Claim, lease: float) -> None:
        """Extend the lease by `lease` seconds from now; raise LeaseLost when it is gone."""

    def ack(self, claim: Claim) -> None:
        """The job is done for good (its result is stored): remove the message."""

    def release(self, claim: Claim) -> None:
        """Give the message back at once for another worker (its next claim counts attempt + 1)."""

    def dead_letter(self, claim: Claim) -> None:
        """Park the message where no worker claims it again."""

    def sweep(self, owner: str) -> list[str]:
        """Release what an earlier run of `owner` still holds; the message ids released."""


class Store(Protocol):
    """Inputs (recipes, build roots), job states, live logs and published results."""

    url: str

    def put_input(self, source: Path) -> str:
        """Upload a file under a key naming its content digest; the key (existing content is kept)."""

    def has_input(self, key: str) -> bool: ...

    def get_input(self, key: str, dest: Path) -> None:
        """Download an input to `dest`, verifying its digest."""

    def set_state(self, job_id: str, state: Mapping[str, Any]) -> None:
        """Record a job's progress (queued, running attempt N); the last writer wins."""

    def state(self, job_id: str) -> dict[str, Any] | None: ...

    def append_log(self, job_id: str, attempt: int, part: int, data: bytes) -> None:
        """Store the `part`-th chunk of an attempt's live log (numbered parts: no append needed)."""

    def log_parts(self, job_id: str, attempt: int, first: int) -> list[bytes]:
        """The log chunks of an attempt from number `first` on, in order, up to the first gap."""

    def publish(
        self, job_id: str, attempt: int, files: Mapping[str, Path], status: Mapping[str, Any]
    ) -> bool:
        """Store `files` (store-relative name -> local file) then `status.json`, unless a result exists.

        True when this call published; False when another delivery's result was there first
        (this attempt's files are then removed again)."""

    def status(self, job_id: str) -> dict[str, Any] | None:
        """The published `status.json`, or None while there is none."""

    def fetch(self, job_id: str, name: str, dest: Path) -> None:
        """Copy one file of the published result to `dest`."""
