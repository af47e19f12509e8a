"""OpenStack plumbing shared by the volume, server and GC adapters: connection, errors, retries.

- `connect()`: openstacksdk's own configuration loading (clouds.yaml + `OS_CLOUD`, or `OS_*`
  variables), so a worker is configured exactly like the `openstack` CLI.
- `is_transient()`: what `cloudbuild.retry` may retry: 5xx (not 501), 429, connection resets and
  timeouts. Everything else is a real answer and is never retried.
- `Api.call()`: one cloud call, retried through `cloudbuild.retry` and translated into our
  errors: a quota refusal (403/413) is an `InfraError` (exit 3, "run it elsewhere / later").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import keystoneauth1.exceptions as ksa_exc
import openstack
import openstack.connection
import openstack.exceptions as os_exc

from cloudbuild import __version__
from cloudbuild.errors import InfraError
from cloudbuild.log import get_logger
from cloudbuild.retry import CLOUD_API, Policy, call_with_retries

log = get_logger(__name__)

T = TypeVar("T")


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
