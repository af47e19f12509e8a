"""OpenStack plumbing shared by the volume, server and GC adapters: connection, errors, retries.

- `connect()`: openstacksdk's own configuration loading (clouds.yaml + `OS_CLOUD`, or `OS_*`
  variables), so a worker is configured exactly like the `openstack` CLI.
- `is_transient()`: what `cloudbuild.retry` may retry: 5xx (not 501), 429, connection resets and
  timeouts. Everything else is a real answer and is never retried.
- `Api.call()`: one cloud call, retried through `cloudbuild.retry` and translated into our
  errors: a quota refusal (403/413) is an `InfraError` (exit 3, "run it elsewhere / later").
- `worker_server_id()`: this worker's own server, from `--vm-server` or the metadata service.
- `AttachHealth`: counts volumes stuck in attaching/detaching on this worker (a small state
  file); the second one in a row makes the worker `HostBroken` (exit 4).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import keystoneauth1.exceptions as ksa_exc
import openstack
import openstack.connection
import openstack.exceptions as os_exc

from cloudbuild import __version__
from cloudbuild.errors import HostBroken, InfraError, UsageError
from cloudbuild.log import get_logger
from cloudbuild.retry import CLOUD_API, Policy, call_with_retries

log = get_logger(__name__)

T = TypeVar("T")

METADATA_URL_ENV = "CLOUDBUILD_OPENSTACK_METADATA_URL"
DEFAULT_METADATA_URL = "http://169.254.169.254"
METADATA_PATH = "/openstack/latest/meta_data.json"
STATE_DIR_ENV = "CLOUDBUILD_STATE_DIR"

# 501 is "not implemented": a logic error, as final as a 400
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
QUOTA_STATUS = frozenset({403, 413})

CONSOLE_API = Policy(deadline=30.0, initial=0.5, maximum=5.0, attempts=5)
"""The console is fetched again at the next poll anyway: never hold up the build's status for it."""


@dataclass(frozen=True)
class Timeouts:
    """Seconds each OpenStack wait may take; tests shrink them."""

    volume_ready: float = 600.0  # creating -> available
    attach: float = 300.0  # attaching -> in-use
    detach: float = 300.0  # detaching -> available
    device: float = 60.0  # in-use -> device node on this worker
    delete: float = 600.0  # volume or server gone
    poll: float = 2.0  # first poll interval of a state wait
    poll_max: float = 10.0  # interval cap of a state wait
    console: float = 5.0  # console poll interval while the build runs


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of an openstacksdk or keystoneauth error, None for anything else."""
    if isinstance(exc, os_exc.HttpException):
        status = exc.status_code
        return int(status) if status is not None else None
    if isinstance(exc, ksa_exc.HttpError):
        return int(exc.http_status) if exc.http_status is not None else None
    return None


def is_transient(exc: BaseException) -> bool:
    """True for failures worth repeating: server-side 5xx (not 501), throttling, resets, timeouts."""
    if isinstance(exc, ksa_exc.SSLError):
        return False  # a certificate problem does not go away by itself
    if isinstance(exc, ksa_exc.ConnectionError | ksa_exc.RetriableConnectionFailure):
        return True
    if isinstance(exc, ksa_exc.DiscoveryFailure):
        # version discovery that met a reset or a 5xx; keystoneauth words it as a discovery failure
        cause = exc.__cause__ or exc.__context__
        return cause is not None and cause is not exc and is_transient(cause)
    status = http_status(exc)
    return status in TRANSIENT_STATUS


def is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, os_exc.NotFoundException) or http_status(exc) == 404


def translate(exc: BaseException, what: str) -> Exception:
    """Our error for a failed cloud call (the caller raises it `from exc`)."""
    status = http_status(exc)
    detail = _detail(exc)
    if status in QUOTA_STATUS:
        return InfraError(f"{what}: the cloud refused it (HTTP {status}, quota or policy): {detail}")
    if is_transient(exc):
        return InfraError(f"{what}: the cloud API kept failing: {detail}")
    if isinstance(exc, ksa_exc.MissingRequiredOptions | ksa_exc.MissingAuthPlugin | ksa_exc.Unauthorized):
        return InfraError(
            f"{what}: OpenStack credentials missing or refused ({detail}); set OS_CLOUD and a "
            "clouds.yaml, or the OS_* variables (docs/openstack.md)"
        )
    if isinstance(exc, os_exc.ConfigException):
        return InfraError(f"{what}: OpenStack configuration: {detail} (docs/openstack.md)")
    return InfraError(f"{what}: {detail}")


def _detail(exc: BaseException) -> str:
    if isinstance(exc, os_exc.HttpException) and exc.details:
        return f"{exc.status_code}: {exc.details}"[:500]
    return (str(exc) or type(exc).__name__)[:500]


class Api:
    """An openstacksdk Connection whose every call is retried and translated the same way."""

    def __init__(
        self,
        conn: openstack.connection.Connection,
        *,
        policy: Policy = CLOUD_API,
        timeouts: Timeouts | None = None,
    ):
        self.conn = conn
        self.policy = policy
        self.timeouts = timeouts or Timeouts()

    def call(self, what: str, fn: Callable[[], T], *, policy: Policy | None = None) -> T:
        """Run `fn` (one API call), retrying transient failures; raise InfraError for the rest."""
        try:
            return call_with_retries(fn, is_transient=is_transient, what=what, policy=policy or self.policy)
        except (os_exc.SDKException, ksa_exc.ClientException) as exc:
            raise translate(exc, what) from exc

    def find(self, what: str, fn: Callable[[], T]) -> T | None:
        """Like `call`, but a 404 is an answer: None."""

        def attempt() -> T | None:
            try:
                return fn()
            except (os_exc.SDKException, ksa_exc.ClientException) as exc:
                if is_not_found(exc):
                    return None
                raise

        return self.call(what, attempt)

    def close(self) -> None:
        self.conn.close()


def connect(cloud: str | None = None) -> openstack.connection.Connection:
    """A Connection from clouds.yaml (`OS_CLOUD` or `cloud`) or the `OS_*` variables."""
    try:
        return openstack.connect(cloud=cloud, app_name="cloudbuild", app_version=__version__)
    except (os_exc.ConfigException, ksa_exc.ClientException) as exc:
        raise translate(exc, "OpenStack connection") from exc


def metadata_url() -> str:
    return os.environ.get(METADATA_URL_ENV, DEFAULT_METADATA_URL).rstrip("/") + METADATA_PATH


class _MetadataUnavailable(Exception):
    """The metadata service did not answer (yet); retried."""


def worker_server_id(explicit: str | None, *, url: str | None = None, timeout: float = 5.0) -> str:
    """This worker's server id: `--vm-server`, else `uuid` from the Nova metadata service."""
    if explicit:
        return explicit
    target = url or metadata_url()

    def fetch() -> str:
        try:
            with urllib.request.urlopen(target, timeout=timeout) as reply:
                doc: Any = json.loads(reply.read(65536))
        except urllib.error.HTTPError as exc:
            if exc.code >= 500:
                raise _MetadataUnavailable(f"HTTP {exc.code}") from exc
            raise InfraError(f"metadata service {target}: HTTP {exc.code}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise _MetadataUnavailable(str(exc)) from exc
        except ValueError as exc:
            raise InfraError(f"metadata service {target}: not JSON") from exc
        uuid = doc.get("uuid") if isinstance(doc, dict) else None
        if not isinstance(uuid, str) or not uuid or len(uuid) > 64:
            raise InfraError(f"metadata service {target}: no server uuid in meta_data.json")
        return uuid

    try:
        return call_with_retries(
            fetch,
            is_transient=lambda exc: isinstance(exc, _MetadataUnavailable),
            what="metadata service",
            policy=Policy(deadline=30.0, initial=0.2, maximum=2.0, attempts=8),
        )
    except _MetadataUnavailable as exc:
        raise UsageError(
            f"cannot find this worker's server id: metadata service {target} unreachable ({exc}); "
            f"pass --vm-server SERVER-ID or set {METADATA_URL_ENV}"
        ) from exc


def default_state_dir() -> Path:
    """Where per-worker state lives: $CLOUDBUILD_STATE_DIR, /var/lib/cloudbuild as root, else XDG."""
    explicit = os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(explicit)
    if os.geteuid() == 0:
        return Path("/var/lib/cloudbuild")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "cloudbuild"


class AttachHealth:
    """Counts stuck attach/detach operations of one worker, across builds (a small JSON file).

    One stuck volume is the cloud's problem: exit 3, retry the build elsewhere. The same worker
    failing again in a row is this worker's problem (a wedged hypervisor attachment, a full PCI
    bus): exit 4, take it out of the pool. A successful attach or detach clears the count.
    """

    LIMIT = 2

    def __init__(self, worker: str, state_dir: Path | None = None):
        self.worker = worker
        self.path = (state_dir or default_state_dir()) / f"openstack-attach-{_safe(worker)}.json"

    def count(self) -> int:
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return 0
        value = doc.get("stuck") if isinstance(doc, dict) and doc.get("worker") == self.worker else 0
        return value if isinstance(value, int) and value >= 0 else 0

    def _write(self, stuck: int) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"worker": self.worker, "stuck": stuck}))
            tmp.replace(self.path)
        except OSError as exc:  # state is advisory: never fail a build for it
            log.warning("cannot record attach health", path=str(self.path), error=str(exc))

    def ok(self) -> None:
        if self.count():
            self._write(0)

    def stuck(self, message: str) -> Exception:
        """Record one stuck operation; the error to raise (HostBroken when it repeats)."""
        stuck = self.count() + 1
        self._write(stuck)
        if stuck >= self.LIMIT:
            return HostBroken(
                f"{message}; {stuck} stuck volume operations in a row on worker {self.worker}: "
                f"take this worker out of service (state: {self.path})"
            )
        return InfraError(message)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
