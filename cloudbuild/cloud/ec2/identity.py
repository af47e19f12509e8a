"""Who this worker is, from the EC2 instance metadata service (IMDSv2 only).

The endpoint, mode, timeout and attempts follow botocore's own settings, so whatever points boto3's
credential provider at a metadata service points this at the same one:
`AWS_EC2_METADATA_SERVICE_ENDPOINT` / `ec2_metadata_service_endpoint` (profile),
`AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE` (IPv4 or IPv6), `AWS_METADATA_SERVICE_TIMEOUT`,
`AWS_METADATA_SERVICE_NUM_ATTEMPTS`. Tests point it at a fake on 127.0.0.1; production uses the
defaults (169.254.169.254).

IMDSv2: a session token from `PUT /latest/api/token`, sent as `X-aws-ec2-metadata-token` on every
read. A 401 means the token expired: fetch a new one once and read again.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass

import botocore.session

from cloudbuild.errors import InfraError
from cloudbuild.log import get_logger
from cloudbuild.retry import Policy, call_with_retries

log = get_logger(__name__)

DEFAULT_ENDPOINT_IPV4 = "http://169.254.169.254/"
DEFAULT_ENDPOINT_IPV6 = "http://[fd00:ec2::254]/"
TOKEN_TTL_SECONDS = 21600
TOKEN_PATH = "latest/api/token"


@dataclass(frozen=True)
class WorkerIdentity:
    instance_id: str
    availability_zone: str
    region: str


class ImdsError(InfraError):
    """The metadata service did not answer as an EC2 instance's would."""


class _Transient(Exception):
    """A metadata read that may succeed when tried again (connection refused, 5xx)."""


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, _Transient)


@dataclass(frozen=True)
class ImdsSettings:
    endpoint: str
    timeout: float
    attempts: int

    @classmethod
    def from_botocore(cls, session: botocore.session.Session | None = None) -> ImdsSettings:
        s = session or botocore.session.get_session()
        endpoint = s.get_config_variable("ec2_metadata_service_endpoint")
        if not endpoint:
            mode = str(s.get_config_variable("ec2_metadata_service_endpoint_mode") or "ipv4").lower()
            endpoint = DEFAULT_ENDPOINT_IPV6 if mode == "ipv6" else DEFAULT_ENDPOINT_IPV4
        if not str(endpoint).endswith("/"):
            endpoint = f"{endpoint}/"
        timeout = float(s.get_config_variable("metadata_service_timeout") or 1)
        attempts = int(s.get_config_variable("metadata_service_num_attempts") or 1)
        # one attempt is botocore's default for credentials; identity is needed, so try a few times
        return cls(str(endpoint), timeout, max(attempts, 3))


class Imds:
    """A small IMDSv2 client: token, then plain-text reads under /latest/meta-data/."""

    def __init__(self, settings: ImdsSettings | None = None):
        self.settings = settings or ImdsSettings.from_botocore()
        self._token: str | None = None

    def _request(self, method: str, path: str, headers: dict[str, str]) -> str:
        url = self.settings.endpoint + path
        request = urllib.request.Request(url, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout) as response:
                body: bytes = response.read(65536)
                return body.decode("utf-8", errors="replace")
        except urllib.error.HTTPError as exc:
            if exc.code >= 500:
                raise _Transient(f"{method} {url}: HTTP {exc.code}") from exc
            raise
        except (urllib.error.URLError, OSError) as exc:
            raise _Transient(f"{method} {url}: {exc}") from exc

    def _retrying(self, method: str, path: str, headers: dict[str, str]) -> str:
        policy = Policy(deadline=30.0, initial=0.2, maximum=2.0, attempts=self.settings.attempts)
        try:
            return call_with_retries(
                lambda: self._request(method, path, headers),
                is_transient=_is_transient,
                what=f"instance metadata {path}",
                policy=policy,
            )
        except _Transient as exc:
            raise ImdsError(
                f"the instance metadata service at {self.settings.endpoint} does not answer ({exc}): "
                "is this an EC2 instance with IMDS enabled (hop limit >= 1)?"
            ) from exc

    def token(self, *, refresh: bool = False) -> str:
        if self._token is None or refresh:
            try:
                self._token = self._retrying(
                    "PUT", TOKEN_PATH, {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_SECONDS)}
                ).strip()
            except urllib.error.HTTPError as exc:
                raise ImdsError(f"IMDSv2 token request refused: HTTP {exc.code}") from exc
            if not self._token:
                raise ImdsError("IMDSv2 returned an empty token")
        return self._token

    def get(self, path: str) -> str:
        """Read `latest/meta-data/<path>`; one token refresh on 401."""
        full = f"latest/meta-data/{path}"
        for refresh in (False, True):
            try:
                return self._retrying(
                    "GET", full, {"X-aws-ec2-metadata-token": self.token(refresh=refresh)}
                ).strip()
            except urllib.error.HTTPError as exc:
                if exc.code == 401 and not refresh:
                    log.info("IMDSv2 token rejected, fetching a new one")
                    continue
                raise ImdsError(f"instance metadata {path}: HTTP {exc.code}") from exc
        raise ImdsError(f"instance metadata {path}: token rejected twice")  # pragma: no cover

    def identity(self) -> WorkerIdentity:
        instance_id = self.get("instance-id")
        zone = self.get("placement/availability-zone")
        try:
            region = self.get("placement/region")
        except ImdsError:
            region = zone.rstrip("abcdefghijklmnopqrstuvwxyz") if zone else ""
        if not instance_id.startswith("i-") or not zone or not region:
            raise ImdsError(
                f"instance metadata gave instance id {instance_id!r}, zone {zone!r}, region {region!r}"
            )
        return WorkerIdentity(instance_id, zone, region)
