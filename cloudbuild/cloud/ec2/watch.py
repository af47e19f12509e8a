"""VolumeWatch: what EC2 last said about a worker's volumes, and one DescribeVolumes for all of them.

EC2 throttles DescribeVolumes per account and region (docs/scale.md), so a worker asks about its
volumes as seldom as it can:
- an answer stays usable until the next request that changes that volume (`changed`): the state
  a volume was left in by our own finished wait is not asked for again;
- one call answers every volume: with a host file (`HostAnswers`, what the worker's slots share,
  each slot being its own process) it is DescribeVolumes filtered by this worker's
  `cloudbuild:owner` tag, made under the host lock by whichever slot needs a newer answer first
  and read by all others, so N slots waiting cost one call per poll interval, not N; without one,
  a `volume-id` filter over the volumes asked about, waited for, or changed since last seen;
- filters, never `VolumeIds`: a volume that is gone (or not visible yet, right after its creation)
  is simply absent from the answer instead of failing the call for all the others.

Times are wall-clock seconds (the slots are separate processes): an answer is taken before its
call went out, a change after its request returned, so an answer newer than a change reflects it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloudbuild.cloud.base import host_lock
from cloudbuild.volume import TAG_OWNER

if TYPE_CHECKING:
    from cloudbuild.cloud.ec2.api import Ec2Api


@dataclass(frozen=True)
class Answer:
    """EC2's description of one volume (None: not in the answer, i.e. gone or not visible yet)."""

    info: dict[str, Any] | None
    taken: float


class HostAnswers:
    """The latest DescribeVolumes answer of one worker host, in a file its slots share."""

    def __init__(self, state_dir: Path, owner: str):
        self.path = state_dir / "volumes.json"
        self.lock = state_dir / "volumes.lock"
        self.owner = owner

    def read(self) -> tuple[float, dict[str, dict[str, Any]]]:
        """(when the answer was taken, volume id -> description); nothing yet: (0, {})."""
        try:
            data = json.loads(self.path.read_text())
            return float(data["taken"]), dict(data["volumes"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0.0, {}  # none yet, or torn by a crash: the next reader asks EC2

    def write(self, taken: float, volumes: dict[str, dict[str, Any]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"taken": taken, "volumes": volumes}, default=str))
        tmp.replace(self.path)


class VolumeWatch:
    """Cached DescribeVolumes answers of one worker's volumes (thread-safe)."""

    def __init__(self, api: Ec2Api, host: HostAnswers | None = None):
        self.api = api
        self.host = host
        self._lock = threading.Lock()
        self._answers: dict[str, Answer] = {}
        self._changed: dict[str, float] = {}
        self._waiting: dict[str, int] = {}  # volume id -> how many waits are on it

    def changed(self, volume_id: str) -> None:
        """A request that changed `volume_id` returned: answers taken before now are stale."""
        with self._lock:
            self._changed[volume_id] = time.time()

    def forget(self, volume_id: str) -> None:
        with self._lock:
            self._answers.pop(volume_id, None)
            self._changed.pop(volume_id, None)

    def known(self, volume_id: str) -> Answer | None:
        """The latest answer about `volume_id` taken after its last change; None: ask EC2."""
        with self._lock:
            answer = self._answers.get(volume_id)
            if answer is None or answer.taken <= self._changed.get(volume_id, 0.0):
                return None
            return answer

    def current(self, volume_id: str, *, newer_than: float = 0.0) -> Answer:
        """An answer about `volume_id` taken after its last change and after `newer_than`: one
        at hand (ours or, with a host file, another slot's), else one DescribeVolumes."""
        answer = self.known(volume_id)
        if answer is not None and answer.taken > newer_than:
            return answer
        if self.host is None:
            return self.describe([volume_id])[volume_id]
        with self._lock:
            need = max(newer_than, self._changed.get(volume_id, 0.0))
        with host_lock(self.host.lock):
            taken, volumes = self.host.read()
            if taken > need and volume_id in volumes:
                return self._store(taken, volumes, [volume_id])[volume_id]
            return self._describe_for_host([volume_id])[volume_id]

    def describe(self, volume_ids: Iterable[str]) -> dict[str, Answer]:
        """One DescribeVolumes (now) for `volume_ids` and every volume waited for or changed."""
        if self.host is not None:
            with host_lock(self.host.lock):
                return self._describe_for_host(list(volume_ids))
        with self._lock:
            stale = {v for v, at in self._changed.items() if at >= self._taken(v)}
            wanted = sorted(set(volume_ids) | set(self._waiting) | stale)
        taken = time.time()
        return self._store(taken, self._call([{"Name": "volume-id", "Values": wanted}]), wanted)

    def _describe_for_host(self, volume_ids: list[str]) -> dict[str, Answer]:
        """Under the host lock: every volume of this worker by its owner tag, plus the asked ones
        the tag does not cover (supplied volumes); the answer is left in the host file."""
        assert self.host is not None
        taken = time.time()
        volumes = self._call([{"Name": f"tag:{TAG_OWNER}", "Values": [self.host.owner]}])
        untagged = sorted(set(volume_ids) - set(volumes))
        if untagged:
            volumes.update(self._call([{"Name": "volume-id", "Values": untagged}]))
        self.host.write(taken, volumes)
        return self._store(taken, volumes, volume_ids)

    def _call(self, filters: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        # a filter answers NotFound for nobody; kept eventual for a region that would
        result = self.api.must("describe_volumes", Filters=filters, eventual=("InvalidVolume.NotFound",))
        return {str(v["VolumeId"]): dict(v) for v in result.get("Volumes", [])}

    def _store(
        self, taken: float, volumes: dict[str, dict[str, Any]], asked: Iterable[str]
    ) -> dict[str, Answer]:
        """Keep an answer: the volumes in it, and the asked ones absent from it (gone)."""
        with self._lock:
            for volume_id in {*volumes, *asked}:
                if self._taken(volume_id) < taken:
                    self._answers[volume_id] = Answer(volumes.get(volume_id), taken)
            return {volume_id: self._answers[volume_id] for volume_id in {*volumes, *asked}}

    def _taken(self, volume_id: str) -> float:
        answer = self._answers.get(volume_id)
        return answer.taken if answer is not None else -1.0

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
