"""SQS + S3 for the worker tests: moto's server over real HTTP (the `aws` fixture), found by the
code under test through `AWS_ENDPOINT_URL`, as production finds a private endpoint."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from cloudbuild.worker.s3store import S3Store
from cloudbuild.worker.sqsqueue import SqsQueue
from tests.fakes.moto_server import REGION, Aws
from tests.worker.workerlib import Farm

BUCKET = "builds"
QUEUE = "jobs"
DLQ = "jobs-dead"


@dataclass
class AwsQueues:
    sqs: Any
    s3: Any
    queue_url: str
    dlq_url: str

    def dead(self) -> list[dict[str, Any]]:
        """Every message in the dead-letter queue (received and made visible again)."""
        found = self.sqs.receive_message(
            QueueUrl=self.dlq_url, MaxNumberOfMessages=10, VisibilityTimeout=0,
            MessageAttributeNames=["All"],
        ).get("Messages", [])  # fmt: skip
        return list(found)

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def make_queues(aws: Aws, monkeypatch: pytest.MonkeyPatch, *, max_receive: int = 3) -> AwsQueues:
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws.url)
    session = boto3.Session()
    sqs = session.client("sqs", region_name=REGION, endpoint_url=aws.url)
    s3 = session.client("s3", region_name=REGION, endpoint_url=aws.url)
    dlq_url = sqs.create_queue(QueueName=DLQ)["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    policy = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": max_receive})
    queue_url = sqs.create_queue(QueueName=QUEUE, Attributes={"RedrivePolicy": policy})["QueueUrl"]
    s3.create_bucket(Bucket=BUCKET)
    return AwsQueues(sqs, s3, queue_url, dlq_url)


@pytest.fixture(name="aws_queues")
def aws_queues_fixture(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> AwsQueues:
    return make_queues(aws, monkeypatch)


class AwsFarm(Farm):
    """The worker farm of workerlib over sqs:// and s3:// instead of dir://."""

    @property
    def queue_url(self) -> str:
        return f"sqs://{QUEUE}?wait=1"

    @property
    def store_url(self) -> str:
        return f"s3://{BUCKET}/farm"

    @property
    def queue(self) -> SqsQueue:  # type: ignore[override]
        return SqsQueue(self.queue_url)

    @property
    def store(self) -> S3Store:  # type: ignore[override]
        return S3Store(self.store_url)


@pytest.fixture(name="aws_farm")
def aws_farm_fixture(aws_queues: AwsQueues, tmp_path: Path, cache: Path) -> Iterator[AwsFarm]:
    f = AwsFarm(tmp_path, cache)
    yield f
    f.stop_all()
