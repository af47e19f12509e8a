"""EC2 for tests: moto in server mode on 127.0.0.1, plus the parts of a worker host moto lacks.

- `moto_server` (session): one `ThreadedMotoServer(ip_address="127.0.0.1", port=0)`; every test
  starts from `POST /moto-api/reset`.
- `aws`: the reset, and botocore's own settings pointed at the fakes (`AWS_ENDPOINT_URL_EC2`,
  `AWS_EC2_METADATA_SERVICE_ENDPOINT`, dummy credentials), so the code under test finds them the
  way production finds the real ones.
- `ec2_world`: a worker instance in moto, a fake IMDSv2 naming it, fake `/dev` and `/sys` roots,
  and a `HostEmulator` thread that plays udev (a by-id link to an image file for every EBS volume
  attached to the worker) and the builder instance (when a builder runs with both volumes
  attached, `play` runs the build on their image files, then the instance stops in moto).
- `ec2_leftovers` (autouse; checks only tests that used moto): after every test, no cloudbuild-tagged volume,
  instance, snapshot or image may be left in moto, except a warm pool the test asked for.

moto makes every transition instant; tests inject slowness and faults with botocore event hooks on
the client they hand to the code, or by patching moto's backend here, never in the package.

tests/conftest.py loads this module as a plugin: tests ask for the fixtures by name.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import botocore
import pytest

from cloudbuild.cloud.common import TAG_POOL
from cloudbuild.cloud.ec2.api import Ec2Api, Ec2Limits, client
from cloudbuild.cloud.ec2.backend import Ec2Backend
from cloudbuild.cloud.ec2.devices import BY_ID_PREFIX, HostPaths, serial_of
from cloudbuild.cloud.ec2.identity import WorkerIdentity
from cloudbuild.disk import buildstatus
from cloudbuild.options import VmOptions
from cloudbuild.volume import TAG_BUILD, TAG_OWNER, TAG_ROLE
from tests.fakes import timings
from tests.fakes.hoststeps import FakeHostSteps
from tests.fakes.imds import FakeImds

ACCOUNT = "123456789012"
REGION = "us-east-1"
ZONE = "us-east-1a"


def moto_backend() -> Any:
    from moto.ec2.models import ec2_backends

    return ec2_backends[ACCOUNT][REGION]


@pytest.fixture(scope="session", name="moto_server")
def moto_server_fixture() -> Iterator[str]:
    # 1300 default AMIs make every reset and describe slow; tests register the one they need
    os.environ["MOTO_EC2_LOAD_DEFAULT_AMIS"] = "false"
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def reset_moto(url: str) -> None:
    with urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=10):
        pass


_ACTIVE: list[Aws] = []
_SESSIONS: list[boto3.Session] = []


def _session() -> boto3.Session:
    """One boto3 session for all tests: it loads EC2's service model once, not per client."""
    if not _SESSIONS:
        _SESSIONS.append(boto3.Session())
    return _SESSIONS[0]


@dataclass
class Aws:
    url: str
    allow_pool: bool = False  # the test keeps a warm pool on purpose

    def client(self) -> Any:
        """A client bound to this moto by explicit endpoint (safe even after the env is restored)."""
        return _session().client(
            "ec2",
            region_name=REGION,
            endpoint_url=self.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )


def honour_client_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """EC2 answers a CreateVolume whose ClientToken it has seen with the volume that call created
    (idempotency); moto ignores the token and creates another. Taught here, on moto's response
    class (the server runs in this process), so a lost create answer can be tested."""
    from moto.core.responses import ActionResult
    from moto.ec2.responses.elastic_block_store import ElasticBlockStore

    real = ElasticBlockStore.create_volume
    created: dict[str, str] = {}  # token -> volume id; moto is reset per test, so is this

    def create_volume(self: Any) -> Any:
        token = self._get_param("ClientToken")
        volume = self.ec2_backend.volumes.get(created.get(token, "")) if token else None
        if volume is not None:
            return ActionResult(volume)
        result = real(self)
        if token:
            created[token] = result.result.id
        return result

    monkeypatch.setattr(ElasticBlockStore, "create_volume", create_volume)


@pytest.fixture(name="aws")
def aws_fixture(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Aws:
    reset_moto(moto_server)
    honour_client_tokens(monkeypatch)
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", moto_server)
    # retries and waits keep their logic, but tests do not sit out real backoff
    timings.cap_retry_sleeps(monkeypatch, 0.005)
    state = Aws(moto_server)
    _ACTIVE.append(state)
    return state


def register_ami(ec2: Any, name: str) -> str:
    """An AMI to launch workers and builders from (moto starts without any, see moto_server)."""
    image: str = ec2.register_image(
        Name=name,
        RootDeviceName="/dev/sda1",
        Architecture="x86_64",
        VirtualizationType="hvm",
        BlockDeviceMappings=[{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 8}}],
    )["ImageId"]
    return image


def leftovers(ec2: Any, *, allow_pool: bool = False) -> list[str]:
    """Every cloudbuild-tagged resource still in the account (terminated instances do not count)."""
    found: set[str] = set()
    for key in (TAG_OWNER, TAG_BUILD):
        filters = [{"Name": "tag-key", "Values": [key]}]
        for vol in ec2.describe_volumes(Filters=filters)["Volumes"]:
            found.add(vol["VolumeId"])
        for res in ec2.describe_instances(Filters=filters)["Reservations"]:
            for inst in res["Instances"]:
                tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
                if inst["State"]["Name"] == "terminated" or (allow_pool and TAG_POOL in tags):
                    continue
                found.add(inst["InstanceId"])
        for snap in ec2.describe_snapshots(OwnerIds=["self"], Filters=filters)["Snapshots"]:
            found.add(snap["SnapshotId"])
        for image in ec2.describe_images(Owners=["self"], Filters=filters)["Images"]:
            found.add(image["ImageId"])
    return sorted(found)


@pytest.fixture(autouse=True, name="ec2_leftovers")
def ec2_leftovers_fixture() -> Iterator[None]:
    """After a test that used moto: nothing cloudbuild tagged is left (a pool only when asked for)."""
    _ACTIVE.clear()
    yield
    for state in _ACTIVE:
        left = leftovers(state.client(), allow_pool=state.allow_pool)
        assert left == [], f"cloudbuild resources left behind: {left}"
    _ACTIVE.clear()


# --- the worker host and the builder, emulated ------------------------------------------------


@dataclass
class BuilderRun:
    """One boot of a builder instance, as the emulator plays it."""

    instance_id: str
    root_volume: str
    swap_volume: str
    root_image: Path
    swap_image: Path
    console: Callable[[bytes], None]
    outcome: str = "stop"  # stop (powered off), vanish (terminated under us), hang (never stops)


def fake_build(status: int = 0) -> Callable[[BuilderRun], None]:
    """A build without a VM: checks the staged root, leaves a result, BUILDSTATUS and console lines."""

    def play(run: BuilderRun) -> None:
        run.console(b"[    0.000000] Linux version 6.1 (builder)\n")
        with open(run.root_image, "r+b") as root:
            staged = root.read(len(FakeHostSteps.STAGED))
            run.console(b"cloudbuild: root staged ok\n" if staged == FakeHostSteps.STAGED else b"no stage!\n")
            root.seek(FakeHostSteps.RESULT_OFFSET)
            root.write(b"RESULT-OF-" + run.instance_id.encode())
        with open(run.swap_image, "r+b") as swap:
            swap.write(buildstatus.encode(status if staged == FakeHostSteps.STAGED else 3))
        run.console(b"### VM INTERACTION END ###\n")

    return play


class HostEmulator:
    """udev and the builder: watches moto's backend (in this process) and acts like the hosts would."""

    def __init__(self, worker_id: str, paths: HostPaths, images: Path):
        self.worker_id = worker_id
        self.paths = paths
        self.images = images
        self.play: Callable[[BuilderRun], None] = fake_build(0)
        self.runs: list[BuilderRun] = []
        self.consoles: dict[str, bytearray] = {}
        self.errors: list[BaseException] = []
        self._playing: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="host-emulator")
        self._workers: list[threading.Thread] = []
        self.by_id = paths.dev / "disk" / "by-id"
        self.by_id.mkdir(parents=True, exist_ok=True)

    def image(self, volume_id: str, size_gib: int = 1) -> Path:
        path = self.images / f"{volume_id}.img"
        if not path.exists():
            self.images.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.truncate(size_gib * 1024 * 1024 * 1024)
        return path

    def link(self, volume_id: str) -> Path:
        return self.by_id / f"{BY_ID_PREFIX}{serial_of(volume_id)}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for worker in self._workers:
            worker.join(timeout=60)

    def _loop(self) -> None:
        while not self._stop.wait(0.003):
            try:
                self._tick()
            except RuntimeError:  # moto's dicts changed under us: look again
                continue
            except Exception as exc:
                self.errors.append(exc)

    def _tick(self) -> None:
        backend = moto_backend()
        wanted: set[Path] = set()
        for volume in list(backend.volumes.values()):
            attachment = volume.attachment
            if attachment is not None and attachment.instance.id == self.worker_id:
                link = self.link(volume.id)
                wanted.add(link)
                if not link.is_symlink():
                    link.symlink_to(self.image(volume.id, volume.size))
        for link in list(self.by_id.iterdir()):
            if link not in wanted:  # detached, or deleted (while attached to a terminated worker)
                link.unlink(missing_ok=True)
        for instance in list(backend.all_instances()):
            tags = backend.tags.get(instance.id, {})
            if tags.get(TAG_ROLE) != "builder":
                continue
            if instance._state.name != "running":
                self._playing.discard(instance.id)
                continue
            if instance.id in self._playing or instance.user_data is None:
                continue
            text = instance.user_data.decode()
            root = re.search(r'root="\$\{by_id\}(vol[0-9a-f]+)"', text)
            swap = re.search(r'swap="\$\{by_id\}(vol[0-9a-f]+)"', text)
            if not root or not swap:
                continue
            root_id, swap_id = (f"vol-{m.group(1)[3:]}" for m in (root, swap))
            attached = {m.volume_id for m in instance.block_device_mapping.values()}
            if root_id in attached and swap_id in attached:
                self._playing.add(instance.id)
                run = BuilderRun(
                    instance.id,
                    root_id,
                    swap_id,
                    self.image(root_id, backend.volumes[root_id].size),
                    self.image(swap_id, backend.volumes[swap_id].size),
                    lambda data, iid=instance.id: self.consoles.setdefault(iid, bytearray()).extend(data),
                )
                worker = threading.Thread(target=self._run, args=(run,), daemon=True)
                self._workers.append(worker)
                worker.start()

    def _run(self, run: BuilderRun) -> None:
        self.runs.append(run)
        try:
            self.play(run)
        except Exception as exc:
            self.errors.append(exc)
        backend = moto_backend()
        if run.outcome == "stop":
            backend.stop_instances([run.instance_id])
        elif run.outcome == "vanish":
            backend.terminate_instances([run.instance_id])


@pytest.fixture(name="console_from_emulator")
def console_from_emulator_fixture(monkeypatch: pytest.MonkeyPatch) -> Callable[[HostEmulator], None]:
    """Make moto's GetConsoleOutput answer with what the emulated builder printed (last 64 KiB)."""

    def install(emulator: HostEmulator) -> None:
        from moto.core.responses import ActionResult
        from moto.core.utils import utcnow
        from moto.ec2.responses.general import General

        def get_console_output(self: Any) -> Any:
            instance_id = self._get_param("InstanceId")
            instance = self.ec2_backend.get_instance(instance_id)
            data = bytes(emulator.consoles.get(instance.id, b""))[-64 * 1024 :]
            return ActionResult(
                {"InstanceId": instance.id, "Timestamp": utcnow(), "Output": base64.b64encode(data).decode()}
            )

        monkeypatch.setattr(General, "get_console_output", get_console_output)

    return install


@dataclass
class Ec2World:
    aws: Aws
    ec2: Any  # the client handed to the code: register fault hooks on ec2.meta.events
    worker_id: str
    ami: str
    imds: FakeImds
    paths: HostPaths
    images: Path
    state_dir: Path
    emulator: HostEmulator
    tmp: Path
    backends: list[Ec2Backend] = field(default_factory=list)
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    @property
    def identity(self) -> WorkerIdentity:
        return WorkerIdentity(self.worker_id, ZONE, REGION)

    def options(self, **changes: Any) -> VmOptions:
        base = VmOptions(
            vm_type="ec2",
            ec2_builder_ami=self.ami,
            ec2_instance_type="t3.micro",
            disk_size=1024,
            swap_size=1024,
        )
        return base.replace(**changes)

    def backend(
        self, *, limits: Ec2Limits = timings.EC2, via_imds: bool = False, **changes: Any
    ) -> Ec2Backend:
        backend = Ec2Backend(
            self.options(**changes),
            api=Ec2Api(self.ec2),
            identity=None if via_imds else self.identity,
            paths=self.paths,
            state_dir=self.state_dir,
            limits=limits,
        )
        self.backends.append(backend)
        return backend

    def hook(self, event: str, handler: Callable[..., Any]) -> None:
        self.ec2.meta.events.register(event, handler)

    def volume_ids(self) -> list[str]:
        return [
            v["VolumeId"]
            for v in self.ec2.describe_volumes(Filters=[{"Name": "tag-key", "Values": [TAG_OWNER]}])[
                "Volumes"
            ]
        ]


@pytest.fixture(name="ec2_world")
def ec2_world_fixture(
    aws: Aws,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    console_from_emulator: Callable[[HostEmulator], None],
) -> Iterator[Ec2World]:
    ec2 = client(REGION, session=_session())  # found through AWS_ENDPOINT_URL_EC2, as production finds EC2
    ami = register_ami(ec2, "cloudbuild-builder")
    worker = ec2.run_instances(
        ImageId=ami, MinCount=1, MaxCount=1, InstanceType="m5.large", Placement={"AvailabilityZone": ZONE}
    )["Instances"][0]["InstanceId"]
    imds = FakeImds({"instance-id": worker, "placement/availability-zone": ZONE, "placement/region": REGION})
    imds.start()
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.endpoint)
    monkeypatch.setenv("CLOUDBUILD_STATE_DIR", str(tmp_path / "state"))
    state_dir = tmp_path / "state" / "ec2"  # where the backend and `cloudbuild gc` keep it
    paths = HostPaths(dev=tmp_path / "dev", sys=tmp_path / "sys")
    (paths.sys / "class" / "nvme").mkdir(parents=True)
    emulator = HostEmulator(worker, paths, tmp_path / "images")
    console_from_emulator(emulator)
    emulator.start()
    world = Ec2World(aws, ec2, worker, ami, imds, paths, tmp_path / "images", state_dir, emulator, tmp_path)
    try:
        yield world
    finally:
        emulator.stop()
        imds.stop()
        assert not emulator.errors, f"host emulator failed: {emulator.errors!r}"


# --- fault injection through botocore's event hooks -------------------------------------------


class _Http:
    def __init__(self, status_code: int):
        self.status_code = status_code
        self.headers: dict[str, str] = {}


class Faults:
    """Hooks on the client the code under test uses: EC2 misbehaving the way it does in real life.

    `fail(op, code, times)`: the next `times` calls of `op` answer with an error (never reach moto).
    `swallow(op, answer, times, when)`: calls answer success without doing anything (a stuck detach,
    an attach that never lands). `after(op, fn)`: run `fn(params, parsed)` after a real call (to
    change moto's state behind the API, e.g. flip an attachment back). `calls` counts every call.
    """

    def __init__(self, ec2: Any):
        self.ec2 = ec2
        self.calls: list[str] = []
        self.params: list[tuple[str, dict[str, Any]]] = []
        ec2.meta.events.register("provide-client-params.ec2", self._record)

    def _record(self, params: dict[str, Any], model: Any, **kwargs: Any) -> None:
        self.calls.append(model.name)
        self.params.append((model.name, dict(params)))

    def count(self, op: str) -> int:
        return self.calls.count(op)

    def fail(self, op: str, code: str, times: int = 1, *, status: int = 400) -> None:
        left = [times]

        def handler(**kwargs: Any) -> Any:
            if left[0] <= 0:
                return None
            left[0] -= 1
            body = {
                "Error": {"Code": code, "Message": f"injected {code}"},
                "ResponseMetadata": {"HTTPStatusCode": status},
            }
            return _Http(status), body

        self.ec2.meta.events.register(f"before-call.ec2.{op}", handler)

    def lose_answer(self, op: str, code: str = "InternalError", times: int = 1) -> None:
        """The next `times` calls of `op` reach EC2 and take effect, but the answer is lost: the
        caller sees `code` (a 500) and retries the same request."""
        left = [times]
        raw = boto3.client("ec2", region_name=REGION, endpoint_url=self.ec2.meta.endpoint_url)
        method = getattr(raw, botocore.xform_name(op))

        def handler(**kwargs: Any) -> Any:
            if left[0] <= 0:
                return None
            left[0] -= 1
            params = next(p for name, p in reversed(self.params) if name == op)
            method(**params)  # EC2 did it ...
            body = {  # ... and the answer never arrived
                "Error": {"Code": code, "Message": f"injected {code} after the call took effect"},
                "ResponseMetadata": {"HTTPStatusCode": 500},
            }
            return _Http(500), body

        self.ec2.meta.events.register(f"before-call.ec2.{op}", handler)

    def swallow(
        self,
        op: str,
        answer: dict[str, Any] | None = None,
        times: int = 1,
        when: Callable[[dict[str, Any]], bool] = lambda params: True,
    ) -> None:
        left = [times]

        def handler(params: dict[str, Any], **kwargs: Any) -> Any:
            body = params.get("body") or {}
            if left[0] <= 0 or not when(dict(body) if isinstance(body, dict) else {}):
                return None
            left[0] -= 1
            return _Http(200), dict(answer or {}, ResponseMetadata={"HTTPStatusCode": 200})

        self.ec2.meta.events.register(f"before-call.ec2.{op}", handler)

    def after(self, op: str, fn: Callable[[dict[str, Any]], None], times: int = 1) -> None:
        left = [times]

        def handler(parsed: dict[str, Any], **kwargs: Any) -> None:
            if left[0] > 0:
                left[0] -= 1
                fn(parsed)

        self.ec2.meta.events.register(f"after-call.ec2.{op}", handler)
