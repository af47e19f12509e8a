"""pytest fixtures around the fake OpenStack cloud (tests/fakes/openstack.py).

tests/conftest.py loads them as a plugin for every test module.

None of them is autouse (a plugin's fixtures are visible to every test). A module that runs the
backend against the emulated worker host asks for them with
``pytestmark = pytest.mark.usefixtures("fast_sleeps", "emu")`` and tunes them with module-level
constants:

- ``EMULATION_GUEST``: the builder (`openstack_emulation.Guest`) that runs when a builder server
  boots; default none (builders just stay ACTIVE);
- ``EMULATION_JOIN_TIMEOUT``: seconds ``emu``'s teardown waits for running guests (default 60);
- ``RETRY_SLEEP_CAP``: the longest sleep ``cloudbuild.retry`` may take (default 0.02 s).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import openstack
import openstack.connection
import pytest

from tests.cloud.openstack_emulation import Emulation
from tests.fakes import timings
from tests.fakes.openstack import FakeOpenStack


@pytest.fixture
def openstack_fake() -> Iterator[FakeOpenStack]:
    """A started fake cloud; fails the test afterwards if any call hit an endpoint it does not know."""
    with FakeOpenStack() as fake:
        yield fake
        assert not fake.internal_errors, "the fake OpenStack crashed:\n" + "\n".join(fake.internal_errors)
        assert not fake.unknown_calls, (
            f"calls the fake OpenStack does not implement: {fake.unknown_calls}; implement them in "
            "tests/fakes/openstack.py or clear fake.unknown_calls in a test that expects them"
        )


@pytest.fixture
def openstack_conn(openstack_fake: FakeOpenStack) -> Iterator[openstack.connection.Connection]:
    """A real openstacksdk Connection to the fake, from explicit arguments."""
    conn = openstack.connect(**openstack_fake.connect_kwargs())
    yield conn
    conn.close()


@pytest.fixture
def openstack_cloud_env(
    openstack_fake: FakeOpenStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """A clouds.yaml for the fake, selected through OS_CLIENT_CONFIG_FILE and OS_CLOUD.

    Returns the cloud name, so ``openstack.connect()`` and ``openstack.connect(cloud=name)`` both work.
    """
    name = "fake"
    path = openstack_fake.write_clouds_yaml(tmp_path / "clouds.yaml", name)
    # Other OS_* variables from the developer's shell would override or mix into the file.
    for var in [v for v in os.environ if v.startswith("OS_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(path))
    monkeypatch.setenv("OS_CLOUD", name)
    return name


# -- the worker host around the fake (tests/cloud/openstack_emulation.py) ---------------------------


@pytest.fixture
def fast_sleeps(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """cloudbuild.retry sleeps at most the module's ``RETRY_SLEEP_CAP`` seconds (default 0.02)."""
    timings.cap_retry_sleeps(monkeypatch, getattr(request.module, "RETRY_SLEEP_CAP", timings.RETRY_SLEEP_CAP))


@pytest.fixture
def emu(
    openstack_fake: FakeOpenStack, openstack_cloud_env: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Emulation]:
    """The fake with the worker host emulated around it (image files, udev, the module's
    ``EMULATION_GUEST`` as builder). Afterwards: the guests ended without crashing, and no
    cloudbuild-tagged server or volume is left in the cloud, nothing attached to the worker."""
    emulation = Emulation(
        openstack_fake, tmp_path / "host", guest=getattr(request.module, "EMULATION_GUEST", None)
    )
    yield emulation
    emulation.join(timeout=getattr(request.module, "EMULATION_JOIN_TIMEOUT", 60.0))
    assert not emulation.errors, emulation.errors
    assert emulation.tagged() == {"servers": [], "volumes": []}, "cloudbuild resources leaked"
    assert emulation.attached_here() == [], "volumes left attached to the worker"
