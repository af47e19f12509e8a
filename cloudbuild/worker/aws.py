"""boto3 clients of the worker's AWS queue and store (SQS, S3), and their errors -> the protocols'.

Endpoints, region and credentials come from botocore's usual settings (`AWS_ENDPOINT_URL`,
`AWS_ENDPOINT_URL_SQS`, profiles, the instance role). botocore's own retries are off: an
unreachable or throttling service becomes `Unreachable`, which the supervisor retries through
cloudbuild.retry (one place, one policy, logged).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.config
from botocore.exceptions import ClientError, NoCredentialsError

from cloudbuild.cloud.ec2.api import error_code, transient
from cloudbuild.errors import InfraError
from cloudbuild.worker.protocols import Unreachable

_is_transient = transient("SlowDown", "RequestTimeout", "AWS.SimpleQueueService.ServiceUnavailable")


def client(service: str) -> Any:
    config = botocore.config.Config(
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        s3={"addressing_style": "auto"},
    )
    session: Any = boto3.Session()  # Any: the stubs overload client() per service literal
    return session.client(service, config=config)


def code(exc: BaseException) -> str:
    return error_code(exc)


def status_code(exc: ClientError) -> int:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return status if isinstance(status, int) else 0


@contextlib.contextmanager
def reaching(url: str, what: str) -> Iterator[None]:
    """Throttling, 5xx and connection failures of `what` -> Unreachable (retried by the caller)."""
    try:
        yield
    except NoCredentialsError as exc:
        raise InfraError(
            f"{url}: no AWS credentials (set AWS_PROFILE or AWS_ACCESS_KEY_ID, or give the instance a role)"
        ) from exc
    except Exception as exc:
        if _is_transient(exc):
            raise Unreachable(f"{url}: {what}: {exc}") from exc
        raise
