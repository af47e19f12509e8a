"""What a fleet watches: Prometheus metrics (prometheus_client) and a health endpoint.

Both listen on 127.0.0.1 unless told otherwise; the metrics registry is per supervisor so tests
and several workers in one process never share counters.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

UNREACHABLE_LIMIT = 120.0  # seconds of unreachable queue/store before the worker reports unhealthy


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.jobs = Counter("cloudbuild_worker_jobs", "jobs finished, by outcome", ["outcome"], registry=r)
        self.phase_seconds = Histogram(
            "cloudbuild_worker_phase_seconds",
            "seconds per job phase (fetch, build, publish)",
            ["phase"],
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200),
            registry=r,
        )
        self.busy_slots = Gauge("cloudbuild_worker_busy_slots", "slots running a job", registry=r)
        self.queue_wait = Histogram(
            "cloudbuild_worker_queue_wait_seconds",
            "seconds from submit to claim",
            buckets=(0.1, 1, 5, 30, 60, 300, 900, 3600, 14400),
            registry=r,
        )
        self.lease_renewals = Counter(
            "cloudbuild_worker_lease_renewals", "lease renewals, by result", ["result"], registry=r
        )

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        prometheus_client.start_http_server(port, addr=host, registry=self.registry)


class Health:
    """Healthy until the host is declared broken (a build exited 4) or the queue/store stays unreachable."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.broken: str | None = None
        self._unreachable_since: float | None = None

    def host_broken(self, reason: str) -> None:
        with self._lock:
            self.broken = reason

    def reached(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self._unreachable_since = None
            elif self._unreachable_since is None:
                self._unreachable_since = time.monotonic()

    def problem(self) -> str | None:
        with self._lock:
            if self.broken:
                return f"host broken: {self.broken}"
            since = self._unreachable_since
        if since is not None and time.monotonic() - since > UNREACHABLE_LIMIT:
            return f"queue or store unreachable for {time.monotonic() - since:.0f}s"
        return None

    def serve(self, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                problem = health.problem()
                body = (problem or "ok").encode() + b"\n"
                self.send_response(503 if problem else 200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # the worker logs, not http.server
                pass

        server = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
        return server
