"""Cloud policy written once for every cloud adapter: tags, leases, and the leak sweep (GC).

A cloud adapter (EC2 in `ec2.py`, OpenStack in `openstack.py`) is thin: it lists the resources
cloudbuild tagged, says whether a worker is still alive, stamps a resource as "seen", and deletes
one. The decisions live here, so every cloud sweeps the same way:

- A resource is *leaked* when its owner (the worker instance named by `cloudbuild:owner`) is gone
  or terminated, or when its lease (`cloudbuild:expires`, RFC 3339 UTC) has passed, or (when the
  sweep runs on the owner itself) when no process on this worker runs its build any more: a build
  holds an `fcntl` lock (`BuildLocks`) from before it creates anything until its cleanup, and the
  kernel drops the lock when the process dies, even by SIGKILL.
- A leaked resource is deleted only when it was seen leaked twice: the first sweep stamps it with
  `cloudbuild:gc-seen` = now, a later sweep at least `min_age` seconds after that deletes it
  (nodepool's rule: a resource created a moment ago may not be visible with all its tags yet, and
  a worker may be between "create" and "tag"; waiting one sweep avoids deleting under its feet).
- A resource that is no longer leaked (its lease was renewed) loses its stamp, so a later leak
  starts the count again.
- Untagged resources are never touched, whatever the adapter lists.

The adapter interface (`GcAdapter`) is the contract; `sweep()` is the policy.
"""

from __future__ import annotations

import abc
import datetime as dt
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from cloudbuild.log import get_logger
from cloudbuild.volume import TAG_BUILD, TAG_EXPIRES, TAG_GC_SEEN, TAG_OWNER, TAG_ROLE, TAG_SLOT

log = get_logger(__name__)

__all__ = [
    "DEFAULT_LEASE_MARGIN",
    "DEFAULT_MIN_AGE",
    "TAG_BUILD",
    "TAG_EXPIRES",
    "TAG_GC_SEEN",
    "TAG_OWNER",
    "TAG_POOL",
    "TAG_ROLE",
    "TAG_SLOT",
    "GcAdapter",
    "GcReport",
    "Resource",
    "build_tags",
    "format_time",
    "is_cloudbuild_tagged",
    "leak_reason",
    "lease_expiry",
    "parse_time",
    "sweep",
    "utcnow",
]

TAG_POOL = "cloudbuild:pool"
"""Marks a warm-pool builder; its value is the owning worker."""

DEFAULT_MIN_AGE = 300.0
"""Seconds between the sweep that first saw a leak and the one that may delete it."""

DEFAULT_LEASE_MARGIN = 2 * 3600.0
"""Seconds a lease runs past the build deadline (or past a day when the build has none)."""

_UNLIMITED_BUILD = 24 * 3600.0


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def format_time(when: dt.datetime) -> str:
    """RFC 3339 in UTC with a `Z`, whole seconds: `2026-11-25T18:45:44Z`."""
    if when.tzinfo is None:
        raise ValueError("a naive datetime has no time zone; use an aware one (UTC)")
    return when.astimezone(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> dt.datetime | None:
    """Parse an RFC 3339 time (any offset, `Z` or `+00:00`); None for missing or malformed text.

    Tags can be edited by anyone with access to the account, so a malformed value is not an
    error: the caller decides what "no time" means.
    """
    if not text or len(text) > 64:
        return None
    value = text.strip()
    if value[-1:] in ("Z", "z"):
        value = value[:-1] + "+00:00"
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.astimezone(dt.UTC)


def lease_expiry(
    build_timeout: float | None, *, now: dt.datetime | None = None, margin: float = DEFAULT_LEASE_MARGIN
) -> dt.datetime:
    """When the resources of a build become fair game for GC even if their worker still lives."""
    start = now or utcnow()
    seconds = (build_timeout if build_timeout is not None else _UNLIMITED_BUILD) + margin
    return start + dt.timedelta(seconds=seconds)


def build_tags(
    *,
    owner: str,
    build: str,
    slot: int,
    expires: dt.datetime,
    role: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The tags every cloud resource of a build carries."""
    tags = {
        TAG_OWNER: owner,
        TAG_BUILD: build,
        TAG_SLOT: str(slot),
        TAG_EXPIRES: format_time(expires),
    }
    if role is not None:
        tags[TAG_ROLE] = role
    if extra:
        tags.update(extra)
    return tags


def is_cloudbuild_tagged(tags: Mapping[str, str]) -> bool:
    """True when cloudbuild created the resource (it carries an owner or build tag)."""
    return TAG_OWNER in tags or TAG_BUILD in tags


@dataclass(frozen=True)
class Resource:
    """One cloud resource as an adapter lists it.

    `order`: the sweep deletes lower orders first (instances before the volumes attached to them,
    images before the snapshots they use). `kind` is for logs and reports ("volume", "instance", ...).
    """

    kind: str
    id: str
    tags: Mapping[str, str]
    order: int = 0

    @property
    def owner(self) -> str | None:
        return self.tags.get(TAG_OWNER) or None


class GcAdapter(abc.ABC):
    """What a cloud must provide for `sweep()`. Implementations stay thin: no policy in them.
    Every member `sweep()` reads is declared here; `build_alive` has a default."""

    @abc.abstractmethod
    def list_resources(self) -> Iterable[Resource]:
        """Every resource carrying cloudbuild's tags (volumes, machines, snapshots, images)."""
        ...

    @abc.abstractmethod
    def owner_alive(self, owner: str) -> bool:
        """True while the worker `owner` exists and is not terminated (stopped counts as alive)."""
        ...

    @abc.abstractmethod
    def tag_seen(self, resource: Resource, when: dt.datetime | None) -> None:
        """Set `cloudbuild:gc-seen` to `when` (RFC 3339), or remove it when `when` is None."""
        ...

    @abc.abstractmethod
    def delete_resource(self, resource: Resource) -> None:
        """Delete (terminate, deregister) the resource and wait until it no longer blocks others."""
        ...

    def build_alive(self, resource: Resource) -> bool | None:
        """Whether the build named by the resource still runs on its owner; None (the default):
        cannot tell here. Adapters answer it with `base.BuildLocks.alive` when the sweep runs on
        the owner itself, so a build whose process died is swept before its lease expires."""
        return None


def leak_reason(
    resource: Resource,
    *,
    now: dt.datetime,
    owner_alive: Callable[[str], bool],
    build_alive: Callable[[Resource], bool | None] | None = None,
) -> str | None:
    """Why the resource is leaked ("owner i-1 gone", "lease expired at ..."), or None when it is not."""
    expires_text = resource.tags.get(TAG_EXPIRES)
    expires = parse_time(expires_text)
    if expires is not None and expires <= now:
        return f"lease expired at {format_time(expires)}"
    owner = resource.owner
    if owner is None:
        if expires is None:
            # neither owner nor a valid lease: nobody can ever claim it
            return "no owner and no valid lease"
        return None
    if not owner_alive(owner):
        return f"owner {owner} is gone"
    if build_alive is not None and resource.tags.get(TAG_BUILD) and build_alive(resource) is False:
        return f"build {resource.tags[TAG_BUILD]} no longer runs on its worker {owner}"
    return None


@dataclass
class GcReport:
    """What one sweep did, by resource id."""

    marked: list[str] = field(default_factory=list)  # leaked, seen for the first time: stamped
    waiting: list[str] = field(default_factory=list)  # seen before, but not min_age ago
    deleted: list[str] = field(default_factory=list)
    would_delete: list[str] = field(default_factory=list)  # dry run
    failed: dict[str, str] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)  # not leaked
    ignored: list[str] = field(default_factory=list)  # untagged: never ours

    @property
    def ok(self) -> bool:
        return not self.failed


def sweep(
    adapter: GcAdapter,
    *,
    min_age: float = DEFAULT_MIN_AGE,
    dry_run: bool = False,
    now: dt.datetime | None = None,
) -> GcReport:
    """One GC pass over everything the adapter lists; see the module docstring for the rule."""
    if min_age < 0:
        raise ValueError("min_age must be 0 or more seconds")
    when = now or utcnow()
    report = GcReport()
    alive: dict[str, bool] = {}

    def owner_alive(owner: str) -> bool:
        if owner not in alive:
            alive[owner] = adapter.owner_alive(owner)
        return alive[owner]

    resources = sorted(adapter.list_resources(), key=lambda r: r.order)
    for resource in resources:
        rlog = log.bind(resource=resource.id, kind=resource.kind, dry_run=dry_run)
        if not is_cloudbuild_tagged(resource.tags):
            report.ignored.append(resource.id)
            rlog.debug("gc ignores untagged resource")
            continue
        reason = leak_reason(resource, now=when, owner_alive=owner_alive, build_alive=adapter.build_alive)
        seen_text = resource.tags.get(TAG_GC_SEEN)
        seen = parse_time(seen_text)
        if reason is None:
            report.kept.append(resource.id)
            if seen_text is not None:
                rlog.info("gc keeps resource, no longer leaked: clearing its mark")
                if not dry_run:
                    _guarded(report, resource, adapter.tag_seen, resource, None)
            else:
                rlog.debug("gc keeps resource")
            continue
        if seen is None:
            rlog.info("gc marks leaked resource (first sighting)", reason=reason)
            report.marked.append(resource.id)
            if not dry_run:
                _guarded(report, resource, adapter.tag_seen, resource, when)
            continue
        age = (when - seen).total_seconds()
        if age < min_age:
            rlog.info("gc waits: seen too recently", reason=reason, seen_ago=round(age, 1), min_age=min_age)
            report.waiting.append(resource.id)
            continue
        if dry_run:
            rlog.info("gc would delete leaked resource", reason=reason, seen_ago=round(age, 1))
            report.would_delete.append(resource.id)
            continue
        rlog.info("gc deletes leaked resource", reason=reason, seen_ago=round(age, 1))
        if _guarded(report, resource, adapter.delete_resource, resource):
            report.deleted.append(resource.id)
    log.info(
        "gc sweep done",
        dry_run=dry_run,
        marked=len(report.marked),
        waiting=len(report.waiting),
        deleted=len(report.deleted),
        would_delete=len(report.would_delete),
        failed=len(report.failed),
        kept=len(report.kept),
    )
    return report


def _guarded(report: GcReport, resource: Resource, action: Callable[..., None], *args: object) -> bool:
    """Run one adapter action; a failure is recorded and the sweep goes on with the next resource."""
    try:
        action(*args)
    except Exception as exc:
        log.error("gc action failed", resource=resource.id, kind=resource.kind, error=str(exc)[:300])
        report.failed[resource.id] = str(exc)[:300]
        return False
    return True
