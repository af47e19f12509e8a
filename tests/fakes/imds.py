"""A fake EC2 instance metadata service (IMDSv2 only) on 127.0.0.1.

Stateful where the real one is: `PUT /latest/api/token` with a TTL header hands out a token, every
read needs a live token (401 without or with an expired one), IMDSv1 reads are refused. Unknown
paths are 404. `expire_tokens()` lets a test make the worker refresh its token.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeImds:
    def __init__(self, metadata: Mapping[str, str]):
        self.metadata = dict(metadata)
        self.tokens: set[str] = set()
        self.requests: list[tuple[str, str, int]] = []  # method, path, status
        self.fail_next: int = 0  # answer this many requests with 503 first
        self.user_data: str | None = None  # GET /latest/user-data (404 while None, as for an instance without)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/"

    def expire_tokens(self) -> None:
        self.tokens.clear()

    def start(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def _reply(self, status: int, body: str = "") -> None:
                fake.requests.append((self.command, self.path, status))
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:
                if fake.fail_next > 0:
                    fake.fail_next -= 1
                    return self._reply(503)
                if self.path != "/latest/api/token":
                    return self._reply(404)
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
                if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                    return self._reply(400)
                token = secrets.token_urlsafe(24)
                fake.tokens.add(token)
                return self._reply(200, token)

            def do_GET(self) -> None:
                if fake.fail_next > 0:
                    fake.fail_next -= 1
                    return self._reply(503)
                token = self.headers.get("X-aws-ec2-metadata-token")
                if token is None or token not in fake.tokens:
                    return self._reply(401)
                if self.path == "/latest/user-data":
                    return self._reply(404) if fake.user_data is None else self._reply(200, fake.user_data)
                prefix = "/latest/meta-data/"
                key = self.path[len(prefix) :] if self.path.startswith(prefix) else None
                if key is None or key not in fake.metadata:
                    return self._reply(404)
                return self._reply(200, fake.metadata[key])

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


@contextmanager
def running_imds(instance_id: str, zone: str, region: str) -> Iterator[FakeImds]:
    fake = FakeImds(
        {
            "instance-id": instance_id,
            "placement/availability-zone": zone,
            "placement/region": region,
        }
    )
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()
