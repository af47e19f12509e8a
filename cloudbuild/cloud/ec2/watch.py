"""VolumeWatch: what EC2 last said about the volumes of one worker, and one DescribeVolumes for all.

EC2 throttles DescribeVolumes per account and region (docs/scale.md), so a worker asks about its
volumes as seldom as it can:
- one call describes every volume somebody is waiting for or changed since its last answer (a
  build's root and swap are created, detached and attached together: both are answered by one
  call, the second wait reads the first one's answer);
- an answer stays usable until the next request that changes that volume (`changed`), so the
  state a volume was left in by our own finished wait is not asked for again;
- volumes are described by a `volume-id` filter, not `VolumeIds`: a volume that is gone (or not
  visible yet, right after its creation) is simply absent from the answer instead of failing
  the whole call for the others.

Answers carry a sequence number; a waiter passes the number of the answer it has seen and gets a
newer one (somebody else's or a fresh call), never the same one twice.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cloudbuild.cloud.ec2.api import Ec2Api


@dataclass(frozen=True)
class Answer:
    """EC2's description of one volume (None: not in the answer, i.e. gone or not visible yet)."""

    info: dict[str, Any] | None
    seq: int


class VolumeWatch:
    """Cached DescribeVolumes answers of one worker's volumes (thread-safe: slots share it)."""

    def __init__(self, api: Ec2Api):
        self.api = api
        self._lock = threading.Lock()
        self._seq = 0  # numbers answers and changes alike, in the order they happened
        self._answers: dict[str, Answer] = {}
        self._changed: dict[str, int] = {}
        self._waiting: dict[str, int] = {}  # volume id -> how many waits are on it

    def changed(self, volume_id: str) -> None:
        """A request that changes `volume_id` went out: answers from before it are stale."""
        with self._lock:
            self._seq += 1
            self._changed[volume_id] = self._seq

    def forget(self, volume_id: str) -> None:
        with self._lock:
            self._answers.pop(volume_id, None)
            self._changed.pop(volume_id, None)

    def _answer_seq(self, volume_id: str) -> int:
        answer = self._answers.get(volume_id)
        return answer.seq if answer is not None else -1

    def known(self, volume_id: str) -> Answer | None:
        """The latest answer about `volume_id` given after its last change; None: ask EC2."""
        with self._lock:
            answer = self._answers.get(volume_id)
            if answer is None or answer.seq < self._changed.get(volume_id, 0):
                return None
            return answer

    def current(self, volume_id: str, *, newer_than: int = -1) -> Answer:
        """An answer about `volume_id` given after its last change and after answer `newer_than`:
        a cached one when there is one, else one DescribeVolumes for it and every waited-for volume."""
        answer = self.known(volume_id)
        if answer is not None and answer.seq > newer_than:
            return answer
        return self.describe([volume_id])[volume_id]

    def describe(self, volume_ids: Iterable[str]) -> dict[str, Answer]:
        """One DescribeVolumes for `volume_ids` and every volume somebody waits for."""
        with self._lock:
            # besides: every volume waited for, and every volume changed since it was last
            # described (somebody is about to ask about it: a created volume, a detaching one)
            stale = {v for v, seq in self._changed.items() if seq > self._answer_seq(v)}
            wanted = sorted(set(volume_ids) | set(self._waiting) | stale)
        # a filter answers NotFound for nobody; kept eventual for a region that would
        result = self.api.must(
            "describe_volumes",
            Filters=[{"Name": "volume-id", "Values": wanted}],
            eventual=("InvalidVolume.NotFound",),
        )
        found = {str(v["VolumeId"]): dict(v) for v in result.get("Volumes", [])}
        with self._lock:
            self._seq += 1
            for volume_id in wanted:
                self._answers[volume_id] = Answer(found.get(volume_id), self._seq)
            return {volume_id: self._answers[volume_id] for volume_id in wanted}

    def waiting(self, volume_id: str) -> _Waiting:
        """Context: while inside, every describe of this worker includes `volume_id`."""
        return _Waiting(self, volume_id)

    def _wait(self, volume_id: str, delta: int) -> None:
        with self._lock:
            count = self._waiting.get(volume_id, 0) + delta
            if count > 0:
                self._waiting[volume_id] = count
            else:
                self._waiting.pop(volume_id, None)


class _Waiting:
    def __init__(self, watch: VolumeWatch, volume_id: str):
        self.watch = watch
        self.volume_id = volume_id

    def __enter__(self) -> None:
        self.watch._wait(self.volume_id, +1)

    def __exit__(self, *exc: object) -> None:
        self.watch._wait(self.volume_id, -1)
