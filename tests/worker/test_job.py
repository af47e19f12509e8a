"""The job document and the operator's allowance: every refusal names what it refuses."""

from __future__ import annotations

import json

import pytest

from cloudbuild.errors import UsageError
from cloudbuild.options import VmOptions
from cloudbuild.worker.job import MAX_JOB_BYTES, Allowance, Job, JobRejected, parse

KEY = "sha256-" + "a" * 64


def doc(**changes: object) -> bytes:
    base: dict[str, object] = {"version": 1, "id": "j-1", "recipe": KEY}
    base.update(changes)
    return json.dumps({k: v for k, v in base.items() if v is not None}).encode()


def test_a_job_round_trips_through_its_document() -> None:
    job = Job(id="j-1", recipe=KEY, options={"jobs": "2"}, timeout=60, labels={"team": "x"})
    assert parse(job.to_bytes()) == job


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (doc(version=2), "version 2 is unknown"),
        (doc(id=None), "'id' is a required property"),
        (doc(recipe="../../etc/passwd"), "field 'recipe'"),
        (doc(rootfs="/var/lib/images/x.img"), "field 'rootfs'"),
        (doc(color="red"), "Additional properties are not allowed ('color'"),
        (doc(timeout=-1), "field 'timeout'"),
        (doc(options={"jobs": ["1"]}), "field 'options.jobs'"),
        (b"[1, 2]", "is not of type 'object'"),
        (b" " * (MAX_JOB_BYTES + 1), f"over the limit of {MAX_JOB_BYTES}"),
    ],
)
def test_malformed_documents_are_rejected_with_the_field(body: bytes, reason: str) -> None:
    with pytest.raises(JobRejected) as info:
        parse(body)
    assert reason in str(info.value)


def test_only_allowed_options_within_limits_reach_the_build() -> None:
    allowance = Allowance.parse(["vm-memory=1G", "jobs"])
    options = allowance.apply(Job(id="j", recipe=KEY, options={"vm-memory": "512", "jobs": "4"}), VmOptions())
    assert (options.vm_memory, options.jobs) == (512, 4)
    with pytest.raises(JobRejected, match=r"'--vm-memory' is 2G, over this worker's limit of 1024"):
        allowance.apply(Job(id="j", recipe=KEY, options={"vm-memory": "2G"}), VmOptions())


@pytest.mark.parametrize(
    "option", ["vm-type", "vm-volumes", "ec2-builder-ami", "root", "vm-disk", "build-timeout"]
)
def test_an_option_the_operator_did_not_allow_is_rejected_by_name(option: str) -> None:
    allowance = Allowance.parse(["vm-memory"])
    with pytest.raises(JobRejected, match=f"job option '--{option}' is not allowed on this worker"):
        allowance.apply(Job(id="j", recipe=KEY, options={option: "x"}), VmOptions())


def test_a_bad_value_of_an_allowed_option_is_rejected() -> None:
    with pytest.raises(JobRejected, match="--jobs: 'many' is not a positive number"):
        Allowance.parse(["jobs"]).apply(Job(id="j", recipe=KEY, options={"jobs": "many"}), VmOptions())


def test_a_job_timeout_beyond_the_operators_is_rejected() -> None:
    base = VmOptions(build_timeout=600)
    assert Allowance().apply(Job(id="j", recipe=KEY, timeout=60), base).build_timeout == 60
    with pytest.raises(
        JobRejected, match="field 'timeout' is 900s, over this worker's --build-timeout of 600s"
    ):
        Allowance().apply(Job(id="j", recipe=KEY, timeout=900), base)


def test_the_operator_cannot_allow_privileged_options() -> None:
    with pytest.raises(UsageError, match="jobs may never set 'vm-volumes'"):
        Allowance.parse(["vm-volumes"])
