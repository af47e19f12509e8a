"""`redis://HOST:PORT/STREAM` (and `rediss://`): a Redis Streams consumer group as the job queue.

- claim: first `XAUTOCLAIM` (min-idle = the lease) takes back a message whose holder stopped
  renewing; otherwise `XREADGROUP ... >` a new one. The consumer is the worker id.
- renew: `XCLAIM ... JUSTID` (resets the idle time without counting a delivery), in a script
  that first checks this worker still holds it: a lost lease raises LeaseLost, never steals back.
- attempts: the delivery count of `XPENDING`.
- release: the message is handed to no one with a huge idle time, so the next claimer's
  XAUTOCLAIM takes it at once (and counts the delivery).
- dead_letter: `XADD STREAM:dead`, then XACK; ack: XACK (+ XDEL), only after status.json is stored.
- sweep: what an earlier run of this worker id still holds (XPENDING by consumer) is released.

Redis rather than a broker such as RabbitMQ: a build may take hours, and a lease the worker
renews (and another worker reclaims when it stops) fits that; a broker-side consumer timeout
does not (docs/worker.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import redis

from cloudbuild.errors import UsageError
from cloudbuild.worker.protocols import Claim, LeaseLost, Unreachable

GROUP = "cloudbuild"
RELEASED = "-released-"  # the consumer a released message is parked under
IDLE_RELEASED = 10**12  # ms: any XAUTOCLAIM min-idle is exceeded at once

# renew: XCLAIM JUSTID only while KEYS[1]'s entry ARGV[1] is still pending for consumer ARGV[2]
_RENEW = """
local p = redis.call('XPENDING', KEYS[1], ARGV[3], ARGV[1], ARGV[1], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[3], ARGV[2], 0, ARGV[1], 'JUSTID')
return 1
"""


def parse(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    stream = parts.path.strip("/")
    if not parts.hostname or not stream or "/" in stream:
        raise UsageError(
            f"--queue {url}: a redis:// URL names a server and a stream (redis://HOST:PORT/STREAM)"
        )
    return f"{parts.scheme}://{parts.netloc}/0", stream


@contextlib.contextmanager
def _reaching(url: str, what: str) -> Iterator[None]:
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise Unreachable(f"{url}: {what}: {exc}") from exc


class RedisQueue:
    def __init__(self, url: str, client: Any | None = None):
        self.url = url
        server, self.stream = parse(url)
        self.dead_stream = f"{self.stream}:dead"
        self.redis: Any = client or redis.Redis.from_url(server, socket_timeout=30, socket_connect_timeout=10)
        self._renew = self.redis.register_script(_RENEW)
        with _reaching(url, "XGROUP CREATE"):
            try:
                self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def put(self, message_id: str, body: bytes) -> None:
        with _reaching(self.url, "XADD"):
            self.redis.xadd(self.stream, {"id": message_id, "body": body})

    def _claim_of(self, entry_id: bytes, fields: dict[bytes, bytes], owner: str) -> Claim:
        pending = self.redis.xpending_range(self.stream, GROUP, min=entry_id, max=entry_id, count=1)
        attempt = int(pending[0]["times_delivered"]) if pending else 1
        # the token names the entry and its consumer: a renewal checks the entry is still its own
        return Claim(fields[b"id"].decode(), attempt, fields[b"body"], f"{entry_id.decode()} {owner}")

    def claim(self, owner: str, lease: float) -> Claim | None:
        with _reaching(self.url, "XAUTOCLAIM/XREADGROUP"):
            _, taken, *_ = self.redis.xautoclaim(
                self.stream, GROUP, owner, min_idle_time=int(lease * 1000), start_id="0-0", count=1
            )
            for entry_id, fields in taken:
                if fields:  # an entry deleted meanwhile comes back without fields
                    return self._claim_of(entry_id, fields, owner)
            for _, entries in self.redis.xreadgroup(GROUP, owner, {self.stream: ">"}, count=1) or []:
                for entry_id, fields in entries:
                    return self._claim_of(entry_id, fields, owner)
        return None

    def renew(self, claim: Claim, lease: float) -> None:
        with _reaching(self.url, "XCLAIM JUSTID"):
            entry_id, owner = claim.token.split(" ", 1)
            held = self._renew(keys=[self.stream], args=[entry_id, owner, GROUP])
        if not held:
            raise LeaseLost(f"queue {self.url}: the lease on {claim.message_id} expired and was reclaimed")

    def ack(self, claim: Claim) -> None:
        with _reaching(self.url, "XACK"):
            entry_id = claim.token.split(" ", 1)[0]
            self.redis.xack(self.stream, GROUP, entry_id)
            self.redis.xdel(self.stream, entry_id)

    def release(self, claim: Claim) -> None:
        with _reaching(self.url, "XCLAIM IDLE"):
            self._park(claim.token.split(" ", 1)[0])

    def dead_letter(self, claim: Claim) -> None:
        with _reaching(self.url, "XADD dead"):
            self.redis.xadd(self.dead_stream, {"id": claim.message_id, "body": claim.body})
            self.ack(claim)

    def sweep(self, owner: str) -> list[str]:
        released = []
        with _reaching(self.url, "XPENDING"):
            for entry in self.redis.xpending_range(
                self.stream, GROUP, min="-", max="+", count=1000, consumername=owner
            ):
                entry_id = entry["message_id"]
                for _, fields in self.redis.xrange(self.stream, entry_id, entry_id):
                    released.append(fields[b"id"].decode())
                self._park(entry_id)
        return released

    def _park(self, entry_id: str | bytes) -> None:
        """Hand the entry to no one, idle for ages: the next XAUTOCLAIM takes it at once."""
        self.redis.xclaim(self.stream, GROUP, RELEASED, 0, [entry_id], idle=IDLE_RELEASED, justid=True)
