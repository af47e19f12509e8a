"""Pins the fake OpenStack's behaviour, exercised through the real openstacksdk over HTTP.

The OpenStack backend is written against this fake; these tests are the contract it can rely on.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import openstack
import openstack.connection
import pytest
import requests
from keystoneauth1 import exceptions as ks_exceptions
from openstack import exceptions as os_exceptions

from tests.fakes import timings
from tests.fakes.openstack import FakeOpenStack, Quotas, running_fake

pytest_plugins = ["tests.cloud.openstack_fixtures"]  # openstack_fake, openstack_conn, openstack_cloud_env

Conn = openstack.connection.Connection


def _available_volume(conn: Conn, **attrs: object) -> openstack.block_storage.v3.volume.Volume:
    vol = conn.block_storage.create_volume(size=attrs.pop("size", 1), **attrs)
    return conn.block_storage.wait_for_status(vol, "available", **timings.SDK_WAIT)


def _booted_server(conn: Conn, *volumes: object, **attrs: object) -> openstack.compute.v2.server.Server:
    bdm = [{"boot_index": i if i == 0 else -1, "uuid": v.id, "source_type": "volume",  # type: ignore[attr-defined]
            "destination_type": "volume", "delete_on_termination": False} for i, v in enumerate(volumes)]
    server = conn.compute.create_server(name=attrs.pop("name", "build-1"), flavor_id="2", networks="none",
                                        block_device_mapping=bdm, **attrs)
    return conn.compute.wait_for_server(server, **timings.SDK_WAIT)


# -- Keystone -------------------------------------------------------------------------------------


def test_password_auth_yields_catalog_pointing_at_the_fake(openstack_fake: FakeOpenStack,
                                                           openstack_conn: Conn) -> None:
    base = openstack_fake.url
    assert openstack_conn.compute.get_endpoint() == f"{base}/compute/v2.1"
    assert openstack_conn.block_storage.get_endpoint() == f"{base}/volume/v3/{openstack_fake.project_id}"
    assert openstack_conn.image.get_endpoint().startswith(f"{base}/image")
    assert openstack_conn.current_project_id == openstack_fake.project_id
    assert base.startswith("http://127.0.0.1:")


def test_clouds_yaml_and_os_cloud_connect(openstack_fake: FakeOpenStack, openstack_cloud_env: str) -> None:
    conn = openstack.connect()  # everything from OS_CLOUD + OS_CLIENT_CONFIG_FILE
    assert [f.name for f in conn.compute.flavors()][:2] == ["m1.tiny", "m1.small"]
    assert openstack.connect(cloud=openstack_cloud_env).compute.find_flavor("m1.small").id == "2"


def test_unversioned_auth_url_is_discovered(openstack_fake: FakeOpenStack) -> None:
    conn = openstack.connect(**openstack_fake.connect_kwargs() | {"auth_url": openstack_fake.url})
    assert conn.compute.find_flavor("m1.tiny").id == "1"
    assert openstack_fake.calls[0] == ("GET", "/", 300)  # Keystone's multiple-choice version list


def test_os_environment_variables_connect(openstack_fake: FakeOpenStack, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith("OS_")]:
        monkeypatch.delenv(var)
    for var, value in openstack_fake.os_environ().items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", "/nonexistent/clouds.yaml")
    assert openstack.connect().compute.get_flavor("3").name == "m1.medium"


def test_wrong_password_is_refused(openstack_fake: FakeOpenStack) -> None:
    kwargs = openstack_fake.connect_kwargs() | {"password": "wrong"}
    with pytest.raises(ks_exceptions.Unauthorized):
        openstack.connect(**kwargs).compute.flavors().__next__()


@pytest.mark.parametrize("headers", [{}, {"X-Auth-Token": "not-a-token"}])
def test_requests_without_a_valid_token_get_401(openstack_fake: FakeOpenStack,
                                                headers: dict[str, str]) -> None:
    response = requests.get(f"{openstack_fake.url}/compute/v2.1/servers/detail", headers=headers, timeout=5)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == 401


def test_expired_token_is_renewed_by_keystoneauth(openstack_fake: FakeOpenStack, openstack_conn: Conn) -> None:
    list(openstack_conn.compute.flavors())
    openstack_fake.expire_tokens()
    list(openstack_conn.compute.flavors())
    statuses = [c.status for c in openstack_fake.calls_matching("GET", r"/flavors/detail$")]
    assert statuses == [200, 401, 200]
    assert len(openstack_fake.calls_matching("POST", r"/v3/auth/tokens$")) == 2


# -- microversions --------------------------------------------------------------------------------


def test_microversions_are_negotiated_and_echoed(openstack_fake: FakeOpenStack, openstack_conn: Conn) -> None:
    response = openstack_conn.compute.get("/servers/detail", microversion="2.79")
    assert response.headers["OpenStack-API-Version"] == "compute 2.79"
    response = openstack_conn.block_storage.get("/volumes/detail", microversion="3.60")
    assert response.headers["OpenStack-API-Version"] == "volume 3.60"
    too_new = requests.get(f"{openstack_fake.url}/compute/v2.1/servers/detail", timeout=5, headers={
        "X-Auth-Token": openstack_fake.token(), "OpenStack-API-Version": "compute 2.500"})
    assert too_new.status_code == 406


# -- Cinder ---------------------------------------------------------------------------------------


def test_volume_is_creating_then_available(openstack_fake: FakeOpenStack, openstack_conn: Conn) -> None:
    vol = openstack_conn.block_storage.create_volume(
        size=10, name="root", volume_type="ssd", availability_zone="az2", metadata={"cloudbuild:slot": "1"})
    assert vol.status == "creating"
    assert openstack_conn.block_storage.get_volume(vol).status == "creating"  # lag=1: one GET sees it
    vol = openstack_conn.block_storage.wait_for_status(vol, "available", **timings.SDK_WAIT)
    assert (vol.size, vol.volume_type, vol.availability_zone) == (10, "ssd", "az2")
    assert vol.metadata == {"cloudbuild:slot": "1"}
    assert vol.attachments == []


def test_each_transitional_status_is_seen_by_lag_gets() -> None:
    with running_fake(lag=3) as fake:
        conn = openstack.connect(**fake.connect_kwargs())
        vol = conn.block_storage.create_volume(size=1)
        assert [conn.block_storage.get_volume(vol).status for _ in range(4)] == ["creating"] * 3 + ["available"]
    with running_fake(lag=0) as fake:
        conn = openstack.connect(**fake.connect_kwargs())
        vol = conn.block_storage.create_volume(size=1)
        assert conn.block_storage.get_volume(vol).status == "available"


def test_lists_do_not_advance_state_but_settle_does(openstack_fake: FakeOpenStack, openstack_conn: Conn) -> None:
    vol = openstack_conn.block_storage.create_volume(size=1)
    for _ in range(3):
        assert [v.status for v in openstack_conn.block_storage.volumes()] == ["creating"]
    openstack_fake.settle()
    assert [v.status for v in openstack_conn.block_storage.volumes()] == ["available"]
    assert openstack_fake.volume(vol.id).status == "available"


def test_lists_are_paged_with_limit_and_marker(openstack_fake: FakeOpenStack, openstack_conn: Conn) -> None:
    ids = [openstack_conn.block_storage.create_volume(size=1).id for _ in range(5)]
    assert [v.id for v in openstack_conn.block_storage.volumes(limit=2)] == ids
    # 2 + 2 + 1 via volumes_links, then openstacksdk asks once more after the short page.
    assert len(openstack_fake.calls_matching("GET", r"/volumes/detail$")) == 4


def test_volume_list_filters_by_metadata_given_as_a_literal(openstack_fake: FakeOpenStack,
                                                            openstack_conn: Conn) -> None:
    mine = _available_volume(openstack_conn, name="mine", metadata={"cloudbuild:owner": "w1"})
    _available_volume(openstack_conn, name="theirs", metadata={"cloudbuild:owner": "w2"})
    # ``properties`` is openstacksdk's name for Cinder's ``metadata`` filter; it must be a string
    # (a dict is flattened to its keys by requests and then filtered client side to nothing).
    found = openstack_conn.block_storage.volumes(properties=json.dumps({"cloudbuild:owner": "w1"}))
    assert [v.id for v in found] == [mine.id]
    with pytest.raises(os_exceptions.BadRequestException, match="Invalid metadata filter"):
        list(openstack_conn.block_storage.volumes(metadata={"cloudbuild:owner": "w1"}))


def test_volume_metadata_set_get_delete(openstack_conn: Conn) -> None:
    vol = _available_volume(openstack_conn, metadata={"a": "1"})
    openstack_conn.block_storage.set_volume_metadata(vol, b="2")
    assert openstack_conn.block_storage.fetch_volume_metadata(vol).metadata == {"a": "1", "b": "2"}
    openstack_conn.block_storage.delete_volume_metadata(vol, keys=["a"])
    assert openstack_conn.block_storage.get_volume(vol).metadata == {"b": "2"}


def test_volume_delete_goes_deleting_then_404(openstack_fake: FakeOpenStack, openstack_conn: Conn) -> None:
    vol = _available_volume(openstack_conn)
    openstack_conn.block_storage.delete_volume(vol)
    assert openstack_conn.block_storage.get_volume(vol).status == "deleting"
    openstack_conn.block_storage.wait_for_delete(vol, interval=0.01, wait=5)
    with pytest.raises(os_exceptions.NotFoundException):
        openstack_conn.block_storage.get_volume(vol)
    assert openstack_fake.resources() == {"servers": [], "volumes": []}


def test_volume_quota_answers_413_volume_limit_exceeded() -> None:
    with running_fake(quotas=Quotas(volumes=1)) as fake:
        conn = openstack.connect(**fake.connect_kwargs())
        conn.block_storage.create_volume(size=1)
        with pytest.raises(os_exceptions.HttpException, match="VolumeLimitExceeded") as err:
            conn.block_storage.create_volume(size=1)
        assert err.value.status_code == 413


def test_in_use_volume_cannot_be_deleted(openstack_fake: FakeOpenStack, openstack_conn: Conn) -> None:
    root = _available_volume(openstack_conn)
    _booted_server(openstack_conn, root)
    with pytest.raises(os_exceptions.BadRequestException, match="Volume status must be available"):
        openstack_conn.block_storage.delete_volume(root)


# -- Nova servers ---------------------------------------------------------------------------------


def test_server_boots_from_volumes_given_as_bdm_v2(openstack_fake: FakeOpenStack, openstack_conn: Conn) -> None:
    root = _available_volume(openstack_conn, name="root")
    swap = _available_volume(openstack_conn, name="swap")
    server = openstack_conn.compute.create_server(
        name="build-1", flavor_id="2", image_id="", networks="none", metadata={"cloudbuild:build": "b1"},
        user_data=base64.b64encode(b"#!/bin/sh\necho hi\n").decode(), availability_zone="az2",
        block_device_mapping=[
            {"boot_index": -1, "uuid": swap.id, "source_type": "volume", "destination_type": "volume"},
            {"boot_index": 0, "uuid": root.id, "source_type": "volume", "destination_type": "volume",
             "delete_on_termination": False},
        ])
    assert openstack_conn.compute.get_server(server).status == "BUILD"
    server = openstack_conn.compute.wait_for_server(server, **timings.SDK_WAIT)
    assert (server.status, server.vm_state, server.task_state, server.power_state) == ("ACTIVE", "active", None, 1)
    assert server.availability_zone == "az2"
    assert server.metadata == {"cloudbuild:build": "b1"}
    assert sorted(v.id for v in server.attached_volumes) == sorted([root.id, swap.id])
    assert openstack_fake.server(server.id).user_data == b"#!/bin/sh\necho hi\n"
    devices = {a.volume_id: a.device for a in openstack_conn.compute.volume_attachments(server)}
    assert devices == {root.id: "/dev/vda", swap.id: "/dev/vdb"}
    root = openstack_conn.block_storage.get_volume(root)
    assert root.status == "in-use"
    assert root.attachments[0]["server_id"] == server.id
    assert root.attachments[0]["device"] == "/dev/vda"


def test_networks_are_required_at_current_microversions(openstack_conn: Conn) -> None:
    root = _available_volume(openstack_conn)
    with pytest.raises(os_exceptions.BadRequestException, match="'networks' is a required property"):
        openstack_conn.compute.create_server(name="x", flavor_id="2", block_device_mapping=[
            {"boot_index": 0, "uuid": root.id, "source_type": "volume", "destination_type": "volume"}])


def test_server_list_filters_by_name_and_finds_flavor_and_image_by_name(openstack_fake: FakeOpenStack,
                                                                         openstack_conn: Conn) -> None:
    server = _booted_server(openstack_conn, _available_volume(openstack_conn), name="build-7")
    assert [s.id for s in openstack_conn.compute.servers(name="^build-7$")] == [server.id]
    assert {s.id for s in openstack_conn.compute.servers()} == {server.id, openstack_fake.worker_server_id}
    assert openstack_conn.compute.find_flavor("m1.large").vcpus == 4
    image = openstack_conn.image.find_image("cirros")
    assert openstack_conn.image.get_image(image.id).name == "cirros"


def test_server_metadata_filter_is_client_side_in_openstacksdk(openstack_fake: FakeOpenStack,
                                                             openstack_conn: Conn) -> None:
    mine = _booted_server(openstack_conn, _available_volume(openstack_conn), metadata={"cloudbuild:owner": "w1"})
    assert [s.id for s in openstack_conn.compute.servers(metadata={"cloudbuild:owner": "w1"})] == [mine.id]
    assert openstack_fake.calls[-1] == ("GET", "/compute/v2.1/servers/detail", 200)  # Nova has no such filter


def test_server_metadata_set_get_delete(openstack_conn: Conn) -> None:
    server = _booted_server(openstack_conn, _available_volume(openstack_conn))
    openstack_conn.compute.set_server_metadata(server, **{"cloudbuild:expires": "2030-01-01T00:00:00Z"})
    assert openstack_conn.compute.fetch_server_metadata(server).metadata == {
        "cloudbuild:expires": "2030-01-01T00:00:00Z"}
    openstack_conn.compute.delete_server_metadata(server, ["cloudbuild:expires"])
    assert openstack_conn.compute.get_server(server).metadata == {}


def test_stop_goes_through_powering_off_to_shutoff_and_start_back(openstack_conn: Conn) -> None:
    server = _booted_server(openstack_conn, _available_volume(openstack_conn))
    openstack_conn.compute.stop_server(server)
    seen = openstack_conn.compute.get_server(server)
    assert (seen.status, seen.task_state) == ("ACTIVE", "powering-off")
    server = openstack_conn.compute.wait_for_server(server, status="SHUTOFF", **timings.SDK_WAIT)
    assert (server.vm_state, server.power_state) == ("stopped", 4)
    with pytest.raises(os_exceptions.ConflictException):
        openstack_conn.compute.stop_server(server)
    openstack_conn.compute.start_server(server)
    assert openstack_conn.compute.wait_for_server(server, status="ACTIVE", **timings.SDK_WAIT).task_state is None


def test_power_off_hook_plays_the_guest_shutting_down(openstack_fake: FakeOpenStack,
                                                      openstack_conn: Conn) -> None:
    server = _booted_server(openstack_conn, _available_volume(openstack_conn))
    openstack_fake.append_console(server.id, "booting\n")
    openstack_fake.power_off(server.id, console="build finished\nreboot: Power down\n")
    assert openstack_conn.compute.get_server(server).status == "SHUTOFF"
    output = openstack_conn.compute.get_server_console_output(server)["output"]
    assert output == "booting\nbuild finished\nreboot: Power down\n"


def test_console_output_length_is_the_last_lines(openstack_fake: FakeOpenStack, openstack_conn: Conn) -> None:
    server = _booted_server(openstack_conn, _available_volume(openstack_conn))
    openstack_fake.append_console(server.id, "".join(f"line {i}\n" for i in range(10)))
    assert openstack_conn.compute.get_server_console_output(server, length=2)["output"] == "line 8\nline 9\n"
    assert openstack_conn.compute.get_server_console_output(server)["output"].count("\n") == 10


def test_delete_server_goes_deleted_then_404_and_releases_volumes(openstack_fake: FakeOpenStack,
                                                                 openstack_conn: Conn) -> None:
    root = _available_volume(openstack_conn)
    server = _booted_server(openstack_conn, root)
    openstack_conn.compute.delete_server(server)
    assert openstack_conn.compute.get_server(server).task_state == "deleting"
    assert openstack_conn.compute.get_server(server).status == "DELETED"
    with pytest.raises(os_exceptions.NotFoundException):
        openstack_conn.compute.get_server(server)
    assert openstack_conn.block_storage.get_volume(root).status == "detaching"
    root = openstack_conn.block_storage.wait_for_status(root, "available", **timings.SDK_WAIT)
    assert root.attachments == []
    openstack_conn.block_storage.delete_volume(root)
    openstack_conn.block_storage.wait_for_delete(root, interval=0.01, wait=5)
    assert openstack_fake.resources() == {"servers": [], "volumes": []}


def test_delete_on_termination_volumes_go_with_the_server(openstack_fake: FakeOpenStack,
                                                          openstack_conn: Conn) -> None:
    root = _available_volume(openstack_conn)
    server = openstack_conn.compute.create_server(name="b", flavor_id="2", networks="none", block_device_mapping=[
        {"boot_index": 0, "uuid": root.id, "source_type": "volume", "destination_type": "volume",
         "delete_on_termination": True}])
    openstack_conn.compute.wait_for_server(server, **timings.SDK_WAIT)
    openstack_conn.compute.delete_server(server)
    openstack_conn.compute.wait_for_delete(server, interval=0.01, wait=5)
    openstack_conn.block_storage.wait_for_delete(root, interval=0.01, wait=5)
    openstack_fake.settle()
    assert openstack_fake.resources() == {"servers": [], "volumes": []}


def test_wait_for_delete_accepts_the_deleted_status(openstack_fake: FakeOpenStack,
                                                    openstack_conn: Conn) -> None:
    server = _booted_server(openstack_conn, _available_volume(openstack_conn))
    openstack_conn.compute.delete_server(server)
    openstack_conn.compute.wait_for_delete(server, interval=0.01, wait=5)
    assert openstack_fake.resources()["servers"] == [server.id]  # DELETED, one more GET removes it


def test_server_can_stick_in_build_until_released(openstack_fake: FakeOpenStack,
                                                   openstack_conn: Conn) -> None:
    root = _available_volume(openstack_conn)
    server = openstack_conn.compute.create_server(name="b", flavor_id="2", networks="none", block_device_mapping=[
        {"boot_index": 0, "uuid": root.id, "source_type": "volume", "destination_type": "volume"}])
    openstack_fake.stick_server(server.id, "BUILD")
    with pytest.raises(os_exceptions.ResourceTimeout):
        openstack_conn.compute.wait_for_server(server, interval=0.01, wait=0.2)
    openstack_fake.release_server(server.id)
    assert openstack_conn.compute.wait_for_server(server, **timings.SDK_WAIT).status == "ACTIVE"


def test_concurrent_clients_see_consistent_state(openstack_fake: FakeOpenStack, openstack_conn: Conn) -> None:
    def make_and_attach(i: int) -> str:
        conn = openstack.connect(**openstack_fake.connect_kwargs())
        vol = _available_volume(conn, name=f"v{i}")
        conn.compute.create_volume_attachment(openstack_fake.worker_server_id, vol)
        return conn.block_storage.wait_for_status(vol, "in-use", **timings.SDK_WAIT).attachments[0]["device"]

    with ThreadPoolExecutor(max_workers=6) as pool:
        devices = list(pool.map(make_and_attach, range(6)))
    assert sorted(devices) == [f"/dev/vd{c}" for c in "bcdefg"]  # no device handed out twice


def test_server_error_hook_fails_the_wait(openstack_fake: FakeOpenStack, openstack_conn: Conn) -> None:
    server = openstack_conn.compute.create_server(name="b", flavor_id="2", networks="none", image_id=(
        openstack_conn.image.find_image("cirros").id))
    openstack_fake.set_server_error(server.id, "No valid host was found.")
    with pytest.raises(os_exceptions.ResourceFailure):
        openstack_conn.compute.wait_for_server(server, **timings.SDK_WAIT)
    assert openstack_conn.compute.get_server(server).fault["message"] == "No valid host was found."


def test_vanished_server_is_404_and_its_volumes_are_available(openstack_fake: FakeOpenStack,
                                                              openstack_conn: Conn) -> None:
    root = _available_volume(openstack_conn)
    server = _booted_server(openstack_conn, root)
    openstack_fake.vanish_server(server.id)
    assert openstack_conn.compute.find_server(server.id) is None
    assert openstack_conn.block_storage.get_volume(root).status == "available"


def test_server_quota_answers_403_forbidden() -> None:
    with running_fake(quotas=Quotas(instances=1)) as fake:  # the worker's own server uses the one
        conn = openstack.connect(**fake.connect_kwargs())
        with pytest.raises(os_exceptions.ForbiddenException, match="Quota exceeded for instances"):
            conn.compute.create_server(name="b", flavor_id="2", networks="none",
                                       image_id=conn.image.find_image("cirros").id)


# -- attachments ----------------------------------------------------------------------------------


def test_attach_then_detach_a_volume_to_the_worker(openstack_fake: FakeOpenStack, openstack_conn: Conn) -> None:
    worker = openstack_fake.worker_server_id
    vol = _available_volume(openstack_conn)
    attachment = openstack_conn.compute.create_volume_attachment(worker, vol)
    assert attachment.device == "/dev/vdb"  # the worker boots from vda
    assert attachment.attachment_id  # microversion >= 2.89
    assert openstack_conn.block_storage.get_volume(vol).status == "attaching"
    vol = openstack_conn.block_storage.wait_for_status(vol, "in-use", **timings.SDK_WAIT)
    assert vol.attachments[0]["server_id"] == worker
    assert vol.attachments[0]["attachment_id"] == attachment.attachment_id
    assert vol.attachments[0]["device"] == "/dev/vdb"
    assert openstack_conn.compute.get_volume_attachment(worker, vol).device == "/dev/vdb"

    openstack_conn.compute.delete_volume_attachment(worker, vol)
    assert openstack_conn.block_storage.get_volume(vol).status == "detaching"
    vol = openstack_conn.block_storage.wait_for_status(vol, "available", **timings.SDK_WAIT)
    assert vol.attachments == []
    assert list(openstack_conn.compute.volume_attachments(worker)) == []


def test_attach_of_a_volume_that_is_not_available_is_refused(openstack_fake: FakeOpenStack,
                                                             openstack_conn: Conn) -> None:
    vol = openstack_conn.block_storage.create_volume(size=1)  # still creating
    with pytest.raises(os_exceptions.BadRequestException, match="status must be 'available'"):
        openstack_conn.compute.create_volume_attachment(openstack_fake.worker_server_id, vol)


def test_volume_can_stick_in_attaching_until_released(openstack_fake: FakeOpenStack,
                                                      openstack_conn: Conn) -> None:
    vol = _available_volume(openstack_conn)
    openstack_fake.stick_volume(vol.id, "attaching")
    openstack_conn.compute.create_volume_attachment(openstack_fake.worker_server_id, vol)
    with pytest.raises(os_exceptions.ResourceTimeout):
        openstack_conn.block_storage.wait_for_status(vol, "in-use", interval=0.01, wait=0.2)
    openstack_fake.release_volume(vol.id)
    assert openstack_conn.block_storage.wait_for_status(vol, "in-use", **timings.SDK_WAIT).status == "in-use"


def test_volume_can_stick_in_detaching(openstack_fake: FakeOpenStack, openstack_conn: Conn) -> None:
    worker = openstack_fake.worker_server_id
    vol = _available_volume(openstack_conn)
    openstack_conn.compute.create_volume_attachment(worker, vol)
    openstack_conn.block_storage.wait_for_status(vol, "in-use", **timings.SDK_WAIT)
    openstack_fake.stick_volume(vol.id, "detaching")
    openstack_conn.compute.delete_volume_attachment(worker, vol)
    with pytest.raises(os_exceptions.ResourceTimeout):
        openstack_conn.block_storage.wait_for_status(vol, "available", interval=0.01, wait=0.2)
    assert openstack_conn.block_storage.get_volume(vol).status == "detaching"


def test_failed_attach_flips_back_to_available_once(openstack_fake: FakeOpenStack, openstack_conn: Conn) -> None:
    worker = openstack_fake.worker_server_id
    vol = _available_volume(openstack_conn)
    openstack_fake.fail_next_attach(vol.id)
    openstack_conn.compute.create_volume_attachment(worker, vol)
    assert openstack_conn.block_storage.get_volume(vol).status == "attaching"
    assert openstack_conn.block_storage.wait_for_status(vol, "available", **timings.SDK_WAIT).attachments == []
    assert list(openstack_conn.compute.volume_attachments(worker)) == []
    openstack_conn.compute.create_volume_attachment(worker, vol)  # the second attempt works
    assert openstack_conn.block_storage.wait_for_status(vol, "in-use", **timings.SDK_WAIT).status == "in-use"


# -- faults ---------------------------------------------------------------------------------------


def test_injected_5xx_is_seen_n_times_then_the_call_works(openstack_fake: FakeOpenStack,
                                                          openstack_conn: Conn) -> None:
    openstack_fake.inject("POST", r"/volumes$", status=503, times=2)
    for _ in range(2):
        with pytest.raises(os_exceptions.HttpException) as err:
            openstack_conn.block_storage.create_volume(size=1)
        assert err.value.status_code == 503
    assert openstack_conn.block_storage.create_volume(size=1).status == "creating"
    assert [c.status for c in openstack_fake.calls_matching("POST", r"/volumes$")] == [503, 503, 202]


def test_injected_connection_reset_raises_connect_failure(openstack_fake: FakeOpenStack,
                                                          openstack_conn: Conn) -> None:
    openstack_fake.inject_reset("GET", r"/servers/detail$")
    # keystoneauth's ConnectFailure, not an openstacksdk exception: retry policies must name it.
    with pytest.raises(ks_exceptions.ConnectFailure):
        list(openstack_conn.compute.servers())
    assert len(list(openstack_conn.compute.servers())) == 1
    assert [c.status for c in openstack_fake.calls_matching("GET", r"/servers/detail$")] == [None, 200]


def test_injected_nova_quota_errors(openstack_fake: FakeOpenStack, openstack_conn: Conn) -> None:
    openstack_fake.inject_quota("POST", r"/compute/v2\.1/servers$", status=403)
    with pytest.raises(os_exceptions.ForbiddenException, match="Quota exceeded"):
        openstack_conn.compute.create_server(name="b", flavor_id="2", networks="none", image_id="x")
    openstack_fake.inject_quota("POST", r"/compute/v2\.1/servers$", status=413)
    with pytest.raises(os_exceptions.HttpException) as err:
        openstack_conn.compute.create_server(name="b", flavor_id="2", networks="none", image_id="x")
    assert err.value.status_code == 413
    assert "overLimit" in err.value.response.json()


def test_injected_cinder_quota_error(openstack_fake: FakeOpenStack, openstack_conn: Conn) -> None:
    openstack_fake.inject_quota("POST", r"/volume/v3/.*/volumes$")
    with pytest.raises(os_exceptions.HttpException, match="VolumeLimitExceeded") as err:
        openstack_conn.block_storage.create_volume(size=1)
    assert err.value.status_code == 413


def test_unknown_endpoints_answer_501_and_are_recorded(openstack_fake: FakeOpenStack,
                                                       openstack_conn: Conn) -> None:
    response = openstack_conn.compute.get("/os-hypervisors")
    assert response.status_code == 501
    assert "/compute/v2.1/os-hypervisors" in response.json()["notImplemented"]["message"]
    with pytest.raises(os_exceptions.HttpException) as err:
        openstack_conn.compute.reboot_server(openstack_fake.worker_server_id, "SOFT")
    assert err.value.status_code == 501
    assert [(c.method, c.path.rsplit("/", 1)[-1], c.detail) for c in openstack_fake.unknown_calls] == [
        ("GET", "os-hypervisors", "no such endpoint"), ("POST", "action", "server action 'reboot'")]
    openstack_fake.unknown_calls.clear()  # expected here; the fixture fails any other test with some


# -- metadata service and lifecycle ---------------------------------------------------------------


def test_metadata_service_names_the_workers_own_active_server(openstack_fake: FakeOpenStack,
                                                              openstack_conn: Conn) -> None:
    doc = requests.get(f"{openstack_fake.metadata_url}/openstack/latest/meta_data.json", timeout=5).json()
    assert doc["uuid"] == openstack_fake.worker_server_id
    assert doc["availability_zone"] == "nova"
    assert openstack_conn.compute.get_server(doc["uuid"]).status == "ACTIVE"


def test_fake_binds_loopback_and_stops_cleanly() -> None:
    with running_fake() as fake:
        host, port = fake.url.removeprefix("http://").split(":")
        assert host == "127.0.0.1"
        conn = openstack.connect(**fake.connect_kwargs())
        list(conn.compute.flavors())  # leaves a keep-alive connection open
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=1):
        pass
    # The keep-alive connection was shut down with the server: no handler thread is left behind.
    assert not [t for t in threading.enumerate() if "process_request" in t.name and t.is_alive()]


def test_observers_see_volumes_created_attached_detached_and_servers_booted(openstack_fake: FakeOpenStack,
                                                                           openstack_conn: Conn) -> None:
    events: list[tuple[str, ...]] = []
    openstack_fake.on_volume_created(lambda v: events.append(("created", v.id)))
    openstack_fake.on_attached(lambda s, v, b: events.append(("attached", s.id, v.id, b.device)))
    openstack_fake.on_detached(lambda s, v: events.append(("detached", s.id, v.id)))
    openstack_fake.on_booted(lambda s: events.append(("booted", s.id)))
    worker = openstack_fake.worker_server_id
    root = _available_volume(openstack_conn)
    server = _booted_server(openstack_conn, root)
    data = _available_volume(openstack_conn)
    openstack_conn.compute.create_volume_attachment(worker, data)
    openstack_conn.block_storage.wait_for_status(data, "in-use", **timings.SDK_WAIT)
    openstack_conn.compute.delete_volume_attachment(worker, data)
    openstack_conn.block_storage.wait_for_status(data, "available", **timings.SDK_WAIT)
    assert events == [
        ("created", root.id), ("attached", server.id, root.id, "/dev/vda"), ("booted", server.id),
        ("created", data.id), ("attached", worker, data.id, "/dev/vdb"), ("detached", worker, data.id),
    ]


def test_a_crash_inside_the_fake_answers_500_and_is_kept(openstack_fake: FakeOpenStack, openstack_conn: Conn,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openstack_fake.cloud, "flavors", None)  # sabotage: iterating None raises
    with pytest.raises(os_exceptions.HttpException) as err:
        list(openstack_conn.compute.flavors())
    assert err.value.status_code == 500
    assert "TypeError" in openstack_fake.internal_errors[0]
    openstack_fake.internal_errors.clear()  # expected here; the fixture fails any other test with some
