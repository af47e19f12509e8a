"""`cloudbuild image upload ec2` against moto's server: the EBS direct APIs write the snapshot
block by block (zero blocks skipped), RegisterImage makes a UEFI, ENA AMI of it; a failure
mid-upload leaves no snapshot behind."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest

from cloudbuild.errors import UsageError
from cloudbuild.images import upload_ec2
from tests.fakes.moto_server import REGION, Aws

BLOCK = upload_ec2.BLOCK


@pytest.fixture(name="ebs_env")
def ebs_env_fixture(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> Aws:
    monkeypatch.setenv("AWS_ENDPOINT_URL_EBS", aws.url)
    return aws


def ebs(aws: Aws) -> Any:
    return boto3.Session().client("ebs", region_name=REGION, endpoint_url=aws.url)


def an_image(path: Path) -> dict[int, bytes]:
    """A sparse 3 MiB + 100 bytes image with data in blocks 0, 3 and the short last one."""
    blocks = {0: b"\x01" * BLOCK, 3: bytes(range(256)) * (BLOCK // 256), 6: b"tail" * 25}
    with open(path, "wb") as f:
        f.truncate(6 * BLOCK + 100)
        for index, data in blocks.items():
            f.seek(index * BLOCK)
            f.write(data)
    return blocks


def test_upload_writes_the_non_zero_blocks_and_registers_a_uefi_ena_ami(
    ebs_env: Aws, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "builder.raw"
    blocks = an_image(image)
    sent: list[dict[str, Any]] = []
    ec2 = ebs_env.client()
    # moto keeps only some RegisterImage fields (not EnaSupport, not the mapping): check what was sent
    ec2.meta.events.register(
        "provide-client-params.ec2.RegisterImage", lambda params, **_: sent.append(params)
    )
    monkeypatch.setattr(upload_ec2, "ec2_client", lambda: ec2)
    ami = upload_ec2.upload(image, name="cloudbuild-builder-test", progress=False)
    described = ec2.describe_images(ImageIds=[ami])["Images"][0]
    assert described["Name"] == "cloudbuild-builder-test"
    assert described.get("BootMode") == "uefi"
    assert sent[0]["EnaSupport"] is True and sent[0]["BootMode"] == "uefi"
    assert sent[0]["RootDeviceName"] == sent[0]["BlockDeviceMappings"][0]["DeviceName"]
    snapshot = sent[0]["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    assert ec2.describe_snapshots(SnapshotIds=[snapshot])["Snapshots"][0]["State"] == "completed"
    listed = ebs(ebs_env).list_snapshot_blocks(SnapshotId=snapshot)["Blocks"]
    assert sorted(b["BlockIndex"] for b in listed) == sorted(blocks)  # zero blocks never sent
    for block in listed:
        got = ebs(ebs_env).get_snapshot_block(
            SnapshotId=snapshot, BlockIndex=block["BlockIndex"], BlockToken=block["BlockToken"]
        )
        data = got["BlockData"].read()
        assert data == blocks[block["BlockIndex"]].ljust(BLOCK, b"\0")
        assert base64.b64decode(got["Checksum"]) == upload_ec2._sha256(data)


def test_a_failure_mid_upload_deletes_the_snapshot(
    ebs_env: Aws, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "builder.raw"
    an_image(image)
    ec2 = ebs_env.client()
    before = {s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]}
    real = upload_ec2.put_blocks

    def broken(*args: Any) -> Any:
        real(*args)
        raise RuntimeError("connection lost for good")

    monkeypatch.setattr(upload_ec2, "put_blocks", broken)
    with pytest.raises(RuntimeError):
        upload_ec2.upload(image, name="cloudbuild-broken", progress=False)
    after = {s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]}
    assert after == before
    assert not ec2.describe_images(Filters=[{"Name": "name", "Values": ["cloudbuild-broken"]}])["Images"]


def test_qcow2_is_refused_with_the_fix(tmp_path: Path) -> None:
    image = tmp_path / "builder.qcow2"
    image.write_bytes(upload_ec2.QCOW2_MAGIC + b"\0" * 100)
    with pytest.raises(UsageError, match="--format raw"):
        upload_ec2.check_raw(image)


def test_the_cli_names_a_missing_file(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cloudbuild", "image", "upload", "ec2", str(tmp_path / "nope.raw")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert "FILE" in done.stderr and "nope.raw" in done.stderr


def test_bad_options_exit_1_with_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cloudbuild",
            "image",
            "build",
            "worker",
            "--cloud",
            "ec2",
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert "invalid choice: 'worker'" in done.stderr and len(done.stderr.strip().splitlines()) == 1
