"""A small, stateful OpenStack cloud served over real HTTP, for tests.

The real openstacksdk talks to it over a socket on 127.0.0.1, so keystoneauth's version discovery,
microversion negotiation, token handling and retries all run for real. It speaks just enough of
Keystone v3, Nova 2.1, Cinder v3 and Glance v2 for cloudbuild's OpenStack backend, plus the Nova
metadata service (``/openstack/latest/meta_data.json``) that tells a worker its own server id.

How resources change state: every transitional status (volume ``creating``, ``attaching``,
``detaching``, ``deleting``; server ``BUILD``, ``powering-off``, ``powering-on``, ``deleting``,
``DELETED``) is seen by ``lag`` GETs of *that one resource* (``GET /servers/{id}``,
``GET /volumes/{id}``) and then advances one step. Lists never advance anything: poll the resource
itself (openstacksdk's ``wait_for_*`` do) or call ``settle()``. ``lag=0`` makes every transition
complete on the next GET.

Anything the fake does not know answers 501 naming the method and path and is kept in
``unknown_calls``; a crash inside the fake answers 500 and is kept in ``internal_errors``. The
pytest fixture fails the test if either list is not empty: the fake must never silently pretend
to support a call that it does not.

Quick start (see tests/cloud/openstack_fixtures.py for the pytest fixtures)::

    with FakeOpenStack() as fake:
        conn = openstack.connect(**fake.connect_kwargs())
        vol = conn.block_storage.create_volume(size=1)
        conn.block_storage.wait_for_status(vol, "available", interval=0.01, wait=5)
"""

from __future__ import annotations

import ast
import base64
import binascii
import contextlib
import functools
import hashlib
import json
import re
import socket
import struct
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

# Microversion ranges advertised by version discovery. openstacksdk negotiates
# min(its own max, ours), so Server calls run at NOVA_MAX and volume attachments at 2.89.
NOVA_MIN, NOVA_MAX = (2, 1), (2, 96)
CINDER_MIN, CINDER_MAX = (3, 0), (3, 71)

USERNAME = "cloudbuild"
PASSWORD = "s3cret"
PROJECT_NAME = "builds"
DOMAIN_NAME = "Default"
REGION = "RegionOne"

# Nova power_state values (nova/compute/power_state.py).
RUNNING, SHUTDOWN = 1, 4

Json = dict[str, Any]
# One step of a state machine; its return value is ignored.
Step = Callable[[], object]


def _now() -> datetime:
    return datetime.now(UTC)


def _nova_time(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _cinder_time(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f")


def _new_id() -> str:
    return str(uuid.uuid4())


class ApiError(Exception):
    """An error answer: the status and the body the real service would send."""

    def __init__(self, status: int, body: Json, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {body}")
        self.status = status
        self.body = body
        self.headers = headers or {}


def fault(status: int, message: str) -> ApiError:
    """A Nova/Cinder style fault: ``{"badRequest": {"code": 400, "message": ...}}``."""
    key = {
        400: "badRequest",
        403: "forbidden",
        404: "itemNotFound",
        406: "notAcceptable",
        409: "conflictingRequest",
        413: "overLimit",
        500: "computeFault",
        501: "notImplemented",
        503: "serviceUnavailable",
    }.get(status, "error")
    body: Json = {key: {"code": status, "message": message}}
    if status == 413:
        body[key]["retryAfter"] = "0"
    return ApiError(status, body)


def _keystone_error(status: int, title: str, message: str) -> ApiError:
    return ApiError(
        status,
        {"error": {"code": status, "title": title, "message": message}},
        {"WWW-Authenticate": 'Keystone uri="/"'} if status == 401 else {},
    )


class Call(NamedTuple):
    """One request as the fake saw it. ``status`` is None when the fault hook reset the connection."""

    method: str
    path: str
    status: int | None


class Unknown(NamedTuple):
    """A request the fake does not implement, and what exactly it lacked (an action, a filter...)."""

    method: str
    path: str
    detail: str


@dataclass
class Fault:
    """An injected failure for requests whose method and path (regex, ``re.search``) match."""

    method: str
    path: re.Pattern[str]
    times: int
    status: int = 503
    body: Json | None = None
    reset: bool = False
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return self.times > 0 and self.method in (method, "*") and bool(self.path.search(path))


@dataclass
class Quotas:
    """Project limits; exceeding them answers like the real services do (Nova 403, Cinder 413)."""

    instances: int = 10
    volumes: int = 10
    gigabytes: int = 1000


@dataclass(frozen=True)
class Flavor:
    id: str
    name: str
    vcpus: int
    ram: int
    disk: int


@dataclass(frozen=True)
class Image:
    id: str
    name: str


DEFAULT_FLAVORS = (
    Flavor("1", "m1.tiny", 1, 512, 1),
    Flavor("2", "m1.small", 1, 2048, 20),
    Flavor("3", "m1.medium", 2, 4096, 40),
    Flavor("4", "m1.large", 4, 8192, 80),
)


class Lifecycle:
    """Pending state-machine steps of one resource, advanced by GETs of that resource."""

    def __init__(self) -> None:
        self._steps: list[Step] = []
        self._seen = 0
        # States this resource may enter but not leave (the stick_* test hooks).
        self.stuck_in: set[str] = set()

    @property
    def state_labels(self) -> set[str]:
        """The names a test can stick this resource by (status, and task state where there is one)."""
        raise NotImplementedError

    def begin(self, *steps: Step) -> None:
        """Replace whatever was pending: a new action supersedes an old transition."""
        self._steps = list(steps)
        self._seen = 0

    def settle(self) -> None:
        """Run every pending step now (hooks that model things happening behind the API's back)."""
        while self._steps:
            self._steps.pop(0)()
        self._seen = 0

    def before_get(self, lag: int) -> None:
        if self._steps and self._seen >= lag and not self.state_labels & self.stuck_in:
            self._steps.pop(0)()
            self._seen = 0

    def after_get(self) -> None:
        self._seen += 1


@dataclass
class Bdm:
    """A Nova block device mapping: one volume attached to one server."""

    volume_id: str
    device: str
    boot_index: int | None
    delete_on_termination: bool
    tag: str | None = None
    attachment_id: str = field(default_factory=_new_id)
    bdm_id: str = field(default_factory=_new_id)


class FakeVolume(Lifecycle):
    def __init__(self, *, name: str, size: int, volume_type: str, availability_zone: str,
                 metadata: dict[str, str], description: str | None) -> None:
        super().__init__()
        self.id = _new_id()
        self.name = name
        self.size = size
        self.volume_type = volume_type
        self.availability_zone = availability_zone
        self.metadata = metadata
        self.description = description
        self.status = "creating"
        self.created_at = _now()
        self.updated_at = self.created_at
        # Cinder's view of the attachment; set when an attach completes (status in-use).
        self.attached_to: tuple[str, Bdm, datetime] | None = None
        self.fail_next_attach = False

    @property
    def state_labels(self) -> set[str]:
        return {self.status}

    def set_status(self, status: str) -> None:
        self.status = status
        self.updated_at = _now()


class FakeServer(Lifecycle):
    def __init__(self, *, name: str, flavor: Flavor, image: Image | None, availability_zone: str,
                 metadata: dict[str, str], user_data: bytes | None, networks: Any,
                 description: str | None, tags: list[str], key_name: str | None) -> None:
        super().__init__()
        self.id = _new_id()
        self.name = name
        self.flavor = flavor
        self.image = image
        self.availability_zone = availability_zone
        self.metadata = metadata
        self.user_data = user_data
        self.networks = networks
        self.description = description
        self.tags = tags
        self.key_name = key_name
        self.status = "BUILD"
        self.vm_state = "building"
        self.task_state: str | None = "scheduling"
        self.power_state = 0
        self.bdms: list[Bdm] = []
        self.console = ""
        self.fault: Json | None = None
        self.created = _now()
        self.updated = self.created
        self.launched_at: datetime | None = None

    @property
    def state_labels(self) -> set[str]:
        return {self.status, self.task_state} if self.task_state else {self.status}

    def set_state(self, status: str, vm_state: str, task_state: str | None, power_state: int) -> None:
        self.status, self.vm_state, self.task_state, self.power_state = (
            status, vm_state, task_state, power_state)
        self.updated = _now()

    def free_device(self) -> str:
        used = {b.device for b in self.bdms}
        if self.image is not None:  # booted from an image: its local root disk is vda
            used.add("/dev/vda")
        for letter in "abcdefghijklmnopqrstuvwxyz":
            if f"/dev/vd{letter}" not in used:
                return f"/dev/vd{letter}"
        raise fault(400, "fake: no free device names left")


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any
    microversion: tuple[int, int] | None = None

    def one(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


@dataclass
class Reply:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[..., Reply]


@dataclass
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    service: str | None = None  # "compute"/"volume": microversioned and token-checked
    public: bool = False  # no token needed (discovery, auth, metadata service)


class UnknownCall(Exception):
    """Raised inside the fake for a request it does not implement; answered with 501."""


def _parse_version(text: str) -> tuple[int, int]:
    major, _, minor = text.strip().partition(".")
    return int(major), int(minor or 0)


def _vstr(v: tuple[int, int]) -> str:
    return f"{v[0]}.{v[1]}"


class Cloud:
    """All state and the cross-service rules (a Nova attach changes a Cinder volume)."""

    def __init__(self, *, lag: int, quotas: Quotas, flavors: tuple[Flavor, ...], images: tuple[Image, ...],
                 availability_zones: tuple[str, ...], volume_types: tuple[str, ...]) -> None:
        self.lag = lag
        self.quotas = quotas
        self.flavors = flavors
        self.images = images
        self.availability_zones = availability_zones
        self.volume_types = volume_types
        self.servers: dict[str, FakeServer] = {}
        self.volumes: dict[str, FakeVolume] = {}
        self.project_id = uuid.uuid4().hex
        self.user_id = uuid.uuid4().hex
        # Observers of the moments a test may want to act on (see FakeOpenStack.on_*).
        self.on_volume_created: list[Callable[[FakeVolume], None]] = []
        self.on_attached: list[Callable[[FakeServer, FakeVolume, Bdm], None]] = []
        self.on_detached: list[Callable[[FakeServer, FakeVolume], None]] = []
        self.on_booted: list[Callable[[FakeServer], None]] = []

    # -- lookups -------------------------------------------------------------------------------
    def server(self, server_id: str) -> FakeServer:
        try:
            return self.servers[server_id]
        except KeyError:
            raise fault(404, f"Instance {server_id} could not be found.") from None

    def volume(self, volume_id: str) -> FakeVolume:
        try:
            return self.volumes[volume_id]
        except KeyError:
            raise fault(404, f"Volume {volume_id} could not be found.") from None

    # -- volumes -------------------------------------------------------------------------------
    def create_volume(self, *, name: str, size: int, volume_type: str, availability_zone: str,
                      metadata: dict[str, str], description: str | None) -> FakeVolume:
        if len(self.volumes) + 1 > self.quotas.volumes:
            raise fault(413, f"VolumeLimitExceeded: Maximum number of volumes allowed "
                             f"({self.quotas.volumes}) exceeded for quota 'volumes'.")
        used = sum(v.size for v in self.volumes.values())
        if used + size > self.quotas.gigabytes:
            raise fault(413, f"VolumeSizeExceedsAvailableQuota: Requested volume or snapshot exceeds "
                             f"allowed gigabytes quota. Requested {size}G, quota is "
                             f"{self.quotas.gigabytes}G and {used}G has been consumed.")
        vol = FakeVolume(name=name, size=size, volume_type=volume_type,
                         availability_zone=availability_zone, metadata=metadata, description=description)
        vol.begin(lambda: vol.set_status("available"))
        self.volumes[vol.id] = vol
        for observer in self.on_volume_created:
            observer(vol)
        return vol

    def delete_volume(self, vol: FakeVolume) -> None:
        if vol.status not in ("available", "error", "error_restoring", "error_extending") or vol.attached_to:
            raise fault(400, "Invalid volume: Volume status must be available or error or error_restoring "
                             "or error_extending or error_managing and must not be migrating, attached, "
                             f"belong to a group, have snapshots or be disassociated from snapshots after "
                             f"volume transfer. (volume {vol.id} is {vol.status})")
        vol.set_status("deleting")
        vol.begin(lambda: self.volumes.pop(vol.id, None))

    # -- attachments ---------------------------------------------------------------------------
    def _mark_attached(self, server: FakeServer, vol: FakeVolume, bdm: Bdm) -> None:
        vol.attached_to = (server.id, bdm, _now())
        vol.set_status("in-use")
        for observer in self.on_attached:
            observer(server, vol, bdm)

    def _mark_detached(self, server: FakeServer, vol: FakeVolume) -> None:
        server.bdms = [b for b in server.bdms if b.volume_id != vol.id]
        vol.attached_to = None
        vol.set_status("available")
        for observer in self.on_detached:
            observer(server, vol)

    def attach(self, server: FakeServer, vol: FakeVolume, *, tag: str | None,
               delete_on_termination: bool) -> Bdm:
        if server.vm_state not in ("active", "stopped") or server.task_state:
            raise fault(409, f"Cannot 'attach_volume' instance {server.id} while it is in vm_state "
                             f"{server.vm_state}")
        if any(b.volume_id == vol.id for b in server.bdms):
            raise fault(409, f"volume {vol.id} already attached")
        if vol.status != "available":
            raise fault(400, f"Invalid volume: volume {vol.id} status must be 'available', "
                             f"but it is '{vol.status}'")
        bdm = Bdm(vol.id, server.free_device(), None, delete_on_termination, tag)
        server.bdms.append(bdm)
        vol.set_status("attaching")
        if vol.fail_next_attach:
            # The hypervisor failed the attach and Nova rolled back: no BDM, volume available again.
            vol.fail_next_attach = False
            vol.begin(lambda: self._mark_detached(server, vol))
        else:
            vol.begin(lambda: self._mark_attached(server, vol, bdm))
        return bdm

    def detach(self, server: FakeServer, vol: FakeVolume) -> None:
        bdm = next((b for b in server.bdms if b.volume_id == vol.id), None)
        if bdm is None:
            raise fault(404, f"volume_id not found: {vol.id}")
        if bdm.boot_index == 0:
            raise fault(400, "Cannot detach a root device volume")
        if vol.status != "in-use":
            raise fault(400, f"Invalid volume: Unable to detach volume. Volume status must be 'in-use' "
                             f"and attach_status must be 'attached' to detach. (is '{vol.status}')")
        vol.set_status("detaching")
        vol.begin(lambda: self._mark_detached(server, vol))

    # -- servers -------------------------------------------------------------------------------
    def create_server(self, server: FakeServer, bdms: list[tuple[FakeVolume, Bdm]]) -> None:
        if len(self.servers) + 1 > self.quotas.instances:
            raise fault(403, f"Quota exceeded for instances: Requested 1, but already used "
                             f"{len(self.servers)} of {self.quotas.instances} instances")
        for vol, bdm in bdms:
            server.bdms.append(bdm)
            # Nova reserves and attaches boot volumes while building; the fake does it at once.
            self._mark_attached(server, vol, bdm)
        self.servers[server.id] = server
        server.begin(lambda: self._boot_done(server))

    def _boot_done(self, server: FakeServer) -> None:
        server.set_state("ACTIVE", "active", None, RUNNING)
        server.launched_at = _now()
        for observer in self.on_booted:
            observer(server)

    def stop(self, server: FakeServer) -> None:
        if server.vm_state != "active" or server.task_state:
            raise fault(409, f"Cannot 'stop' instance {server.id} while it is in vm_state "
                             f"{server.vm_state}")
        server.set_state("ACTIVE", "active", "powering-off", RUNNING)
        server.begin(lambda: server.set_state("SHUTOFF", "stopped", None, SHUTDOWN))

    def start(self, server: FakeServer) -> None:
        if server.vm_state != "stopped" or server.task_state:
            raise fault(409, f"Cannot 'start' instance {server.id} while it is in vm_state "
                             f"{server.vm_state}")
        server.set_state("SHUTOFF", "stopped", "powering-on", SHUTDOWN)
        server.begin(lambda: self._boot_done(server))  # a boot like the first: observers see it

    def delete_server(self, server: FakeServer) -> None:
        self._release_volumes(server, settle=False)
        server.set_state(server.status, server.vm_state, "deleting", server.power_state)
        server.begin(lambda: server.set_state("DELETED", "deleted", None, 0),
                     lambda: self.servers.pop(server.id, None))

    def _release_volumes(self, server: FakeServer, *, settle: bool) -> None:
        """What Nova does to a deleted server's volumes: detach them, or delete them if asked to."""
        for bdm in list(server.bdms):
            vol = self.volumes.get(bdm.volume_id)
            if vol is None:
                continue
            if bdm.delete_on_termination:
                vol.attached_to = None
                vol.set_status("deleting")
                vol.begin(functools.partial(self.volumes.pop, vol.id, None))
            else:
                vol.set_status("detaching")
                vol.begin(functools.partial(self._mark_detached, server, vol))
            if settle:
                vol.settle()
        server.bdms = []

    def vanish_server(self, server: FakeServer) -> None:
        self._release_volumes(server, settle=True)
        self.servers.pop(server.id, None)


# ---------------------------------------------------------------------------------------------
# The four APIs: each turns HTTP into calls on Cloud and Cloud objects back into API documents.
# ---------------------------------------------------------------------------------------------


class _Api:
    def __init__(self, cloud: Cloud, base_url: Callable[[], str]) -> None:
        self.cloud = cloud
        self.base_url = base_url

    def routes(self) -> list[Route]:
        raise NotImplementedError

    @staticmethod
    def body_of(req: Request, key: str) -> Json:
        if not isinstance(req.body, dict) or not isinstance(req.body.get(key), dict):
            raise fault(400, f"Malformed request body: expected a JSON object with key {key!r}")
        return dict(req.body[key])

    @staticmethod
    def check_keys(doc: Json, allowed: set[str], what: str) -> None:
        extra = sorted(set(doc) - allowed)
        if extra:
            raise fault(400, f"Invalid input for field/attribute {what}. Additional properties are not "
                             f"allowed ({', '.join(map(repr, extra))} were unexpected)")

    def page(self, req: Request, items: list[Any], key: str) -> tuple[list[Any], Json]:
        """``limit``/``marker`` paging with a ``{key}_links`` next link when the page is full,
        as Nova and Cinder do (openstacksdk follows the link and stops on a short page)."""
        if (marker := req.one("marker")) is not None:
            ids = [i.id for i in items]
            if marker not in ids:
                raise fault(400, f"marker [{marker}] not found")
            items = items[ids.index(marker) + 1:]
        raw_limit = req.one("limit")
        if raw_limit is None:
            return items, {}
        if not raw_limit.isdigit():
            raise fault(400, f"Invalid input for query parameters limit. Value: {raw_limit}")
        limit = int(raw_limit)
        page = items[:limit]
        if not page or len(page) < limit:
            return page, {}
        query = "&".join(f"{k}={v}" for k, vs in req.query.items() if k != "marker" for v in vs)
        href = f"{self.base_url()}{req.path}?{query}&marker={page[-1].id}"
        return page, {f"{key}_links": [{"rel": "next", "href": href}]}

    @staticmethod
    def metadata_of(value: Any, what: str) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and 0 < len(k) <= 255 and len(v) <= 255
                for k, v in value.items()):
            raise fault(400, f"Invalid input for field/attribute {what}: metadata must map strings of "
                             f"1-255 characters to strings of at most 255 characters, got {value!r}")
        return dict(value)


def _metadata_routes(prefix: str, service: str, lookup: Callable[[str], FakeServer | FakeVolume],
                     check: Callable[[Any, str], dict[str, str]]) -> list[Route]:
    """``/{id}/metadata`` and ``/{id}/metadata/{key}``, identical in Nova and Cinder."""

    def show(req: Request, rid: str) -> Reply:
        return Reply(200, {"metadata": lookup(rid).metadata})

    def merge(req: Request, rid: str) -> Reply:
        res = lookup(rid)
        res.metadata.update(check(_Api.body_of(req, "metadata") if req.body else {}, "metadata"))
        return Reply(200, {"metadata": res.metadata})

    def replace(req: Request, rid: str) -> Reply:
        res = lookup(rid)
        res.metadata = check(_Api.body_of(req, "metadata"), "metadata")
        return Reply(200, {"metadata": res.metadata})

    def show_item(req: Request, rid: str, key: str) -> Reply:
        res = lookup(rid)
        if key not in res.metadata:
            raise fault(404, f"Metadata item was not found: {key}")
        return Reply(200, {"meta": {key: res.metadata[key]}})

    def put_item(req: Request, rid: str, key: str) -> Reply:
        res = lookup(rid)
        item = check(_Api.body_of(req, "meta"), "meta")
        if list(item) != [key]:
            raise fault(400, "Request body and URI mismatch")
        res.metadata.update(item)
        return Reply(200, {"meta": item})

    def delete_item(req: Request, rid: str, key: str) -> Reply:
        res = lookup(rid)
        if res.metadata.pop(key, None) is None:
            raise fault(404, f"Metadata item was not found: {key}")
        return Reply(200 if service == "volume" else 204)

    base = rf"{prefix}/(?P<rid>[^/]+)/metadata"
    item = rf"{base}/(?P<key>[^/]+)"
    return [
        Route("GET", re.compile(base), show, service),
        Route("POST", re.compile(base), merge, service),
        Route("PUT", re.compile(base), replace, service),
        Route("GET", re.compile(item), show_item, service),
        Route("PUT", re.compile(item), put_item, service),
        Route("DELETE", re.compile(item), delete_item, service),
    ]


class KeystoneApi(_Api):
    """Identity v3: discovery and password authentication; tokens live in ``tokens``."""

    def __init__(self, cloud: Cloud, base_url: Callable[[], str]) -> None:
        super().__init__(cloud, base_url)
        self.tokens: set[str] = set()

    def routes(self) -> list[Route]:
        return [
            Route("GET", re.compile(r"/"), self.versions, public=True),
            Route("GET", re.compile(r"/v3"), self.version, public=True),
            Route("POST", re.compile(r"/v3/auth/tokens"), self.issue, public=True),
        ]

    def _v3(self) -> Json:
        return {
            "id": "v3.14",
            "status": "stable",
            "updated": "2020-04-07T00:00:00Z",
            "links": [{"rel": "self", "href": f"{self.base_url()}/v3/"}],
            "media-types": [{"base": "application/json",
                             "type": "application/vnd.openstack.identity-v3+json"}],
        }

    def versions(self, req: Request) -> Reply:
        return Reply(300, {"versions": {"values": [self._v3()]}})

    def version(self, req: Request) -> Reply:
        return Reply(200, {"version": self._v3()})

    def issue(self, req: Request) -> Reply:
        auth = _Api.body_of(req, "auth")
        identity = auth.get("identity") or {}
        if identity.get("methods") != ["password"]:
            raise _keystone_error(401, "Unauthorized", "fake Keystone: only password auth is supported")
        user = (identity.get("password") or {}).get("user") or {}
        project = ((auth.get("scope") or {}).get("project")) or {}
        user_ok = (user.get("name") == USERNAME or user.get("id") == self.cloud.user_id) \
            and user.get("password") == PASSWORD
        project_ok = project.get("name") == PROJECT_NAME or project.get("id") == self.cloud.project_id
        if not (user_ok and project_ok):
            raise _keystone_error(401, "Unauthorized", "The request you have made requires authentication.")
        token = uuid.uuid4().hex
        self.tokens.add(token)
        issued = _now()
        domain = {"id": "default", "name": DOMAIN_NAME}
        body = {"token": {
            "methods": ["password"],
            "user": {"id": self.cloud.user_id, "name": USERNAME, "domain": domain,
                     "password_expires_at": None},
            "project": {"id": self.cloud.project_id, "name": PROJECT_NAME, "domain": domain},
            "is_domain": False,
            "roles": [{"id": uuid.uuid4().hex, "name": "member"}, {"id": uuid.uuid4().hex, "name": "reader"}],
            "audit_ids": [base64.urlsafe_b64encode(uuid.uuid4().bytes)[:22].decode()],
            "issued_at": issued.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "expires_at": (issued + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "catalog": self.catalog(),
        }}
        return Reply(201, body, {"X-Subject-Token": token})

    def catalog(self) -> list[Json]:
        base = self.base_url()
        entries = [
            ("identity", "keystone", base),
            ("compute", "nova", f"{base}/compute/v2.1"),
            # Same endpoint under both names, as devstack registers it.
            ("block-storage", "cinder", f"{base}/volume/v3/{self.cloud.project_id}"),
            ("volumev3", "cinderv3", f"{base}/volume/v3/{self.cloud.project_id}"),
            ("image", "glance", f"{base}/image"),
        ]
        return [{
            "id": uuid.uuid5(uuid.NAMESPACE_URL, stype).hex,
            "type": stype,
            "name": name,
            "endpoints": [{"id": uuid.uuid5(uuid.NAMESPACE_URL, stype + iface).hex, "interface": iface,
                           "region": REGION, "region_id": REGION, "url": url}
                          for iface in ("public", "internal")],
        } for stype, name, url in entries]


class NovaApi(_Api):
    """Compute 2.1: servers, actions, metadata, volume attachments, flavors."""

    SERVER_KEYS: frozenset[str] = frozenset({
        "name", "flavorRef", "imageRef", "block_device_mapping_v2", "networks", "metadata", "user_data",
        "availability_zone", "key_name", "config_drive", "security_groups", "description", "tags",
        "min_count", "max_count", "adminPass", "accessIPv4", "accessIPv6", "hostname",
        "OS-DCF:diskConfig", "return_reservation_id",
    })
    LIST_FILTERS: frozenset[str] = frozenset({"name", "status", "availability_zone", "limit", "marker"})
    # Real Nova filters the fake does not implement: a loud 501 rather than a silently wrong list.
    UNSUPPORTED_FILTERS: frozenset[str] = frozenset({
        "changes-since", "changes-before", "flavor", "image", "ip", "ip6", "tags", "tags-any", "not-tags",
        "not-tags-any", "deleted", "all_tenants", "sort_key", "sort_dir", "host", "project_id", "user_id",
        "reservation_id", "locked", "config_drive", "key_name", "vm_state", "task_state", "power_state",
        "launched_at", "terminated_at", "uuid", "hostname", "description", "created_at", "updated_at",
    })

    def routes(self) -> list[Route]:
        s = r"/compute/v2\.1/servers/(?P<sid>[^/]+)"
        att = rf"{s}/os-volume_attachments"
        routes = [
            Route("GET", re.compile(r"/compute"), self.versions, public=True),
            Route("GET", re.compile(r"/compute/v2\.1"), self.version, public=True),
            Route("GET", re.compile(r"/compute/v2\.1/servers"), self.list_servers, "compute"),
            Route("GET", re.compile(r"/compute/v2\.1/servers/detail"), self.list_servers, "compute"),
            Route("POST", re.compile(r"/compute/v2\.1/servers"), self.create_server, "compute"),
            Route("GET", re.compile(s), self.show_server, "compute"),
            Route("DELETE", re.compile(s), self.delete_server, "compute"),
            Route("POST", re.compile(rf"{s}/action"), self.action, "compute"),
            Route("GET", re.compile(att), self.list_attachments, "compute"),
            Route("POST", re.compile(att), self.attach, "compute"),
            Route("GET", re.compile(rf"{att}/(?P<vid>[^/]+)"), self.show_attachment, "compute"),
            Route("DELETE", re.compile(rf"{att}/(?P<vid>[^/]+)"), self.detach, "compute"),
            Route("GET", re.compile(r"/compute/v2\.1/flavors"), self.list_flavors, "compute"),
            Route("GET", re.compile(r"/compute/v2\.1/flavors/detail"), self.list_flavors, "compute"),
            Route("GET", re.compile(r"/compute/v2\.1/flavors/(?P<fid>[^/]+)"), self.show_flavor, "compute"),
        ]
        return routes + _metadata_routes(r"/compute/v2\.1/servers", "compute",
                                         self._server_for_metadata, _Api.metadata_of)

    def _server_for_metadata(self, sid: str) -> FakeServer:
        return self.cloud.server(sid)

    # -- discovery -----------------------------------------------------------------------------
    def _v21(self) -> Json:
        return {
            "id": "v2.1",
            "status": "CURRENT",
            "version": _vstr(NOVA_MAX),
            "min_version": _vstr(NOVA_MIN),
            "updated": "2013-07-23T11:33:21Z",
            "links": [{"rel": "self", "href": f"{self.base_url()}/compute/v2.1/"}],
            "media-types": [{"base": "application/json",
                             "type": "application/vnd.openstack.compute+json;version=2.1"}],
        }

    def versions(self, req: Request) -> Reply:
        return Reply(200, {"versions": [self._v21()]})

    def version(self, req: Request) -> Reply:
        return Reply(200, {"version": self._v21()})

    # -- views ---------------------------------------------------------------------------------
    def _links(self, kind: str, rid: str) -> list[Json]:
        base = self.base_url()
        return [{"rel": "self", "href": f"{base}/compute/v2.1/{self.cloud.project_id}/{kind}/{rid}"},
                {"rel": "bookmark", "href": f"{base}/compute/{self.cloud.project_id}/{kind}/{rid}"}]

    def server_view(self, s: FakeServer, mv: tuple[int, int]) -> Json:
        if mv >= (2, 47):
            flavor: Json = {"vcpus": s.flavor.vcpus, "ram": s.flavor.ram, "disk": s.flavor.disk,
                            "ephemeral": 0, "swap": 0, "original_name": s.flavor.name, "extra_specs": {}}
        else:
            flavor = {"id": s.flavor.id, "links": self._links("flavors", s.flavor.id)}
        view: Json = {
            "id": s.id,
            "name": s.name,
            "status": s.status,
            "tenant_id": self.cloud.project_id,
            "user_id": self.cloud.user_id,
            "metadata": dict(s.metadata),
            "hostId": hashlib.sha224(f"{self.cloud.project_id}fake-host".encode()).hexdigest(),
            "image": {"id": s.image.id, "links": self._links("images", s.image.id)} if s.image else "",
            "flavor": flavor,
            "created": _nova_time(s.created),
            "updated": _nova_time(s.updated),
            "addresses": {},
            "accessIPv4": "",
            "accessIPv6": "",
            "links": self._links("servers", s.id),
            "OS-DCF:diskConfig": "MANUAL",
            "progress": 0,
            "OS-EXT-AZ:availability_zone": s.availability_zone if s.vm_state != "building" else "",
            "config_drive": "",
            "key_name": s.key_name,
            "OS-SRV-USG:launched_at": s.launched_at.strftime("%Y-%m-%dT%H:%M:%S.%f") if s.launched_at else None,
            "OS-SRV-USG:terminated_at": None,
            "OS-EXT-STS:task_state": s.task_state,
            "OS-EXT-STS:vm_state": s.vm_state,
            "OS-EXT-STS:power_state": s.power_state,
            "os-extended-volumes:volumes_attached": [
                {"id": b.volume_id, "delete_on_termination": b.delete_on_termination} for b in s.bdms],
            "security_groups": [{"name": "default"}],
            "locked": False,
            "description": s.description,
            "tags": list(s.tags),
            "trusted_image_certificates": None,
            "locked_reason": None,
        }
        if mv >= (2, 96):
            view["pinned_availability_zone"] = None
        if s.fault is not None:
            view["fault"] = s.fault
        return view

    def attachment_view(self, s: FakeServer, b: Bdm, mv: tuple[int, int]) -> Json:
        view: Json = {"device": b.device, "serverId": s.id, "volumeId": b.volume_id, "tag": b.tag,
                      "delete_on_termination": b.delete_on_termination}
        if mv >= (2, 89):
            view.update(attachment_id=b.attachment_id, bdm_uuid=b.bdm_id)
        else:
            view["id"] = b.volume_id
        return view

    def flavor_view(self, f: Flavor, detail: bool) -> Json:
        view: Json = {"id": f.id, "name": f.name, "links": self._links("flavors", f.id), "description": None}
        if detail:
            view.update({"vcpus": f.vcpus, "ram": f.ram, "disk": f.disk, "swap": 0,
                         "OS-FLV-EXT-DATA:ephemeral": 0, "OS-FLV-DISABLED:disabled": False,
                         "os-flavor-access:is_public": True, "rxtx_factor": 1.0, "extra_specs": {}})
        return view

    # -- servers -------------------------------------------------------------------------------
    def list_servers(self, req: Request) -> Reply:
        mv = req.microversion or NOVA_MIN
        unknown = set(req.query) - self.LIST_FILTERS - self.UNSUPPORTED_FILTERS
        if unknown:
            raise fault(400, f"Invalid input for query parameters: additional properties are not allowed "
                             f"({', '.join(sorted(unknown))})")
        unsupported = set(req.query) & self.UNSUPPORTED_FILTERS
        if unsupported:
            raise UnknownCall(f"server list filters {sorted(unsupported)}")
        servers = list(self.cloud.servers.values())
        if (name := req.one("name")) is not None:
            servers = [s for s in servers if re.search(name, s.name)]  # Nova's name filter is a regex
        if (status := req.one("status")) is not None:
            servers = [s for s in servers if s.status == status.upper()]
        if (az := req.one("availability_zone")) is not None:
            servers = [s for s in servers if s.availability_zone == az]
        servers, links = self.page(req, servers, "servers")
        if req.path.endswith("/detail"):
            return Reply(200, {"servers": [self.server_view(s, mv) for s in servers], **links})
        return Reply(200, {"servers": [{"id": s.id, "name": s.name, "links": self._links("servers", s.id)}
                                       for s in servers], **links})

    def show_server(self, req: Request, sid: str) -> Reply:
        s = self.cloud.server(sid)
        s.before_get(self.cloud.lag)
        if sid not in self.cloud.servers:  # the step just removed it
            raise fault(404, f"Instance {sid} could not be found.")
        s.after_get()
        return Reply(200, {"server": self.server_view(s, req.microversion or NOVA_MIN)})

    @staticmethod
    def _boot_order(entry: Json) -> int:
        """boot_index as an int; not bootable (None, -1, "none") sorts after every bootable one."""
        raw = entry.get("boot_index")
        try:
            index = int(raw) if raw not in (None, "none") else -1
        except (TypeError, ValueError):
            raise fault(400, f"Invalid input for field/attribute boot_index. Value: {raw!r}") from None
        return index if index >= 0 else 1000

    def _block_devices(self, raw: Any) -> list[tuple[FakeVolume, Bdm]]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise fault(400, "Invalid input for field/attribute block_device_mapping_v2.")
        result: list[tuple[FakeVolume, Bdm]] = []
        device_letters = iter("abcdefghijklmnopqrstuvwxyz")
        # Bootable entries first in boot order (so the boot volume is vda wherever it is listed),
        # then the rest in the order given, which is how the libvirt driver names them.
        for entry in sorted(raw, key=self._boot_order):
            if entry.get("source_type") != "volume" or entry.get("destination_type", "volume") != "volume":
                raise UnknownCall(f"block_device_mapping_v2 entry {entry} (fake supports only "
                                  "source_type=volume, destination_type=volume)")
            vid = entry.get("uuid")
            vol = self.cloud.volumes.get(vid or "")
            if vol is None:
                raise fault(400, f"Block Device Mapping is Invalid: failed to get volume {vid}.")
            if vol.status != "available":
                raise fault(400, f"Block Device Mapping is Invalid: volume {vid} status must be "
                                 f"'available', but it is '{vol.status}'")
            boot = self._boot_order(entry)
            result.append((vol, Bdm(vol.id, f"/dev/vd{next(device_letters)}", boot if boot < 1000 else None,
                                    bool(entry.get("delete_on_termination", False)), entry.get("tag"))))
        if len({v.id for v, _ in result}) != len(result):
            raise fault(400, "Block Device Mapping is Invalid: a volume is listed twice.")
        return result

    def create_server(self, req: Request) -> Reply:
        mv = req.microversion or NOVA_MIN
        doc = self.body_of(req, "server")
        self.check_keys(doc, set(self.SERVER_KEYS), "server")
        if not isinstance(doc.get("name"), str) or not doc["name"]:
            raise fault(400, "Invalid input for field/attribute name. 'name' is a required property")
        if int(doc.get("min_count", 1)) != 1 or int(doc.get("max_count", 1)) != 1:
            raise UnknownCall("multiple create (min_count/max_count > 1)")
        networks = doc.get("networks")
        if networks is None and mv >= (2, 37):
            raise fault(400, "Invalid input for field/attribute server. 'networks' is a required property")
        if isinstance(networks, list) and networks:
            raise UnknownCall(f"networks {networks!r} (fake has no Neutron; use 'none' or 'auto')")
        flavor = next((f for f in self.cloud.flavors if f.id == str(doc.get("flavorRef", ""))), None)
        if flavor is None:
            raise fault(400, f"Flavor {doc.get('flavorRef')} could not be found.")
        image = None
        if doc.get("imageRef"):
            image = next((i for i in self.cloud.images if i.id == doc["imageRef"]), None)
            if image is None:
                raise fault(400, f"Image {doc['imageRef']} could not be found.")
        bdms = self._block_devices(doc.get("block_device_mapping_v2"))
        if image is None and not any(b.boot_index == 0 for _, b in bdms):
            raise fault(400, "Block Device Mapping is Invalid: Boot sequence for the instance and image/block "
                             "device mapping combination is not valid.")
        az = doc.get("availability_zone") or self.cloud.availability_zones[0]
        if az not in self.cloud.availability_zones:
            raise fault(400, f"The requested availability zone is not available: {az}")
        user_data = None
        if doc.get("user_data") is not None:
            try:
                user_data = base64.b64decode(doc["user_data"], validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise fault(400, "Invalid input for field/attribute user_data. Value: "
                                 "not valid base64") from None
            if len(doc["user_data"]) > 65535:
                raise fault(400, "Invalid input for field/attribute user_data: longer than 65535")
        server = FakeServer(
            name=doc["name"], flavor=flavor, image=image, availability_zone=az,
            metadata=self.metadata_of(doc.get("metadata"), "metadata"), user_data=user_data,
            networks=networks, description=doc.get("description"), tags=list(doc.get("tags") or []),
            key_name=doc.get("key_name"))
        self.cloud.create_server(server, bdms)
        return Reply(202, {"server": {"id": server.id, "links": self._links("servers", server.id),
                                      "OS-DCF:diskConfig": "MANUAL", "adminPass": uuid.uuid4().hex[:12],
                                      "security_groups": [{"name": "default"}]}})

    def delete_server(self, req: Request, sid: str) -> Reply:
        s = self.cloud.server(sid)
        if s.status != "DELETED" and s.task_state != "deleting":
            self.cloud.delete_server(s)
        return Reply(204)

    def action(self, req: Request, sid: str) -> Reply:
        s = self.cloud.server(sid)
        if not isinstance(req.body, dict) or len(req.body) != 1:
            raise fault(400, "Malformed request body: expected exactly one action")
        (name, arg), = req.body.items()
        if name == "os-stop":
            self.cloud.stop(s)
            return Reply(202)
        if name == "os-start":
            self.cloud.start(s)
            return Reply(202)
        if name == "os-getConsoleOutput":
            length = (arg or {}).get("length")
            lines = s.console.splitlines(keepends=True)
            if length is not None:
                try:
                    n = int(length)
                except (TypeError, ValueError):
                    raise fault(400, f"Invalid input for field/attribute length. Value: {length}") from None
                if n >= 0:
                    lines = lines[-n:] if n else []
            return Reply(200, {"output": "".join(lines)})
        raise UnknownCall(f"server action {name!r}")

    # -- volume attachments --------------------------------------------------------------------
    def list_attachments(self, req: Request, sid: str) -> Reply:
        s = self.cloud.server(sid)
        mv = req.microversion or NOVA_MIN
        return Reply(200, {"volumeAttachments": [self.attachment_view(s, b, mv) for b in s.bdms]})

    def show_attachment(self, req: Request, sid: str, vid: str) -> Reply:
        s = self.cloud.server(sid)
        bdm = next((b for b in s.bdms if b.volume_id == vid), None)
        if bdm is None:
            raise fault(404, f"Instance {sid} is not attached to volume {vid}.")
        return Reply(200, {"volumeAttachment": self.attachment_view(s, bdm, req.microversion or NOVA_MIN)})

    def attach(self, req: Request, sid: str) -> Reply:
        s = self.cloud.server(sid)
        doc = self.body_of(req, "volumeAttachment")
        self.check_keys(doc, {"volumeId", "device", "tag", "delete_on_termination"}, "volumeAttachment")
        vol = self.cloud.volumes.get(str(doc.get("volumeId")))
        if vol is None:
            raise fault(404, f"Volume {doc.get('volumeId')} could not be found.")
        bdm = self.cloud.attach(s, vol, tag=doc.get("tag"),
                                delete_on_termination=bool(doc.get("delete_on_termination", False)))
        return Reply(200, {"volumeAttachment": self.attachment_view(s, bdm, req.microversion or NOVA_MIN)})

    def detach(self, req: Request, sid: str, vid: str) -> Reply:
        s = self.cloud.server(sid)
        self.cloud.detach(s, self.cloud.volume(vid))
        return Reply(202)

    # -- flavors -------------------------------------------------------------------------------
    def list_flavors(self, req: Request) -> Reply:
        detail = req.path.endswith("/detail")
        return Reply(200, {"flavors": [self.flavor_view(f, detail) for f in self.cloud.flavors]})

    def show_flavor(self, req: Request, fid: str) -> Reply:
        flavor = next((f for f in self.cloud.flavors if f.id == fid), None)
        if flavor is None:  # Nova looks flavors up by id only; find-by-name is the client's list+filter
            raise fault(404, f"Flavor {fid} could not be found.")
        return Reply(200, {"flavor": self.flavor_view(flavor, True)})


class CinderApi(_Api):
    """Block storage v3: volumes and their metadata."""

    CREATE_KEYS: frozenset[str] = frozenset({
        "size", "name", "description", "volume_type", "availability_zone", "metadata", "multiattach",
        "snapshot_id", "source_volid", "imageRef", "backup_id", "consistencygroup_id", "group_id",
        "display_name", "display_description",
    })
    UNSUPPORTED_CREATE: frozenset[str] = frozenset({
        "snapshot_id", "source_volid", "imageRef", "backup_id", "consistencygroup_id", "group_id"})
    LIST_FILTERS: frozenset[str] = frozenset({
        "name", "status", "metadata", "availability_zone", "limit", "marker", "sort", "sort_key", "sort_dir",
        "all_tenants", "project_id"})

    def routes(self) -> list[Route]:
        v = r"/volume/v3/(?P<pid>[^/]+)/volumes"
        return [
            Route("GET", re.compile(r"/volume"), self.versions, public=True),
            Route("GET", re.compile(r"/volume/v3"), self.version, public=True),
            Route("GET", re.compile(v), self.list_volumes, "volume"),
            Route("GET", re.compile(rf"{v}/detail"), self.list_volumes, "volume"),
            Route("POST", re.compile(v), self.create_volume, "volume"),
            Route("GET", re.compile(rf"{v}/(?P<vid>[^/]+)"), self.show_volume, "volume"),
            Route("PUT", re.compile(rf"{v}/(?P<vid>[^/]+)"), self.update_volume, "volume"),
            Route("DELETE", re.compile(rf"{v}/(?P<vid>[^/]+)"), self.delete_volume, "volume"),
            # The project segment comes first in the path but the metadata helper names only rid/key.
            *_metadata_routes(r"/volume/v3/[^/]+/volumes", "volume", self.cloud.volume, _Api.metadata_of),
        ]

    def _v3(self) -> Json:
        return {
            "id": "v3.0",
            "status": "CURRENT",
            "version": _vstr(CINDER_MAX),
            "min_version": _vstr(CINDER_MIN),
            "updated": "2023-08-31T00:00:00Z",
            "links": [{"rel": "self", "href": f"{self.base_url()}/volume/v3/"}],
            "media-types": [{"base": "application/json",
                             "type": "application/vnd.openstack.volume+json;version=3"}],
        }

    def versions(self, req: Request) -> Reply:
        return Reply(300, {"versions": [self._v3()]})

    def version(self, req: Request) -> Reply:
        return Reply(200, {"versions": [self._v3()]})

    def _check_project(self, pid: str) -> None:
        if pid != self.cloud.project_id:
            raise fault(403, f"fake Cinder: project {pid} in the URL is not the token's project")

    def volume_view(self, v: FakeVolume, mv: tuple[int, int]) -> Json:
        base = f"{self.base_url()}/volume/v3/{self.cloud.project_id}/volumes/{v.id}"
        attachments = []
        if v.attached_to is not None and v.status in ("in-use", "detaching"):
            sid, bdm, at = v.attached_to
            attachments.append({"id": v.id, "attachment_id": bdm.attachment_id, "volume_id": v.id,
                                "server_id": sid, "host_name": None, "device": bdm.device,
                                "attached_at": _cinder_time(at)})
        view: Json = {
            "id": v.id,
            "name": v.name,
            "description": v.description,
            "size": v.size,
            "status": v.status,
            "availability_zone": v.availability_zone,
            "volume_type": v.volume_type,
            "metadata": dict(v.metadata),
            "attachments": attachments,
            "bootable": "false",
            "encrypted": False,
            "multiattach": False,
            "snapshot_id": None,
            "source_volid": None,
            "consistencygroup_id": None,
            "replication_status": None,
            "user_id": self.cloud.user_id,
            "os-vol-tenant-attr:tenant_id": self.cloud.project_id,
            "created_at": _cinder_time(v.created_at),
            "updated_at": _cinder_time(v.updated_at),
            "links": [{"rel": "self", "href": base}, {"rel": "bookmark", "href": base}],
        }
        if mv >= (3, 13):
            view["group_id"] = None
        if mv >= (3, 48):
            view.update(shared_targets=False, service_uuid=None)
        if mv >= (3, 63):
            view["volume_type_id"] = uuid.uuid5(uuid.NAMESPACE_URL, v.volume_type).hex
        if mv >= (3, 65):
            view["consumes_quota"] = True
        return view

    def list_volumes(self, req: Request, pid: str) -> Reply:
        self._check_project(pid)
        mv = req.microversion or CINDER_MIN
        invalid = set(req.query) - self.LIST_FILTERS
        if invalid:
            raise fault(400, f"Invalid filter keys: {', '.join(sorted(invalid))}")
        if set(req.query) & {"sort", "sort_key", "sort_dir", "all_tenants", "project_id"}:
            raise UnknownCall(f"volume list parameters {sorted(req.query)}")
        vols = list(self.cloud.volumes.values())
        for key in ("name", "status", "availability_zone"):
            if (want := req.one(key)) is not None:
                vols = [v for v in vols if getattr(v, key) == want]
        if (raw := req.one("metadata")) is not None:
            wanted = self._metadata_filter(raw)
            vols = [v for v in vols if all(v.metadata.get(k) == val for k, val in wanted.items())]
        vols, links = self.page(req, vols, "volumes")
        if req.path.endswith("/detail"):
            return Reply(200, {"volumes": [self.volume_view(v, mv) for v in vols], **links})
        return Reply(200, {"volumes": [{"id": v.id, "name": v.name, "links": self.volume_view(v, mv)["links"]}
                                       for v in vols], **links})

    @staticmethod
    def _metadata_filter(raw: str) -> dict[str, str]:
        # Cinder evaluates the filter as a Python literal; JSON objects are valid literals too.
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = None
        if not isinstance(value, dict):
            raise fault(400, f"Invalid metadata filter {raw!r}: expected a dict literal such as "
                             "{'key': 'value'}")
        return {str(k): str(v) for k, v in value.items()}

    def create_volume(self, req: Request, pid: str) -> Reply:
        self._check_project(pid)
        doc = self.body_of(req, "volume")
        self.check_keys(doc, set(self.CREATE_KEYS), "volume")
        if used := sorted(k for k in self.UNSUPPORTED_CREATE if doc.get(k)):
            raise UnknownCall(f"volume create from {used}")
        size = doc.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise fault(400, f"Invalid input for field/attribute size. Value: {size!r}. "
                             "size must be an integer greater than 0")
        vtype = doc.get("volume_type") or self.cloud.volume_types[0]
        if vtype not in self.cloud.volume_types:
            raise fault(404, f"Volume type with name {vtype} could not be found.")
        az = doc.get("availability_zone") or self.cloud.availability_zones[0]
        if az not in self.cloud.availability_zones:
            raise fault(400, f"Invalid input received: Availability zone '{az}' is invalid.")
        vol = self.cloud.create_volume(
            name=doc.get("name") or doc.get("display_name") or "", size=size, volume_type=vtype,
            availability_zone=az, metadata=self.metadata_of(doc.get("metadata"), "metadata"),
            description=doc.get("description") or doc.get("display_description"))
        return Reply(202, {"volume": self.volume_view(vol, req.microversion or CINDER_MIN)})

    def show_volume(self, req: Request, pid: str, vid: str) -> Reply:
        self._check_project(pid)
        vol = self.cloud.volume(vid)
        vol.before_get(self.cloud.lag)
        if vid not in self.cloud.volumes:  # the step just deleted it
            raise fault(404, f"Volume {vid} could not be found.")
        vol.after_get()
        return Reply(200, {"volume": self.volume_view(vol, req.microversion or CINDER_MIN)})

    def update_volume(self, req: Request, pid: str, vid: str) -> Reply:
        self._check_project(pid)
        vol = self.cloud.volume(vid)
        doc = self.body_of(req, "volume")
        self.check_keys(doc, {"name", "description", "metadata"}, "volume")
        vol.name = doc.get("name", vol.name)
        vol.description = doc.get("description", vol.description)
        if "metadata" in doc:
            vol.metadata = self.metadata_of(doc["metadata"], "metadata")
        return Reply(200, {"volume": self.volume_view(vol, req.microversion or CINDER_MIN)})

    def delete_volume(self, req: Request, pid: str, vid: str) -> Reply:
        self._check_project(pid)
        vol = self.cloud.volume(vid)
        if vol.status != "deleting":
            self.cloud.delete_volume(vol)
        return Reply(202)


class GlanceApi(_Api):
    """Image v2, read only: enough to resolve an image by id or name."""

    def routes(self) -> list[Route]:
        return [
            Route("GET", re.compile(r"/image"), self.versions, public=True),
            Route("GET", re.compile(r"/image/v2/images"), self.list_images, "image"),
            Route("GET", re.compile(r"/image/v2/images/(?P<iid>[^/]+)"), self.show_image, "image"),
        ]

    def versions(self, req: Request) -> Reply:
        href = f"{self.base_url()}/image/v2/"
        return Reply(300, {"versions": [{"id": f"v2.{n}", "status": "CURRENT" if n == 16 else "SUPPORTED",
                                         "links": [{"rel": "self", "href": href}]} for n in (16, 15)]})

    def image_view(self, image: Image) -> Json:
        stamp = "2024-01-01T00:00:00Z"
        return {"id": image.id, "name": image.name, "status": "active", "visibility": "public",
                "disk_format": "qcow2", "container_format": "bare", "size": 21430272, "min_disk": 0,
                "min_ram": 0, "protected": False, "os_hidden": False, "tags": [], "checksum": None,
                "owner": self.cloud.project_id, "created_at": stamp, "updated_at": stamp,
                "self": f"/v2/images/{image.id}", "file": f"/v2/images/{image.id}/file",
                "schema": "/v2/schemas/image"}

    def list_images(self, req: Request) -> Reply:
        images = list(self.cloud.images)
        if (name := req.one("name")) is not None:
            images = [i for i in images if i.name == name]
        if set(req.query) - {"name", "limit", "marker", "sort_key", "sort_dir"}:
            raise UnknownCall(f"image list parameters {sorted(req.query)}")
        return Reply(200, {"images": [self.image_view(i) for i in images], "first": "/v2/images",
                           "schema": "/v2/schemas/images"})

    def show_image(self, req: Request, iid: str) -> Reply:
        image = next((i for i in self.cloud.images if i.id == iid), None)
        if image is None:
            raise ApiError(404, {"message": f"No image found with ID {iid}", "code": "404 Not Found",
                                 "title": "Not Found"})
        return Reply(200, self.image_view(image))


class MetadataApi(_Api):
    """The Nova metadata service as the worker's own server sees it (no token, as on 169.254.169.254)."""

    def __init__(self, cloud: Cloud, base_url: Callable[[], str], worker_id: Callable[[], str]) -> None:
        super().__init__(cloud, base_url)
        self.worker_id = worker_id

    def routes(self) -> list[Route]:
        return [Route("GET", re.compile(r"/openstack/latest/meta_data\.json"), self.meta_data, public=True)]

    def meta_data(self, req: Request) -> Reply:
        s = self.cloud.server(self.worker_id())
        return Reply(200, {"uuid": s.id, "name": s.name, "hostname": s.name, "launch_index": 0,
                           "availability_zone": s.availability_zone, "project_id": self.cloud.project_id,
                           "meta": dict(s.metadata), "devices": [], "keys": [], "public_keys": {}})


# ---------------------------------------------------------------------------------------------
# HTTP plumbing
# ---------------------------------------------------------------------------------------------


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeOpenStack

    def __init__(self, fake: FakeOpenStack) -> None:
        self.fake = fake
        self.open_sockets: set[socket.socket] = set()
        self.handler_threads: set[threading.Thread] = set()
        super().__init__(("127.0.0.1", 0), _RequestHandler)


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real services behind a proxy
    server: _HttpServer
    # Idle keep-alive connections give up after this long. stop() closes them anyway; a short value
    # would only make a slow test's client race the server closing its pooled connection.
    timeout = 60

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; with Nagle on, each answer would wait for the
        # client's delayed ACK (~40 ms) and a test making 50 calls would spend 2 s doing nothing.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.open_sockets.add(self.connection)
        self.server.handler_threads.add(threading.current_thread())

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self.server.open_sockets.discard(self.connection)
        self.server.handler_threads.discard(threading.current_thread())

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the fake keeps its own call log; stderr noise would only hide test output

    def _serve(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            # Unread chunks would be parsed as the next request; no OpenStack client sends them.
            self.close_connection = True
            self.send_error(501, "fake OpenStack: chunked request bodies are not supported")
            return
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        reply = self.server.fake.dispatch(self.command, self.path, dict(self.headers.items()), raw)
        if reply is None:  # injected connection reset: RST without a byte of answer
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            return
        payload = b"" if reply.body is None else json.dumps(reply.body).encode()
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if payload:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _serve


class FakeOpenStack:
    """A fake OpenStack cloud on ``http://127.0.0.1:<random port>``; use as a context manager.

    ``lag``: GETs of a resource that observe each transitional status before it advances.
    The worker's own server (``worker_server_id``) exists and is ACTIVE from the start; the
    metadata service at ``metadata_url`` names it.
    """

    def __init__(self, *, lag: int = 1, quotas: Quotas | None = None,
                 flavors: tuple[Flavor, ...] = DEFAULT_FLAVORS,
                 images: tuple[Image, ...] = (Image("7f2a4b4e-3c1d-4e55-9a0e-1f6b3e0c2d11", "cirros"),),
                 availability_zones: tuple[str, ...] = ("nova", "az2"),
                 volume_types: tuple[str, ...] = ("__DEFAULT__", "ssd")) -> None:
        self.cloud = Cloud(lag=lag, quotas=quotas or Quotas(), flavors=flavors, images=images,
                           availability_zones=availability_zones, volume_types=volume_types)
        self.calls: list[Call] = []
        self.unknown_calls: list[Unknown] = []
        self.internal_errors: list[str] = []  # tracebacks of bugs in the fake itself
        self.faults: list[Fault] = []
        self._lock = threading.RLock()
        self._http: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self.keystone = KeystoneApi(self.cloud, lambda: self.url)
        apis: list[_Api] = [
            self.keystone,
            NovaApi(self.cloud, lambda: self.url),
            CinderApi(self.cloud, lambda: self.url),
            GlanceApi(self.cloud, lambda: self.url),
            MetadataApi(self.cloud, lambda: self.url, lambda: self.worker_server_id),
        ]
        self._routes = [r for api in apis for r in api.routes()]
        worker = FakeServer(name="cloudbuild-worker", flavor=flavors[0], image=images[0] if images else None,
                            availability_zone=availability_zones[0], metadata={}, user_data=None,
                            networks="auto", description=None, tags=[], key_name=None)
        self.cloud._boot_done(worker)
        self.cloud.servers[worker.id] = worker
        self.worker_server_id = worker.id

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> FakeOpenStack:
        self._http = _HttpServer(self)
        # A short poll interval: shutdown() waits up to one interval, once per test.
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="fake-openstack", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._http is None:
            return
        self._http.shutdown()
        # Keep-alive connections would otherwise hold handler threads until their idle timeout.
        for sock in list(self._http.open_sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._http.server_close()
        for thread in list(self._http.handler_threads):
            thread.join(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._http = None
        self._thread = None

    def __enter__(self) -> FakeOpenStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- where it is ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._http is None:
            raise RuntimeError("FakeOpenStack is not started; use it as a context manager")
        host, port = self._http.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def auth_url(self) -> str:
        return f"{self.url}/v3"

    @property
    def metadata_url(self) -> str:
        """Base URL standing in for http://169.254.169.254 (append /openstack/latest/meta_data.json)."""
        return self.url

    @property
    def project_id(self) -> str:
        return self.cloud.project_id

    def connect_kwargs(self) -> dict[str, Any]:
        """Arguments for ``openstack.connect(**kwargs)``."""
        return {"auth_url": self.auth_url, "username": USERNAME, "password": PASSWORD,
                "project_name": PROJECT_NAME, "user_domain_name": DOMAIN_NAME,
                "project_domain_name": DOMAIN_NAME, "region_name": REGION}

    def os_environ(self) -> dict[str, str]:
        """OS_* variables for ``openstack.connect()`` without arguments or a clouds.yaml."""
        kw = self.connect_kwargs()
        return {"OS_AUTH_URL": kw["auth_url"], "OS_USERNAME": kw["username"], "OS_PASSWORD": kw["password"],
                "OS_PROJECT_NAME": kw["project_name"], "OS_USER_DOMAIN_NAME": kw["user_domain_name"],
                "OS_PROJECT_DOMAIN_NAME": kw["project_domain_name"], "OS_REGION_NAME": kw["region_name"],
                "OS_IDENTITY_API_VERSION": "3"}

    def clouds_yaml(self, cloud_name: str = "fake") -> Json:
        kw = self.connect_kwargs()
        auth = {k: kw[k] for k in ("auth_url", "username", "password", "project_name",
                                   "user_domain_name", "project_domain_name")}
        return {"clouds": {cloud_name: {"auth": auth, "region_name": REGION, "identity_api_version": 3,
                                        "interface": "public"}}}

    def write_clouds_yaml(self, path: Path, cloud_name: str = "fake") -> Path:
        # JSON is YAML; writing it this way needs no YAML library.
        path.write_text(json.dumps(self.clouds_yaml(cloud_name), indent=2))
        return path

    def token(self) -> str:
        """A valid token, for raw HTTP requests in tests."""
        with self._lock:
            token = uuid.uuid4().hex
            self.keystone.tokens.add(token)
            return token

    # -- request handling ----------------------------------------------------------------------
    def dispatch(self, method: str, target: str, headers: dict[str, str], raw: bytes) -> Reply | None:
        """Answer one request; None means "reset the connection"."""
        split = urlsplit(target)
        path = split.path.rstrip("/") or "/"
        with self._lock:
            injected = next((f for f in self.faults if f.matches(method, path)), None)
            if injected is not None:
                injected.times -= 1
                injected.hits += 1
                self.calls.append(Call(method, path, None if injected.reset else injected.status))
                if injected.reset:
                    return None
                return Reply(injected.status, injected.body or fault(injected.status, "injected fault").body)
            try:
                reply = self._route(method, path, split.query, headers, raw)
            except ApiError as err:
                reply = Reply(err.status, err.body, err.headers)
            except UnknownCall as err:
                reply = self._unknown(method, path, str(err))
            except Exception as err:  # a bug in the fake: answer and keep it rather than drop the socket
                self.internal_errors.append(traceback.format_exc())
                reply = Reply(500, fault(500, f"fake OpenStack crashed on {method} {path}: {err!r}").body)
            self.calls.append(Call(method, path, reply.status))
            reply.headers.setdefault("x-openstack-request-id", f"req-{uuid.uuid4()}")
            return reply

    def _unknown(self, method: str, path: str, what: str) -> Reply:
        self.unknown_calls.append(Unknown(method, path, what or "no such endpoint"))
        return Reply(501, {"notImplemented": {"code": 501,
                                              "message": f"fake OpenStack does not implement {method} {path}"
                                                         f"{': ' + what if what else ''}"}})

    def _route(self, method: str, path: str, query: str, headers: dict[str, str], raw: bytes) -> Reply:
        matches = [(r, m) for r in self._routes if (m := r.pattern.fullmatch(path))]
        route, match = next(((r, m) for r, m in matches if r.method == method), (None, None))
        if route is None or match is None:
            return self._unknown(method, path, "")
        lower = {k.lower(): v for k, v in headers.items()}
        if not route.public and lower.get("x-auth-token") not in self.keystone.tokens:
            raise _keystone_error(401, "Unauthorized", "The request you have made requires authentication.")
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            raise fault(400, "Malformed request body: not JSON") from None
        req = Request(method, path, parse_qs(query, keep_blank_values=True), lower, body)
        reply_headers: dict[str, str] = {}
        if route.service in ("compute", "volume"):
            req.microversion = self._microversion(route.service, lower)
            name = route.service
            reply_headers = {"OpenStack-API-Version": f"{name} {_vstr(req.microversion)}",
                             "Vary": "OpenStack-API-Version"}
            if name == "compute":
                reply_headers["X-OpenStack-Nova-API-Version"] = _vstr(req.microversion)
        reply = route.handler(req, **match.groupdict())
        reply.headers = reply_headers | reply.headers
        return reply

    @staticmethod
    def _microversion(service: str, headers: dict[str, str]) -> tuple[int, int]:
        low, high = (NOVA_MIN, NOVA_MAX) if service == "compute" else (CINDER_MIN, CINDER_MAX)
        names = {"compute"} if service == "compute" else {"volume", "block-storage"}
        requested: str | None = None
        for part in headers.get("openstack-api-version", "").split(","):
            svc, _, ver = part.strip().partition(" ")
            if svc in names:
                requested = ver
        if requested is None and service == "compute":
            requested = headers.get("x-openstack-nova-api-version")
        if requested is None:
            return low
        if requested.strip() == "latest":
            return high
        try:
            version = _parse_version(requested)
        except ValueError:
            raise fault(400, f"Invalid microversion {requested!r}") from None
        if not low <= version <= high:
            raise fault(406, f"Version {requested} is not supported by the API. Minimum is {_vstr(low)} "
                             f"and maximum is {_vstr(high)}.")
        return version

    # -- test hooks: faults --------------------------------------------------------------------
    def inject(self, method: str, path: str, *, status: int = 503, times: int = 1,
               body: Json | None = None) -> Fault:
        """Answer the next ``times`` matching requests with ``status`` (default body: a Nova fault).

        ``method`` is an HTTP method or "*"; ``path`` is a regex searched in the URL path (no query
        string, no trailing slash), e.g. ``r"/volume/v3/.*/volumes$"``. Faults apply before the
        token check, so the Keystone POST can be failed too. The earliest matching fault wins."""
        with self._lock:
            f = Fault(method.upper(), re.compile(path), times, status=status, body=body)
            self.faults.append(f)
            return f

    def inject_reset(self, method: str, path: str, *, times: int = 1) -> Fault:
        """Close the connection without answering the next ``times`` matching requests."""
        with self._lock:
            f = Fault(method.upper(), re.compile(path), times, reset=True)
            self.faults.append(f)
            return f

    def inject_quota(self, method: str, path: str, *, status: int = 403, times: int = 1) -> Fault:
        """A quota refusal as each service words it: Nova 403 ``forbidden`` / 413 ``overLimit``,
        Cinder (a ``/volume/`` path) 413 ``overLimit`` with ``VolumeLimitExceeded``."""
        if "/volume/" in path or path.startswith("/volume"):
            err = fault(413, "VolumeLimitExceeded: Maximum number of volumes allowed (10) exceeded "
                             "for quota 'volumes'.")
        elif status == 403:
            err = fault(403, "Quota exceeded for instances: Requested 1, but already used 10 of 10 instances")
        else:
            err = fault(413, "Quota exceeded for cores: Requested 2, but already used 20 of 20 cores")
        return self.inject(method, path, status=err.status, times=times, body=err.body)

    # -- test hooks: resources -----------------------------------------------------------------
    def server(self, server_id: str) -> FakeServer:
        with self._lock:
            return self.cloud.server(server_id)

    def volume(self, volume_id: str) -> FakeVolume:
        with self._lock:
            return self.cloud.volume(volume_id)

    def power_off(self, server_id: str, console: str = "") -> None:
        """The guest shut itself down (as a build VM does when it is finished): SHUTOFF at once."""
        with self._lock:
            s = self.cloud.server(server_id)
            s.console += console
            s.begin()
            s.set_state("SHUTOFF", "stopped", None, SHUTDOWN)

    def append_console(self, server_id: str, text: str) -> None:
        with self._lock:
            self.cloud.server(server_id).console += text

    def set_server_error(self, server_id: str, message: str = "No valid host was found.") -> None:
        with self._lock:
            s = self.cloud.server(server_id)
            s.begin()
            s.set_state("ERROR", "error", None, s.power_state)
            s.fault = {"code": 500, "message": message, "created": _nova_time(_now())}

    def vanish_server(self, server_id: str) -> None:
        """The server is gone (deleted behind our back): 404 from now on, its volumes available."""
        with self._lock:
            self.cloud.vanish_server(self.cloud.server(server_id))

    def stick_server(self, server_id: str, state: str) -> None:
        """The server will not leave ``state``: a status ("BUILD") or a task state ("powering-off",
        "deleting"), until released."""
        with self._lock:
            self.cloud.server(server_id).stuck_in.add(state)

    def release_server(self, server_id: str) -> None:
        with self._lock:
            self.cloud.server(server_id).stuck_in.clear()

    def stick_volume(self, volume_id: str, status: str) -> None:
        """The volume will not leave ``status`` (e.g. "attaching", "detaching") until released."""
        with self._lock:
            self.cloud.volume(volume_id).stuck_in.add(status)

    def release_volume(self, volume_id: str) -> None:
        with self._lock:
            self.cloud.volume(volume_id).stuck_in.clear()

    def fail_next_attach(self, volume_id: str) -> None:
        """The next attach of this volume goes attaching → available (Nova rolled back)."""
        with self._lock:
            self.cloud.volume(volume_id).fail_next_attach = True

    # -- test hooks: observers -----------------------------------------------------------------
    # Called with the fake's lock held, from the thread serving the request that caused the event
    # (or the hook's caller): keep them short, hand long work (a guest "running") to a thread.
    def on_volume_created(self, observer: Callable[[FakeVolume], None]) -> None:
        """``observer(volume)`` after each volume is created (status still ``creating``)."""
        self.cloud.on_volume_created.append(observer)

    def on_attached(self, observer: Callable[[FakeServer, FakeVolume, Bdm], None]) -> None:
        """``observer(server, volume, bdm)`` when a volume becomes ``in-use`` on a server (boot
        volumes at server create, others when their attach completes); ``bdm.device`` is its node."""
        self.cloud.on_attached.append(observer)

    def on_detached(self, observer: Callable[[FakeServer, FakeVolume], None]) -> None:
        """``observer(server, volume)`` when a volume is ``available`` again (detach done, attach
        rolled back, or its server deleted)."""
        self.cloud.on_detached.append(observer)

    def on_booted(self, observer: Callable[[FakeServer], None]) -> None:
        """``observer(server)`` when a server reaches ACTIVE after BUILD (not after os-start)."""
        self.cloud.on_booted.append(observer)

    @property
    def lock(self) -> threading.RLock:
        """Hold it to read several resources consistently while requests are being served."""
        return self._lock

    def settle(self) -> None:
        """Finish every pending transition now, as if the cloud had caught up."""
        with self._lock:
            for res in [*self.cloud.servers.values(), *self.cloud.volumes.values()]:
                if not res.stuck_in:
                    res.settle()

    def expire_tokens(self) -> None:
        """Every issued token becomes invalid (keystoneauth must re-authenticate on the 401)."""
        with self._lock:
            self.keystone.tokens.clear()

    def resources(self, *, include_worker: bool = False) -> dict[str, list[str]]:
        """Ids of servers and volumes that still exist, to assert nothing leaked."""
        with self._lock:
            servers = [sid for sid in self.cloud.servers if include_worker or sid != self.worker_server_id]
            return {"servers": servers, "volumes": list(self.cloud.volumes)}

    def calls_matching(self, method: str, path: str) -> list[Call]:
        with self._lock:
            pattern = re.compile(path)
            return [c for c in self.calls if c.method == method.upper() and pattern.search(c.path)]


@contextlib.contextmanager
def running_fake(**kwargs: Any) -> Iterator[FakeOpenStack]:
    """``with running_fake() as fake:``: a started fake that is stopped however the block ends."""
    fake = FakeOpenStack(**kwargs)
    with fake:
        yield fake
