"""The OpenStack backend's small parts on their own: console streaming, device discovery, the
transient-error predicate, attach health, flavor choice and the boot hook."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import keystoneauth1.exceptions as ksa_exc
import openstack.exceptions as os_exc
import pytest
import requests

import cloudbuild.cloud.openstack.devices as osdevices
import cloudbuild.retry
from cloudbuild.cloud.base import AttachHealth
from cloudbuild.cloud.openstack.api import is_transient, translate
from cloudbuild.cloud.openstack.builder import (
    PER_BOOT_HOOK,
    TAG_ROOT_VOLUME,
    TAG_SWAP_VOLUME,
    choose_flavor,
    user_data,
    volume_metadata,
)
from cloudbuild.cloud.openstack.console import GAP_MARKER, ConsoleStream
from cloudbuild.cloud.openstack.devices import find_device
from cloudbuild.cloud.openstack.identity import worker_server_id
from cloudbuild.cloud.openstack.volume import size_gib
from cloudbuild.errors import HostBroken, InfraError, UsageError
from cloudbuild.runner import run
from tests.fakes.console import RecordingConsole

VOLUME_ID = "3f1c2a9e-5b7d-4e8f-9a0b-1c2d3e4f5a6b"


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cloudbuild.retry, "_sleep", lambda s: None)


# -- console streaming -----------------------------------------------------------------------------


class Log:
    """A console log as Nova keeps it: `tail(n)` is os-getConsoleOutput with length n."""

    def __init__(self, keep_bytes: int | None = None) -> None:
        self.text = ""
        self.keep_bytes = keep_bytes
        self.requests: list[int | None] = []

    def add(self, text: str) -> None:
        self.text += text
        if self.keep_bytes is not None and len(self.text) > self.keep_bytes:
            self.text = self.text[-self.keep_bytes :]  # the hypervisor's bounded log file

    def tail(self, length: int | None) -> str:
        self.requests.append(length)
        lines = self.text.splitlines(keepends=True)
        return "".join(lines if length is None else lines[-length:] if length else [])


def stream(log: Log) -> tuple[ConsoleStream, RecordingConsole]:
    sink = RecordingConsole()
    return ConsoleStream(log.tail, sink), sink


def test_console_lines_are_passed_on_once_as_they_arrive() -> None:
    log = Log()
    s, sink = stream(log)
    s.poll()
    assert sink.data == b""
    log.add("one\ntwo\n")
    s.poll()
    s.poll()
    log.add("three\n")
    s.poll()
    assert sink.data == b"one\ntwo\nthree\n"


def test_an_unfinished_line_waits_until_it_is_finished_or_the_server_stopped() -> None:
    log = Log()
    s, sink = stream(log)
    log.add("progress: 10%")
    s.poll()
    assert sink.data == b""
    log.add(" 100%\nlast words")
    s.poll()
    assert sink.data == b"progress: 10% 100%\n"
    s.flush()
    assert sink.data == b"progress: 10% 100%\nlast words\n"


def test_repeated_identical_lines_are_neither_lost_nor_duplicated() -> None:
    log = Log()
    s, sink = stream(log)
    expected = ""
    for burst in (3, 40, 1, 77):
        chunk = ".\n" * burst
        log.add(chunk)
        expected += chunk
        s.poll()
    assert sink.data == expected.encode()


def test_more_output_than_the_window_between_two_polls_grows_the_window() -> None:
    log = Log()
    s, sink = stream(log)
    log.add("start\n")
    s.poll()
    big = "".join(f"line {i}\n" for i in range(5000))
    log.add(big)
    s.poll()
    assert sink.data == ("start\n" + big).encode()
    assert max(r for r in log.requests if r is not None) > 5000


def test_a_log_cut_at_the_front_still_streams_by_overlap() -> None:
    log = Log(keep_bytes=3000)  # Nova reads at most the end of the console log
    s, sink = stream(log)
    expected = ""
    for i in range(100):
        chunk = f"step {i}: compiling\nstep {i}: linking\n"
        log.add(chunk)
        expected += chunk
        s.poll()
    assert sink.data == expected.encode()


def test_output_lost_between_polls_is_marked_not_hidden() -> None:
    log = Log(keep_bytes=200)
    s, sink = stream(log)
    log.add("".join(f"early {i}\n" for i in range(5)))
    s.poll()
    log.add("".join(f"late {i}\n" for i in range(100)))
    s.poll()
    assert GAP_MARKER in sink.data
    assert sink.data.endswith(b"late 99\n")
    assert sink.data.count(b"early 0\n") == 1


@pytest.mark.parametrize("seed", range(40))
def test_random_bursts_are_streamed_exactly_once(seed: int) -> None:
    """Bursts smaller and larger than every window, repeated and unique lines, polls in between."""
    rnd = random.Random(seed)
    log = Log()
    s, sink = stream(log)
    number = 0
    for _ in range(rnd.randint(1, 25)):
        for _ in range(rnd.choice([0, 1, 7, 50, 199, 200, 201, 799, 800, 3000])):
            log.add("same\n" if rnd.random() < 0.5 else f"line {number}\n")
            number += 1
        s.poll()
    s.flush()
    assert sink.data == log.text.encode()


@pytest.mark.parametrize("seed", range(20))
def test_a_cut_log_never_repeats_a_line(seed: int) -> None:
    rnd = random.Random(seed)
    log = Log(keep_bytes=6000)
    s, sink = stream(log)
    for number in range(3000):
        log.add(f"line {number} " + "x" * rnd.randint(0, 60) + "\n")
        if rnd.random() < 0.05:
            s.poll()
    s.flush()
    numbers = [int(line.split()[1]) for line in sink.data.splitlines() if line.startswith(b"line ")]
    assert numbers == sorted(set(numbers))
    assert numbers[-1] == 2999


# -- devices ---------------------------------------------------------------------------------------


def test_device_is_found_by_virtio_serial(tmp_path: Path) -> None:
    by_id = tmp_path / "disk" / "by-id"
    by_id.mkdir(parents=True)
    assert find_device(tmp_path, VOLUME_ID, "/dev/vdb") is None
    (tmp_path / "vdc").write_bytes(b"")
    (by_id / f"virtio-{VOLUME_ID[:20]}").symlink_to("../../vdc")
    assert find_device(tmp_path, VOLUME_ID, "/dev/vdb") == tmp_path / "vdc"


def test_device_is_found_by_scsi_name(tmp_path: Path) -> None:
    by_id = tmp_path / "disk" / "by-id"
    by_id.mkdir(parents=True)
    (tmp_path / "sdb").write_bytes(b"")
    (by_id / f"scsi-0QEMU_QEMU_HARDDISK_{VOLUME_ID}").symlink_to("../../sdb")
    assert find_device(tmp_path, VOLUME_ID, None) == tmp_path / "sdb"


def test_novas_device_name_only_counts_once_it_is_a_block_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "vdb").write_bytes(b"")  # a file, not a disk
    assert find_device(tmp_path, VOLUME_ID, "/dev/vdb") is None
    monkeypatch.setattr(osdevices, "is_block_device", lambda path: path == tmp_path / "vdb")
    assert find_device(tmp_path, VOLUME_ID, "/dev/vdb") == tmp_path / "vdb"
    assert find_device(tmp_path, VOLUME_ID, "/dev/../etc/vdb") is None
    assert find_device(tmp_path, VOLUME_ID, "vdb") is None


def test_cinder_sizes_are_whole_gib_rounded_up() -> None:
    assert [size_gib(m) for m in (1, 1024, 1025, 4096)] == [1, 1, 2, 4]


# -- errors ----------------------------------------------------------------------------------------


def http_error(status: int) -> os_exc.HttpException:
    response = requests.Response()
    response.status_code = status
    return os_exc.HttpException(message=f"HTTP {status}", response=response, details="detail")


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
def test_server_errors_and_throttling_are_transient(status: int) -> None:
    assert is_transient(http_error(status))


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 501])
def test_client_errors_and_not_implemented_are_not_transient(status: int) -> None:
    assert not is_transient(http_error(status))


def test_connection_failures_are_transient_but_certificates_are_not() -> None:
    assert is_transient(ksa_exc.ConnectFailure("reset"))
    assert is_transient(ksa_exc.ConnectTimeout("slow"))
    assert not is_transient(ksa_exc.SSLError("bad certificate"))
    assert not is_transient(ValueError("logic"))


@pytest.mark.parametrize("status", [403, 413])
def test_quota_refusals_are_infrastructure_errors_that_say_so(status: int) -> None:
    error = translate(http_error(status), "create server")
    assert isinstance(error, InfraError) and "quota" in str(error) and f"HTTP {status}" in str(error)


def test_missing_credentials_say_how_to_configure() -> None:
    error = translate(ksa_exc.MissingRequiredOptions([]), "list servers")
    assert "OS_CLOUD" in str(error)


def test_metadata_service_errors(tmp_path: Path) -> None:
    assert worker_server_id("given-id", url="http://127.0.0.1:9/x") == "given-id"
    with pytest.raises(UsageError, match="--vm-server"):
        worker_server_id(None, url="http://127.0.0.1:9/openstack/latest/meta_data.json")


# -- attach health ---------------------------------------------------------------------------------


def test_stuck_volumes_count_per_worker_and_reset_on_success(tmp_path: Path) -> None:
    health = AttachHealth("worker-1", tmp_path)
    other = AttachHealth("worker-2", tmp_path)  # a state folder copied from another worker
    assert type(health.failed("stuck")) is InfraError
    broken = health.failed("stuck again")
    assert isinstance(broken, HostBroken) and "out of service" in str(broken)
    assert health.count() == 2 and other.count() == 0
    health.ok()
    assert health.count() == 0
    assert type(health.failed("once more")) is InfraError
    assert isinstance(health.failed("and again"), HostBroken)


def test_a_broken_state_file_counts_as_zero(tmp_path: Path) -> None:
    health = AttachHealth("w", tmp_path)
    health.path.write_text("{not json")
    assert health.count() == 0
    assert type(health.failed("x")) is InfraError
    assert health.count() == 1


# -- flavors and the boot hook ---------------------------------------------------------------------


class Flavor:
    def __init__(self, name: str, vcpus: int, ram: int, disk: int = 10, disabled: bool = False):
        self.id, self.name, self.vcpus, self.ram, self.disk, self.is_disabled = (
            f"id-{name}",
            name,
            vcpus,
            ram,
            disk,
            disabled,
        )


FLAVORS = [
    Flavor("big", 8, 16384),
    Flavor("small", 1, 2048),
    Flavor("medium", 2, 4096),
    Flavor("medium-off", 2, 4096, disabled=True),
    Flavor("tiny", 1, 512),
]


def test_default_flavor_is_the_smallest_that_fits() -> None:
    assert choose_flavor(FLAVORS, memory_mib=None, vcpus=1).name == "tiny"
    assert choose_flavor(FLAVORS, memory_mib=1024, vcpus=1).name == "small"
    assert choose_flavor(FLAVORS, memory_mib=3000, vcpus=2).name == "medium"
    with pytest.raises(UsageError, match="--openstack-flavor"):
        choose_flavor(FLAVORS, memory_mib=None, vcpus=16)


METADATA_SERVICE = "http://169.254.169.254/openstack/latest/meta_data.json"


def _run_hook(tmp_path: Path, meta: dict[str, str]) -> tuple[str, Path]:
    """Run the hook as cloud-init does (a file), with a fake /dev, the metadata service as a file,
    the real python3 for its metadata reader and a python3 that prints the agent's arguments."""
    script = user_data(fstype="ext4", mount_options="noatime")
    assert METADATA_SERVICE in script and PER_BOOT_HOOK in script
    (tmp_path / "meta_data.json").write_text(json.dumps({"uuid": "s1", "meta": meta}))
    dev, per_boot = tmp_path / "dev", tmp_path / "per-boot" / "cloudbuild-builder"
    script = (
        script.replace("/dev/disk/by-id/", f"{dev}/disk/by-id/")
        .replace("/dev/disk/by-label/config-2", f"{dev}/no-config-drive")
        .replace(METADATA_SERVICE, f"file://{tmp_path}/meta_data.json")
        .replace(PER_BOOT_HOOK, str(per_boot))
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    real = sys.executable
    (bin_dir / "python3").write_text(
        f'#!/bin/sh\n[ "$1" = -c ] && exec {real} "$@"\necho "PYTHONPATH=$PYTHONPATH"; echo "$@"\n'
    )
    (bin_dir / "udevadm").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "poweroff").write_text("#!/bin/sh\necho POWEROFF; exit 0\n")
    for tool in ("python3", "udevadm", "poweroff"):
        (bin_dir / tool).chmod(0o755)
    (dev / "disk" / "by-id").mkdir(parents=True, exist_ok=True)
    hook = tmp_path / "user-data"
    hook.write_text(script)
    out = run(["sh", str(hook)], env={"PATH": f"{bin_dir}:/usr/bin:/bin"}).stdout
    return out, per_boot


def test_boot_hook_reads_volume_ids_from_metadata_finds_them_by_serial_and_runs_the_agent(
    tmp_path: Path,
) -> None:
    root_id, swap_id = VOLUME_ID, "9e8d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c6b"
    dev = tmp_path / "dev"
    (dev / "disk" / "by-id").mkdir(parents=True)
    (dev / "disk" / "by-id" / f"virtio-{root_id[:20]}").write_text("")
    (dev / "disk" / "by-id" / f"scsi-0QEMU_QEMU_HARDDISK_{swap_id}").write_text("")
    out, per_boot = _run_hook(tmp_path, volume_metadata(root_id, swap_id))
    assert "PYTHONPATH=/usr/lib/cloudbuild" in out
    assert (
        f"-m cloudbuild.guest.agent --root {dev}/disk/by-id/virtio-{root_id[:20]} "
        f"--swap {dev}/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_{swap_id} --fstype ext4 --mount-options noatime"
    ) in out
    assert "POWEROFF" not in out
    # installed for every later boot (a pool builder boots once per build; user data runs once)
    assert per_boot.read_text() == (tmp_path / "user-data").read_text()
    assert root_id not in per_boot.read_text()  # the ids come from the metadata of each boot


@pytest.mark.parametrize(
    "meta",
    [{}, {TAG_ROOT_VOLUME: VOLUME_ID}, {TAG_ROOT_VOLUME: VOLUME_ID, TAG_SWAP_VOLUME: "x; reboot"}],
    ids=["none", "swap-missing", "hostile"],
)
def test_boot_hook_without_volume_ids_in_metadata_powers_off(tmp_path: Path, meta: dict[str, str]) -> None:
    out, _ = _run_hook(tmp_path, meta)
    assert "cloudbuild: no volume ids in the server metadata" in out and "POWEROFF" in out
