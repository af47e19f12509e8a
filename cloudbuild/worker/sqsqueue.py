"""`sqs://QUEUE_NAME_OR_URL[?wait=SECONDS]`: an Amazon SQS standard queue as the job queue.

- claim: ReceiveMessage with long polling (`wait`, default 20 s, the most SQS allows); the
  visibility timeout is the lease, and the receipt handle is the claim's token.
- renew: ChangeMessageVisibility. SQS caps a message's total invisibility at 12 h from its
  receipt, so `fit` refuses at start-up a --build-timeout the cap cannot cover.
- attempts: ApproximateReceiveCount. The dead-letter queue is the queue's redrive policy: the
  worker never deletes a poison job; `dead_letter` gives the message back and SQS moves it to the
  DLQ on its next receive (its receive count then exceeds maxReceiveCount). A queue without a
  redrive policy is refused at start-up, because a poison job would circle forever.
- ack: DeleteMessage, called by the supervisor only after status.json is stored.
- sweep: SQS cannot list in-flight messages; what a dead run held comes back when its lease
  (the visibility timeout) ends.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

from botocore.exceptions import ClientError

from cloudbuild.errors import UsageError
from cloudbuild.worker import aws
from cloudbuild.worker.protocols import Claim, LeaseLost

MAX_INVISIBLE = 12 * 3600.0  # SQS: a message may stay in flight at most this long after its receipt
MAX_VISIBILITY = 43200  # seconds, one ChangeMessageVisibility's limit
MAX_WAIT = 20  # seconds, ReceiveMessage's longest poll
JOB_ID = "cloudbuild-job-id"  # message attribute naming the job (the message id of the protocol)
LOST = frozenset({"ReceiptHandleIsInvalid", "MessageNotInflight", "InvalidParameterValue"})


def parse(url: str) -> tuple[str, int]:
    """`sqs://NAME`, `sqs://https://sqs.REGION.amazonaws.com/ACCOUNT/NAME`, optional `?wait=N`."""
    rest = url.removeprefix("sqs://")
    target, _, query = rest.partition("?")
    params = parse_qs(query)
    try:
        wait = int(params.get("wait", [str(MAX_WAIT)])[0])
    except ValueError:
        wait = -1
    if not 0 <= wait <= MAX_WAIT:
        raise UsageError(f"--queue {url}: wait= takes whole seconds from 0 to {MAX_WAIT}")
    if not target or (("/" in target) and urlsplit(target).scheme not in ("http", "https")):
        raise UsageError(f"--queue {url}: name a queue (sqs://NAME) or give its URL (sqs://https://...)")
    return target, wait


class SqsQueue:
    def __init__(self, url: str, sqs: Any | None = None):
        self.url = url
        target, self.wait = parse(url)
        self.sqs = sqs or aws.client("sqs")
        if "/" in target:
            self.queue_url = target
        else:
            with aws.reaching(url, "GetQueueUrl"):
                try:
                    self.queue_url = self.sqs.get_queue_url(QueueName=target)["QueueUrl"]
                except ClientError as exc:
                    if "NonExistentQueue" in aws.code(exc) or aws.code(exc) == "QueueDoesNotExist":
                        raise UsageError(f"--queue {url}: no SQS queue named {target!r} here") from exc
                    raise

    # -- start-up checks ----------------------------------------------------------------------
    def max_deliveries(self) -> int:
        """maxReceiveCount of the queue's redrive policy (refused when it has none)."""
        with aws.reaching(self.url, "GetQueueAttributes"):
            attrs = self.sqs.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=["RedrivePolicy"])
        policy = attrs.get("Attributes", {}).get("RedrivePolicy")
        if not policy:
            raise UsageError(
                f"--queue {self.url}: the queue has no redrive policy; give it a dead-letter queue "
                "(RedrivePolicy with maxReceiveCount) so a poison job stops after N attempts"
            )
        return int(json.loads(policy)["maxReceiveCount"])

    def fit(self, hold: float) -> None:
        """Refuse a worker whose jobs may need to stay claimed longer than SQS allows."""
        if hold == float("inf"):
            raise UsageError(
                "--build-timeout: none set (or --allow build-timeout without a MAX), so a build may run "
                f"forever, but SQS keeps a message invisible at most 12 h ({MAX_INVISIBLE:.0f} s); "
                "set --build-timeout (seconds) and a MAX"
            )
        if hold > MAX_INVISIBLE:
            raise UsageError(
                f"--build-timeout: a job may be held {hold:.0f} s (build timeout + grace + lease) but "
                f"SQS keeps a message invisible at most 12 h ({MAX_INVISIBLE:.0f} s); lower --build-timeout"
            )

    # -- Queue --------------------------------------------------------------------------------
    def put(self, message_id: str, body: bytes) -> None:
        try:
            text = body.decode()
        except UnicodeDecodeError:
            raise UsageError(f"queue {self.url}: message {message_id} is not UTF-8 text") from None
        with aws.reaching(self.url, "SendMessage"):
            self.sqs.send_message(
                QueueUrl=self.queue_url,
                MessageBody=text,
                MessageAttributes={JOB_ID: {"DataType": "String", "StringValue": message_id}},
            )

    def claim(self, owner: str, lease: float) -> Claim | None:
        with aws.reaching(self.url, "ReceiveMessage"):
            answer = self.sqs.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=1,
                WaitTimeSeconds=self.wait,
                VisibilityTimeout=_seconds(lease),
                MessageSystemAttributeNames=["ApproximateReceiveCount"],
                MessageAttributeNames=[JOB_ID],
            )
        for message in answer.get("Messages", []):
            attrs = message.get("MessageAttributes", {})
            job_id = attrs.get(JOB_ID, {}).get("StringValue") or message["MessageId"]
            attempt = int(message.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
            return Claim(job_id, attempt, message["Body"].encode(), message["ReceiptHandle"])
        return None

    def _visibility(self, claim: Claim, seconds: int, what: str) -> None:
        with aws.reaching(self.url, what):
            try:
                self.sqs.change_message_visibility(
                    QueueUrl=self.queue_url, ReceiptHandle=claim.token, VisibilityTimeout=seconds
                )
            except ClientError as exc:
                if aws.code(exc) in LOST or "ReceiptHandle" in aws.code(exc):
                    raise LeaseLost(
                        f"queue {self.url}: the lease on {claim.message_id} is gone ({aws.code(exc)})"
                    ) from exc
                raise

    def renew(self, claim: Claim, lease: float) -> None:
        self._visibility(claim, _seconds(lease), "ChangeMessageVisibility")

    def ack(self, claim: Claim) -> None:
        with aws.reaching(self.url, "DeleteMessage"):
            try:
                self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=claim.token)
            except ClientError as exc:
                if aws.code(exc) in LOST:
                    raise LeaseLost(f"queue {self.url}: the lease on {claim.message_id} is gone") from exc
                raise

    def release(self, claim: Claim) -> None:
        self._visibility(claim, 0, "ChangeMessageVisibility(0)")

    def dead_letter(self, claim: Claim) -> None:
        # the redrive policy moves it: its receive count is past maxReceiveCount on the next receive
        self.release(claim)

    def sweep(self, owner: str) -> list[str]:
        return []

    def depth(self) -> dict[str, int]:
        """Visible and in-flight messages (for tests and operators)."""
        with aws.reaching(self.url, "GetQueueAttributes"):
            attrs = self.sqs.get_queue_attributes(
                QueueUrl=self.queue_url,
                AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
            )["Attributes"]
        return {
            "visible": int(attrs["ApproximateNumberOfMessages"]),
            "in_flight": int(attrs["ApproximateNumberOfMessagesNotVisible"]),
        }


def _seconds(lease: float) -> int:
    return max(1, min(MAX_VISIBILITY, round(lease)))
