"""`cloudbuild image upload ec2 FILE`: a raw image becomes an AMI without S3 or a vmimport role.

As AWS's coldsnap does: the EBS direct APIs write a new snapshot block by block (StartSnapshot,
PutSnapshotBlock for every 512 KiB block that is not all zeros, CompleteSnapshot with the
checksums), then RegisterImage makes it a UEFI, ENA-enabled AMI. Transient failures are retried
per block (cloudbuild.retry); a failure that remains leaves no snapshot behind.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import botocore.config
from botocore.exceptions import ClientError

from cloudbuild import log as cblog
from cloudbuild.errors import InfraError, UsageError
from cloudbuild.images.clouds import ec2_client, ec2_transient, ec2_translate
from cloudbuild.images.progress import Progress
from cloudbuild.retry import call_with_retries, wait_for

log = cblog.get_logger(__name__)

BLOCK = 512 * 1024  # the EBS direct APIs' block size
GIB = 1024**3
QCOW2_MAGIC = b"QFI\xfb"
UPLOAD_THREADS = 8
DEVICE = "/dev/xvda"


def ebs_client() -> Any:
    """Like the EC2 client: endpoint from botocore's settings (AWS_ENDPOINT_URL_EBS), no own retries."""
    config = botocore.config.Config(
        retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=10, read_timeout=120
    )
    return boto3.Session().client("ebs", config=config)


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def check_raw(image: Path) -> int:
    with open(image, "rb") as f:
        if f.read(4) == QCOW2_MAGIC:
            raise UsageError(f"upload ec2: {image} is qcow2; EBS takes raw: build with --format raw")
    size = image.stat().st_size
    if size == 0:
        raise UsageError(f"upload ec2: {image} is empty")
    return size


def _call(fn: Any, op: str, **kwargs: Any) -> Any:
    try:
        return call_with_retries(lambda: fn(**kwargs), is_transient=ec2_transient(), what=op)
    except ClientError as exc:
        raise ec2_translate(exc, op) from exc


def put_blocks(
    ebs: Any, image: Path, snapshot: str, size: int, progress: Progress
) -> list[tuple[int, bytes]]:
    """Write every non-zero block; the (index, sha256) of each, in index order."""
    count = math.ceil(size / BLOCK)

    def put(index: int) -> tuple[int, bytes] | None:
        with open(image, "rb") as f:
            f.seek(index * BLOCK)
            data = f.read(BLOCK).ljust(BLOCK, b"\0")
        progress.add(BLOCK)
        if not any(data):
            return None  # a new snapshot reads zeros where no block was written
        digest = _sha256(data)
        _call(
            ebs.put_snapshot_block,
            "PutSnapshotBlock",
            SnapshotId=snapshot,
            BlockIndex=index,
            BlockData=data,
            DataLength=BLOCK,
            Checksum=_b64(digest),
            ChecksumAlgorithm="SHA256",
        )
        return index, digest

    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
        written = [r for r in pool.map(put, range(count)) if r is not None]
    return sorted(written)


def upload(image: Path, *, name: str, progress: bool = True, timeout: float = 3600.0) -> str:
    """Upload `image` (raw) as a snapshot and register it; returns the AMI id."""
    size = check_raw(image)
    ebs, ec2 = ebs_client(), ec2_client()
    gib = math.ceil(size / GIB)
    snapshot: str = _call(
        ebs.start_snapshot,
        "StartSnapshot",
        VolumeSize=gib,
        Description=f"cloudbuild image {name}",
        Tags=[{"Key": "Name", "Value": name}],
        ClientToken=hashlib.sha256(
            f"{name} {image.resolve()} {os.stat(image).st_mtime_ns}".encode()
        ).hexdigest()[:64],
    )["SnapshotId"]
    log.info("snapshot started", snapshot=snapshot, gib=gib)
    try:
        bar = Progress(f"upload {image.name}", size, enabled=progress)
        written = put_blocks(ebs, image, snapshot, size, bar)
        bar.finish()
        aggregate = _sha256(b"".join(digest for _, digest in written))
        _call(
            ebs.complete_snapshot,
            "CompleteSnapshot",
            SnapshotId=snapshot,
            ChangedBlocksCount=len(written),
            Checksum=_b64(aggregate),
            ChecksumAlgorithm="SHA256",
            ChecksumAggregationMethod="LINEAR",
        )
        wait_for(
            lambda: _snapshot_completed(ec2, snapshot),
            what=f"snapshot {snapshot} to complete",
            timeout=timeout,
            interval=1.0,
            max_interval=15.0,
        )
        ami: str = _call(
            ec2.register_image,
            "RegisterImage",
            Name=name,
            Architecture="x86_64",
            RootDeviceName=DEVICE,
            BlockDeviceMappings=[
                {
                    "DeviceName": DEVICE,
                    "Ebs": {"SnapshotId": snapshot, "DeleteOnTermination": True, "VolumeType": "gp3"},
                }
            ],
            VirtualizationType="hvm",
            EnaSupport=True,
            BootMode="uefi",
        )["ImageId"]
    except BaseException:
        _delete_snapshot(ec2, snapshot)
        raise
    log.info("image registered", ami=ami, snapshot=snapshot, blocks=len(written))
    return ami


def _snapshot_completed(ec2: Any, snapshot: str) -> bool:
    state = _call(ec2.describe_snapshots, "DescribeSnapshots", SnapshotIds=[snapshot])["Snapshots"][0][
        "State"
    ]
    if state == "error":
        raise InfraError(f"snapshot {snapshot} failed in EBS: upload again")
    return bool(state == "completed")


def _delete_snapshot(ec2: Any, snapshot: str) -> None:
    try:
        _call(ec2.delete_snapshot, "DeleteSnapshot", SnapshotId=snapshot)
    except Exception as exc:  # the original failure matters more; say what is left
        log.error("snapshot left behind: delete it by hand", snapshot=snapshot, error=str(exc))
