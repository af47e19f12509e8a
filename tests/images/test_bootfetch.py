"""The image's boot unit program (guest side, stdlib only) against the fake IMDSv2 on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudbuild.images import bootfetch, clouds
from tests.fakes.imds import FakeImds

HOOK = "#!/bin/sh\n# cloudbuild-builder-hook v1\necho ran > {out}\n"


@pytest.fixture(name="imds")
def imds_fixture() -> Iterator[FakeImds]:
    fake = FakeImds({})
    fake.start()
    yield fake
    fake.stop()


def address(imds: FakeImds) -> tuple[str, int]:
    host, port = imds.endpoint.rstrip("/").removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def test_the_markers_are_the_clouds_own() -> None:
    assert clouds.markers("ec2") == ["# cloudbuild-builder-hook v1"]
    assert clouds.markers("openstack")[0].startswith("# cloudbuild builder boot hook")


def test_ec2_user_data_needs_a_token_first(imds: FakeImds) -> None:
    imds.user_data = "#!/bin/sh\n"
    assert bootfetch.ec2_user_data(*address(imds)) == b"#!/bin/sh\n"
    assert [(m, p) for m, p, _ in imds.requests] == [
        ("PUT", "/latest/api/token"),
        ("GET", "/latest/user-data"),
    ]


def test_no_user_data_is_no_hook_and_no_retrying(imds: FakeImds) -> None:
    host, port = address(imds)
    assert bootfetch.fetch_with_deadline(lambda: bootfetch.ec2_user_data(host, port), 30) is None
    assert len(imds.requests) == 2  # a 404 is an answer, not an outage


def test_a_busy_metadata_service_is_asked_again(imds: FakeImds) -> None:
    imds.user_data = "x"
    imds.fail_next = 2
    host, port = address(imds)
    assert bootfetch.fetch_with_deadline(lambda: bootfetch.ec2_user_data(host, port), 30) == b"x"


@pytest.mark.parametrize(
    ("text", "runs"),
    [
        ("#!/bin/sh\n# cloudbuild-builder-hook v1\n", True),
        ("# cloudbuild-builder-hook v1\n", False),  # not a script
        ("#!/bin/sh\necho hi\n", False),
        ("#!/bin/sh\n# cloudbuild-builder-hook v2\n", False),
        ("#!/bin/sh\n\n\n\n# cloudbuild-builder-hook v1\n", False),  # too far down
    ],
)
def test_only_marked_scripts_run(text: str, runs: bool) -> None:
    assert bootfetch.has_marker(text.encode(), ["# cloudbuild-builder-hook v1"]) is runs


def test_main_runs_a_marked_hook_and_ignores_others(
    imds: FakeImds, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    markers = tmp_path / "markers"
    markers.write_text("# cloudbuild-builder-hook v1\n")
    out = tmp_path / "ran"
    monkeypatch.setattr(bootfetch, "HOOK_PATH", tmp_path / "hook")
    host, port = address(imds)
    argv = ["--cloud", "ec2", "--markers", str(markers), "--metadata", f"{host}:{port}", "--wait", "5"]
    imds.user_data = HOOK.format(out=out).replace("cloudbuild-builder-hook v1", "something else")
    assert bootfetch.main(argv) == 0 and not out.exists()
    imds.user_data = HOOK.format(out=out)
    assert bootfetch.main(argv) == 0 and out.read_text() == "ran\n"
