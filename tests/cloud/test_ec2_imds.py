"""Worker identity from IMDSv2, found through botocore's own metadata settings."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from cloudbuild import retry
from cloudbuild.cloud.ec2.identity import Imds, ImdsError, ImdsSettings, WorkerIdentity
from cloudbuild.errors import ExitCode
from tests.fakes.imds import FakeImds, running_imds


@pytest.fixture
def imds(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeImds]:
    monkeypatch.setattr(retry, "_sleep", lambda s: None)
    with running_imds("i-0123456789abcdef0", "eu-central-1b", "eu-central-1") as fake:
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", fake.endpoint)
        monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
        yield fake


def test_identity_follows_botocore_endpoint_setting(imds: FakeImds):
    settings = ImdsSettings.from_botocore()
    assert settings.endpoint == imds.endpoint
    assert Imds().identity() == WorkerIdentity("i-0123456789abcdef0", "eu-central-1b", "eu-central-1")
    assert imds.requests[0][:2] == ("PUT", "/latest/api/token")


def test_default_endpoint_is_the_link_local_address(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    assert ImdsSettings.from_botocore().endpoint == "http://169.254.169.254/"
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "IPv6")
    assert ImdsSettings.from_botocore().endpoint == "http://[fd00:ec2::254]/"


def test_fake_refuses_reads_without_a_token(imds: FakeImds):
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(imds.endpoint + "latest/meta-data/instance-id", timeout=5)
    assert info.value.code == 401


def test_expired_token_is_refreshed_once(imds: FakeImds):
    client = Imds()
    assert client.get("instance-id") == "i-0123456789abcdef0"
    imds.expire_tokens()
    assert client.get("placement/region") == "eu-central-1"
    assert [r[0] for r in imds.requests].count("PUT") == 2


def test_unavailable_service_is_retried_then_answers(imds: FakeImds):
    imds.fail_next = 2
    assert Imds().identity().instance_id == "i-0123456789abcdef0"


def test_no_metadata_service_is_an_infrastructure_error(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(retry, "_sleep", lambda s: None)
    settings = ImdsSettings("http://127.0.0.1:9/", timeout=0.5, attempts=2)
    with pytest.raises(ImdsError) as info:
        Imds(settings).identity()
    assert info.value.exit_code == ExitCode.INFRA and "does not answer" in str(info.value)


def test_region_falls_back_to_the_zone(imds: FakeImds):
    del imds.metadata["placement/region"]
    assert Imds().identity().region == "eu-central-1"
