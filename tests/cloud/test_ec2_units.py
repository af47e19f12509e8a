"""The small parts of the EC2 backend, without a cloud: console tail, device names, NVMe
resolution, the retry predicate, error mapping, the boot hook, the attach-failure counter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from cloudbuild.cloud.base import BuildLocks, host_lock
from cloudbuild.cloud.ec2.api import (
    Ec2Api,
    Ec2Context,
    Ec2Error,
    Ec2Limits,
    Ec2UsageError,
    transient,
    translate,
)
from cloudbuild.cloud.ec2.builder import user_data
from cloudbuild.cloud.ec2.console import ConsoleTail, decode_console
from cloudbuild.cloud.ec2.devices import HostPaths, pick_device_name, resolve_device
from cloudbuild.cloud.ec2.identity import WorkerIdentity
from cloudbuild.errors import ExitCode, HostBroken, InfraError, UsageError


def client_error(code: str, status: int = 400) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": f"{code} happened"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "Op",
    )


# --- console ---


def test_console_tail_passes_only_new_bytes_of_growing_snapshots():
    tail = ConsoleTail()
    assert tail.feed(b"boot\n") == b"boot\n"
    assert tail.feed(b"boot\n") == b""
    assert tail.feed(b"boot\nbuild\n") == b"build\n"
    assert tail.feed(b"") == b""


def test_console_tail_handles_a_rolling_window():
    stream = b"".join(b"line %05d\n" % i for i in range(20000))
    tail = ConsoleTail()
    out = bytearray()
    for end in range(1000, len(stream) + 1, 7000):
        out += tail.feed(stream[max(0, end - 64 * 1024) : end])
    out += tail.feed(stream[-64 * 1024 :])
    assert bytes(out) == stream


def test_console_tail_after_a_gap_passes_the_whole_snapshot():
    tail = ConsoleTail()
    tail.feed(b"a" * 10 + b"first part\n")
    assert tail.feed(b"entirely different\n") == b"entirely different\n"


def test_decode_console_does_not_decode_what_botocore_decoded():
    assert decode_console(None) == b""
    assert decode_console("aGVsbG8=") == b"aGVsbG8="  # botocore's handler already base64-decoded Output
    assert decode_console("caf\ufffd\n") == "caf\ufffd\n".encode()


# --- device names and NVMe resolution ---


def test_device_name_skips_names_in_use_in_either_spelling():
    assert pick_device_name([]) == "/dev/sdf"
    assert pick_device_name(["/dev/sda1", "/dev/sdf", "/dev/xvdg"]) == "/dev/sdh"
    with pytest.raises(InfraError, match="no free EBS device name"):
        pick_device_name([f"/dev/sd{c}" for c in "fghijklmnopqrstuvwxyz"])


def test_host_lock_serialises_slots(tmp_path: Path):
    lock = tmp_path / "devices.lock"
    order: list[str] = []
    entered = threading.Event()
    release = threading.Event()

    def first() -> None:
        with host_lock(lock):
            entered.set()
            release.wait(5)
            order.append("first")

    t = threading.Thread(target=first)
    t.start()
    entered.wait(5)
    second_done = threading.Event()

    def second() -> None:
        with host_lock(lock):
            order.append("second")
            second_done.set()

    t2 = threading.Thread(target=second)
    t2.start()
    assert not second_done.wait(0.2)
    release.set()
    t.join(5)
    t2.join(5)
    assert order == ["first", "second"]


def make_paths(tmp_path: Path) -> HostPaths:
    paths = HostPaths(dev=tmp_path / "dev", sys=tmp_path / "sys")
    (paths.dev / "disk" / "by-id").mkdir(parents=True)
    (paths.sys / "class" / "nvme").mkdir(parents=True)
    return paths


def add_controller(paths: HostPaths, name: str, serial: str | None, namespace: bool = True) -> None:
    ctrl = paths.sys / "class" / "nvme" / name
    ctrl.mkdir()
    if serial is not None:
        (ctrl / "serial").write_text(serial + "  \n")
    if namespace:
        (ctrl / f"{name}n1").mkdir()
        (paths.dev / f"{name}n1").write_bytes(b"")


def test_resolve_by_udev_link(tmp_path: Path):
    paths = make_paths(tmp_path)
    target = tmp_path / "nvme3n1"
    target.write_bytes(b"")
    (paths.dev / "disk" / "by-id" / "nvme-Amazon_Elastic_Block_Store_vol0abc").symlink_to(target)
    assert resolve_device("vol-0abc", "/dev/sdf", paths) == target


def test_resolve_by_nvme_serial_never_by_last_device(tmp_path: Path):
    paths = make_paths(tmp_path)
    add_controller(paths, "nvme0", "vol0root")  # the worker's own root
    add_controller(paths, "nvme1", "vol0mine")
    add_controller(paths, "nvme2", "vol0neighbour")  # a neighbour slot's, attached later
    assert resolve_device("vol-0mine", "/dev/sdf", paths) == paths.dev / "nvme1n1"
    assert resolve_device("vol-0missing", "/dev/sdg", paths) is None


def test_resolve_waits_for_the_namespace_of_a_new_controller(tmp_path: Path):
    paths = make_paths(tmp_path)
    add_controller(paths, "nvme1", "vol0mine", namespace=False)
    assert resolve_device("vol-0mine", "/dev/sdf", paths) is None


def test_resolve_xen_names_only_without_nvme(tmp_path: Path):
    paths = make_paths(tmp_path)
    (paths.dev / "xvdf").write_bytes(b"")
    assert resolve_device("vol-0abc", "/dev/sdf", paths) == paths.dev / "xvdf"
    add_controller(paths, "nvme0", "vol0root")
    assert resolve_device("vol-0abc", "/dev/sdf", paths) is None


# --- retries and errors ---


@pytest.mark.parametrize(
    "code", ["RequestLimitExceeded", "Throttling", "InternalError", "ServiceUnavailable"]
)
def test_throttling_is_always_transient(code: str):
    assert transient()(client_error(code))


def test_eventual_consistency_is_transient_only_where_the_call_expects_it():
    assert not transient()(client_error("InvalidVolume.NotFound"))
    assert transient("InvalidVolume.NotFound")(client_error("InvalidVolume.NotFound"))
    assert transient("IncorrectState")(client_error("IncorrectState"))
    assert transient()(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert transient()(client_error("Whatever", status=503))
    for logic in ("InvalidParameterValue", "UnauthorizedOperation", "VolumeLimitExceeded"):
        assert not transient("IncorrectState")(client_error(logic))
    assert not transient()(ValueError("bug"))


def test_capacity_and_quota_map_to_exit_3_bad_options_to_exit_1():
    for code in ("InsufficientInstanceCapacity", "VolumeLimitExceeded", "InstanceLimitExceeded"):
        error = translate(client_error(code), "run_instances")
        assert isinstance(error, Ec2Error) and error.exit_code == ExitCode.INFRA and code in str(error)
    usage = translate(client_error("InvalidAMIID.NotFound"), "run_instances")
    assert isinstance(usage, Ec2UsageError) and usage.exit_code == ExitCode.BUILD_FAILED


def test_api_retries_through_cloudbuild_retry(monkeypatch: pytest.MonkeyPatch):
    from cloudbuild import retry

    monkeypatch.setattr(retry, "_sleep", lambda s: None)

    class Client:
        calls = 0

        def describe_volumes(self, **kwargs: object) -> dict[str, object]:
            Client.calls += 1
            if Client.calls < 3:
                raise client_error("RequestLimitExceeded")
            return {"Volumes": []}

    assert Ec2Api(Client()).must("describe_volumes") == {"Volumes": []}
    assert Client.calls == 3


# --- boot hook ---


def test_user_data_names_volumes_by_nvme_serial_and_runs_the_agent():
    text = user_data(build_id="b1", root="vol-0aaa", swap="vol-0bbb")
    assert text.startswith("#!/bin/sh\n")
    assert "vol0aaa" in text and "vol0bbb" in text and "/dev/sd" not in text
    assert "python3 -m cloudbuild.guest.agent --root" in text
    with pytest.raises(UsageError):
        user_data(build_id="b1; rm -rf /", root="vol-0aaa", swap="vol-0bbb")


def test_user_data_is_valid_shell():
    text = user_data(build_id="b1", root="vol-0aaa", swap="vol-0bbb")
    subprocess.run(["sh", "-n"], input=text.encode(), check=True)


# --- host health ---


def context(tmp_path: Path) -> Ec2Context:
    return Ec2Context(
        Ec2Api(object()),
        WorkerIdentity("i-worker", "us-east-1a", "us-east-1"),
        HostPaths(),
        tmp_path,
        Ec2Limits(broken_after=3),
    )


def test_repeated_attach_failures_declare_the_host_broken_success_resets(tmp_path: Path):
    health = context(tmp_path).health  # broken_after=3 from the limits
    first = health.failed(InfraError("attach timed out"))
    assert not isinstance(first, HostBroken)
    health.ok()
    assert health.count() == 0
    health.failed(InfraError("1"))
    health.failed(InfraError("2"))
    third = health.failed(InfraError("3"))
    assert isinstance(third, HostBroken) and third.exit_code == ExitCode.HOST_BROKEN


# --- build locks ---


def test_build_lock_is_alive_while_held_and_dead_after_sigkill(tmp_path: Path):
    locks = BuildLocks(tmp_path)
    assert not locks.alive("b1")
    with locks.hold("b1"):
        assert locks.alive("b1")
    assert not locks.alive("b1")
    code = (
        "import sys, time; from pathlib import Path; from cloudbuild.cloud.base import BuildLocks;"
        f"BuildLocks(Path({str(tmp_path)!r})).acquire('b2'); print('held', flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert child.stdout is not None and child.stdout.readline().strip() == b"held"
    assert locks.alive("b2")
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    assert not locks.alive("b2")
