"""The EC2 API door of the ec2 backend: one client, one retry policy, one error mapping.

Every EC2 call goes through `Ec2Api.call`: throttling, 5xx and connection trouble are retried by
`cloudbuild.retry` (botocore's own retries are off), plus the eventual-consistency codes the
caller names for that call; everything else becomes an exit code (capacity and quota: 3, options
naming things that do not exist: 1). Also here: the settings one worker's volumes and backend
share (`Ec2Context`, `Ec2Limits`) and the attach-failure count that declares a host broken.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.session
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from cloudbuild.cloud.base import AttachHealth, state_dir
from cloudbuild.cloud.ec2.devices import HostPaths
from cloudbuild.cloud.ec2.identity import WorkerIdentity
from cloudbuild.cloud.ec2.watch import HostAnswers, VolumeWatch
from cloudbuild.errors import InfraError, UsageError
from cloudbuild.log import get_logger
from cloudbuild.retry import call_with_retries

log = get_logger(__name__)

# --- errors and the transient predicate -------------------------------------------------------

THROTTLING = frozenset(
    {
        "RequestLimitExceeded",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "Unavailable",
    }
)
"""Codes that mean "the API is busy": always worth another try."""

CAPACITY = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientVolumeCapacity",
        "InsufficientCapacity",
        "VolumeLimitExceeded",
        "InstanceLimitExceeded",
        "VcpuLimitExceeded",
        "MaxIOPSLimitExceeded",
        "SnapshotLimitExceeded",
    }
)
"""Out of capacity or quota here and now: exit 3, the job goes elsewhere (or later)."""

USAGE_PREFIXES = ("InvalidAMIID.", "InvalidSubnetID.", "InvalidGroup.", "InvalidKeyPair.")
"""The options name something that does not exist: running elsewhere fails the same way (exit 1)."""

NOT_FOUND = frozenset(
    {
        "InvalidVolume.NotFound",
        "InvalidInstanceID.NotFound",
        "InvalidSnapshot.NotFound",
        "InvalidAMIID.NotFound",
    }
)


def error_code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def transient(*eventual: str) -> Callable[[BaseException], bool]:
    """The retry predicate of one call: throttling and connection trouble always, plus the
    eventual-consistency codes that call may see (`InvalidVolume.NotFound` right after create,
    `IncorrectState` while attaching)."""
    codes = THROTTLING | frozenset(eventual)

    def is_transient(exc: BaseException) -> bool:
        if isinstance(exc, BotoConnectionError | HTTPClientError):
            return True
        if isinstance(exc, ClientError):
            if error_code(exc) in codes:
                return True
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return isinstance(status, int) and status >= 500
        return False

    return is_transient


class Ec2Error(InfraError):
    """An EC2 call failed for good; `code` is EC2's error code."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code


class Ec2UsageError(UsageError):
    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code


def translate(exc: ClientError, op: str) -> Ec2Error | Ec2UsageError:
    code = error_code(exc)
    message = str(exc.response.get("Error", {}).get("Message", "")) or str(exc)
    if code in CAPACITY:
        return Ec2Error(
            f"EC2 {op}: out of capacity or quota ({code}): {message}; retry later or elsewhere", code
        )
    if code.startswith(USAGE_PREFIXES):
        return Ec2UsageError(f"EC2 {op}: {code}: {message}; check the --ec2-* options", code)
    return Ec2Error(f"EC2 {op}: {code}: {message}", code)


class Ec2Api:
    """The EC2 client behind one retry/translate door. Botocore's own retries are off (see client())."""

    def __init__(self, client: Any):
        self.client = client

    def call(
        self,
        op: str,
        /,
        *,
        eventual: Collection[str] = (),
        missing_ok: Collection[str] = (),
        **params: Any,
    ) -> dict[str, Any] | None:
        """Call `op` (snake_case); None when it failed with a code in `missing_ok`."""
        fn = getattr(self.client, op)
        try:
            result: dict[str, Any] = call_with_retries(
                lambda: fn(**params), is_transient=transient(*eventual), what=f"EC2 {op}"
            )
            return result
        except ClientError as exc:
            if error_code(exc) in missing_ok:
                return None
            raise translate(exc, op) from exc
        except BotoCoreError as exc:
            raise Ec2Error(f"EC2 {op}: {exc}") from exc

    def must(self, op: str, /, **kwargs: Any) -> dict[str, Any]:
        result = self.call(op, **kwargs)
        assert result is not None  # no missing_ok given
        return result


def client(region: str | None = None, *, session: boto3.Session | None = None) -> Any:
    """An EC2 client that honours botocore's endpoint settings (`AWS_ENDPOINT_URL_EC2`, profiles)
    and leaves all retrying to cloudbuild.retry (one place, one policy, logged)."""
    config = botocore.config.Config(
        retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=10, read_timeout=60
    )
    s = session or boto3.Session()
    return s.client("ec2", region_name=region or s.region_name, config=config)


def ec2_tags(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def tag_dict(tags: Iterable[Mapping[str, str]] | None) -> dict[str, str]:
    return {t["Key"]: t.get("Value", "") for t in tags or ()}


# --- settings shared by the volumes and the backend of one worker -----------------------------


@dataclass(frozen=True)
class Ec2Limits:
    """Seconds every wait may take (tests shorten them)."""

    create: float = 300.0
    attach: float = 180.0
    detach: float = 180.0
    device: float = 60.0
    flip_grace: float = (
        10.0  # an attachment not seen after this long, with the volume available: flipped back
    )
    running: float = 600.0
    stop: float = 600.0
    terminate: float = 600.0
    poll: float = 1.0  # first poll interval of a wait; grows by half to poll_max
    poll_max: float = 10.0
    poll_jitter: float = 0.2  # each poll interval lengthened by up to this part of it (slots spread out)
    console_poll_max: float = 5.0  # while a build runs: how late a power-off is noticed, at most
    broken_after: int = 3  # attach failures in a row on this worker before it declares itself broken


@dataclass
class Ec2Context:
    """What every EbsVolume and the backend of one worker share."""

    api: Ec2Api
    identity: WorkerIdentity
    paths: HostPaths = field(default_factory=HostPaths)
    state_dir: Path = field(default_factory=lambda: state_dir("ec2"))
    limits: Ec2Limits = field(default_factory=Ec2Limits)
    watch: VolumeWatch = field(init=False)

    def __post_init__(self) -> None:
        # one answer file per worker host: its slots (processes) share every DescribeVolumes
        self.watch = VolumeWatch(self.api, HostAnswers(self.state_dir, self.identity.instance_id))

    @property
    def lock_file(self) -> Path:
        return self.state_dir / "devices.lock"

    @property
    def health(self) -> AttachHealth:
        return AttachHealth(self.identity.instance_id, self.state_dir, broken_after=self.limits.broken_after)
