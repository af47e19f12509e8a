"""The seen-twice leak sweep of cloudbuild.cloud.common, over an in-memory adapter."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

import pytest

from cloudbuild.cloud import common
from cloudbuild.cloud.common import (
    TAG_BUILD,
    TAG_EXPIRES,
    TAG_GC_SEEN,
    TAG_OWNER,
    GcAdapter,
    Resource,
    build_tags,
    format_time,
    leak_reason,
    parse_time,
    sweep,
)

NOW = dt.datetime(2026, 11, 25, 12, 0, 0, tzinfo=dt.UTC)


class MemoryCloud(GcAdapter):
    """A stateful fake cloud: resources with tags, a set of live workers; unknown ids fail loudly."""

    def __init__(self, live_owners: Iterable[str] = ()):
        self.resources: dict[str, Resource] = {}
        self.live = set(live_owners)
        self.deleted: list[str] = []
        self.fail_delete: set[str] = set()

    def add(self, rid: str, tags: dict[str, str], *, kind: str = "volume", order: int = 0) -> None:
        self.resources[rid] = Resource(kind, rid, dict(tags), order)

    def list_resources(self) -> Iterable[Resource]:
        return list(self.resources.values())

    def owner_alive(self, owner: str) -> bool:
        return owner in self.live

    def tag_seen(self, resource: Resource, when: dt.datetime | None) -> None:
        old = self.resources[resource.id]
        tags = dict(old.tags)
        if when is None:
            tags.pop(TAG_GC_SEEN, None)
        else:
            tags[TAG_GC_SEEN] = format_time(when)
        self.resources[resource.id] = Resource(old.kind, old.id, tags, old.order)

    def delete_resource(self, resource: Resource) -> None:
        if resource.id in self.fail_delete:
            raise RuntimeError(f"{resource.id} is in use")
        del self.resources[resource.id]
        self.deleted.append(resource.id)


def tags(owner: str = "i-dead", *, expires: dt.datetime | None = None) -> dict[str, str]:
    return build_tags(owner=owner, build="b1", slot=0, expires=expires or NOW + dt.timedelta(hours=1))


def test_rfc3339_round_trip_and_malformed_values():
    assert format_time(NOW) == "2026-11-25T12:00:00Z"
    assert parse_time("2026-11-25T12:00:00Z") == NOW
    assert parse_time("2026-11-25T13:00:00+01:00") == NOW
    for bad in (None, "", "yesterday", "2026-11-25T12:00:00", "9" * 100):
        assert parse_time(bad) is None
    with pytest.raises(ValueError):
        format_time(dt.datetime(2026, 1, 1))  # naive


def test_lease_runs_past_the_build_deadline():
    assert common.lease_expiry(600, now=NOW, margin=60) == NOW + dt.timedelta(seconds=660)
    assert common.lease_expiry(None, now=NOW, margin=0) == NOW + dt.timedelta(days=1)


def test_leak_reasons():
    alive = {"i-live"}.__contains__
    assert leak_reason(Resource("volume", "v", tags("i-live")), now=NOW, owner_alive=alive) is None
    assert "gone" in (leak_reason(Resource("volume", "v", tags("i-dead")), now=NOW, owner_alive=alive) or "")
    expired = tags("i-live", expires=NOW - dt.timedelta(seconds=1))
    assert "lease expired" in (
        leak_reason(Resource("volume", "v", expired), now=NOW, owner_alive=alive) or ""
    )


def test_first_sweep_marks_second_sweep_deletes_after_min_age():
    cloud = MemoryCloud(live_owners={"i-live"})
    cloud.add("vol-dead", tags("i-dead"))
    cloud.add("vol-live", tags("i-live"))
    first = sweep(cloud, min_age=300, now=NOW)
    assert first.marked == ["vol-dead"] and first.deleted == []
    assert cloud.resources["vol-dead"].tags[TAG_GC_SEEN] == "2026-11-25T12:00:00Z"
    too_soon = sweep(cloud, min_age=300, now=NOW + dt.timedelta(seconds=299))
    assert too_soon.waiting == ["vol-dead"] and cloud.deleted == []
    later = sweep(cloud, min_age=300, now=NOW + dt.timedelta(seconds=300))
    assert later.deleted == ["vol-dead"]
    assert set(cloud.resources) == {"vol-live"}


def test_min_age_zero_deletes_on_the_second_sweep_not_the_first():
    cloud = MemoryCloud()
    cloud.add("vol-1", tags())
    assert sweep(cloud, min_age=0, now=NOW).deleted == []
    assert sweep(cloud, min_age=0, now=NOW).deleted == ["vol-1"]


def test_untagged_resources_are_never_touched():
    cloud = MemoryCloud()
    cloud.add("vol-foreign", {"Name": "somebody else's"})
    for _ in range(3):
        report = sweep(cloud, min_age=0, now=NOW)
    assert report.ignored == ["vol-foreign"] and "vol-foreign" in cloud.resources
    assert TAG_GC_SEEN not in cloud.resources["vol-foreign"].tags


def test_dry_run_changes_nothing():
    cloud = MemoryCloud()
    cloud.add("vol-1", tags())
    report = sweep(cloud, min_age=0, dry_run=True, now=NOW)
    assert report.marked == ["vol-1"] and TAG_GC_SEEN not in cloud.resources["vol-1"].tags
    cloud.tag_seen(cloud.resources["vol-1"], NOW)
    report = sweep(cloud, min_age=0, dry_run=True, now=NOW)
    assert report.would_delete == ["vol-1"] and cloud.deleted == []


def test_renewed_lease_clears_the_mark_so_the_count_starts_again():
    cloud = MemoryCloud(live_owners={"i-live"})
    cloud.add("i-pool", tags("i-live", expires=NOW - dt.timedelta(seconds=1)), kind="instance")
    sweep(cloud, min_age=0, now=NOW)
    assert TAG_GC_SEEN in cloud.resources["i-pool"].tags
    renewed = dict(cloud.resources["i-pool"].tags, **{TAG_EXPIRES: format_time(NOW + dt.timedelta(hours=1))})
    cloud.add("i-pool", renewed, kind="instance")
    report = sweep(cloud, min_age=0, now=NOW)
    assert report.kept == ["i-pool"] and TAG_GC_SEEN not in cloud.resources["i-pool"].tags


def test_lower_order_is_deleted_first_and_failures_do_not_stop_the_sweep():
    cloud = MemoryCloud()
    cloud.add("vol-1", tags(), kind="volume", order=20)
    cloud.add("i-1", tags(), kind="instance", order=10)
    cloud.add("snap-1", tags(), kind="snapshot", order=30)
    cloud.fail_delete.add("vol-1")
    sweep(cloud, min_age=0, now=NOW)
    report = sweep(cloud, min_age=0, now=NOW)
    assert cloud.deleted == ["i-1", "snap-1"]
    assert set(report.failed) == {"vol-1"} and not report.ok


def test_build_only_tag_without_owner_or_lease_is_leaked():
    cloud = MemoryCloud()
    cloud.add("vol-1", {TAG_BUILD: "b1"})
    cloud.add("vol-2", {TAG_BUILD: "b2", TAG_EXPIRES: format_time(NOW + dt.timedelta(hours=1))})
    sweep(cloud, min_age=0, now=NOW)
    report = sweep(cloud, min_age=0, now=NOW)
    assert report.deleted == ["vol-1"] and report.kept == ["vol-2"]
    assert TAG_OWNER not in cloud.resources["vol-2"].tags


def test_negative_min_age_is_refused():
    with pytest.raises(ValueError):
        sweep(MemoryCloud(), min_age=-1)


class CannotTell(MemoryCloud):
    """A sweep away from the owner: whether the build still runs there is unknown (None)."""

    def __init__(self, live_owners: Iterable[str], answer: bool | None):
        super().__init__(live_owners)
        self.answer = answer

    def build_alive(self, resource: Resource) -> bool | None:
        return self.answer


@pytest.mark.parametrize(("answer", "swept"), [(None, False), (True, False), (False, True)])
def test_only_a_build_known_dead_on_a_live_owner_is_swept(answer: bool | None, swept: bool):
    cloud = CannotTell(["i-live"], answer)
    cloud.add("vol-1", tags("i-live"))
    for minute in (0, 10):
        sweep(cloud, min_age=0, now=NOW + dt.timedelta(minutes=minute))
    assert cloud.deleted == (["vol-1"] if swept else [])
