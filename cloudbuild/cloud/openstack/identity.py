"""This worker's own server id: `--vm-server`, else `uuid` from the Nova metadata service."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

from cloudbuild.errors import InfraError, UsageError
from cloudbuild.retry import Policy, call_with_retries

METADATA_URL_ENV = "CLOUDBUILD_OPENSTACK_METADATA_URL"
DEFAULT_METADATA_URL = "http://169.254.169.254"
METADATA_PATH = "/openstack/latest/meta_data.json"


def metadata_url() -> str:
    return os.environ.get(METADATA_URL_ENV, DEFAULT_METADATA_URL).rstrip("/") + METADATA_PATH


class _MetadataUnavailable(Exception):
    """The metadata service did not answer (yet); retried."""


def worker_server_id(
    explicit: str | None, *, url: str | None = None, timeout: float = 5.0, deadline: float = 30.0
) -> str:
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
            policy=Policy(deadline=deadline, initial=0.2, maximum=2.0, attempts=8),
        )
    except _MetadataUnavailable as exc:
        raise UsageError(
            f"cannot find this worker's server id: metadata service {target} unreachable ({exc}); "
            f"pass --vm-server SERVER-ID or set {METADATA_URL_ENV}"
        ) from exc
