"""pytest fixtures around the fake OpenStack cloud (tests/fakes/openstack.py).

A test module loads them with (a plain import would trip ruff's F811 on every fixture argument)::

    pytest_plugins = ["tests.cloud.openstack_fixtures"]
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import openstack
import openstack.connection
import pytest

from tests.fakes.openstack import FakeOpenStack


@pytest.fixture
def openstack_fake() -> Iterator[FakeOpenStack]:
    """A started fake cloud; fails the test afterwards if any call hit an endpoint it does not know."""
    with FakeOpenStack() as fake:
        yield fake
        assert not fake.internal_errors, "the fake OpenStack crashed:\n" + "\n".join(fake.internal_errors)
        assert not fake.unknown_calls, (
            f"calls the fake OpenStack does not implement: {fake.unknown_calls}; implement them in "
            "tests/fakes/openstack.py or clear fake.unknown_calls in a test that expects them")


@pytest.fixture
def openstack_conn(openstack_fake: FakeOpenStack) -> Iterator[openstack.connection.Connection]:
    """A real openstacksdk Connection to the fake, from explicit arguments."""
    conn = openstack.connect(**openstack_fake.connect_kwargs())
    yield conn
    conn.close()


@pytest.fixture
def openstack_cloud_env(openstack_fake: FakeOpenStack, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch) -> str:
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
