"""sqs:// and s3:// against moto's server over real HTTP: leases, attempts, the redrive policy,
the 12 h cap, transfer-manager uploads and the conditional status.json."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from cloudbuild.errors import UsageError
from cloudbuild.retry import wait_for
from cloudbuild.worker import s3store
from cloudbuild.worker.protocols import LeaseLost, Unreachable
from cloudbuild.worker.s3store import S3Store
from cloudbuild.worker.sqsqueue import SqsQueue
from cloudbuild.worker.urls import open_queue, open_store
from tests.fakes.moto_server import Aws
from tests.worker.awsfarm import BUCKET, QUEUE, AwsQueues, make_queues


def _queue() -> SqsQueue:
    queue = open_queue(f"sqs://{QUEUE}?wait=0")
    assert isinstance(queue, SqsQueue)
    return queue


def test_claim_renew_release_ack_and_attempts_from_the_receive_count(aws_queues: AwsQueues) -> None:
    queue = _queue()
    queue.put("job-1", b'{"id": "job-1"}')
    first = queue.claim("w1", lease=60)
    assert first is not None and (first.message_id, first.attempt, first.body) == ("job-1", 1, b'{"id": "job-1"}')
    assert queue.claim("w2", lease=60) is None  # invisible while leased
    queue.renew(first, lease=120)
    assert queue.depth() == {"visible": 0, "in_flight": 1}
    queue.release(first)  # visibility 0: back at once
    second = queue.claim("w2", lease=60)
    assert second is not None and second.attempt == 2
    queue.ack(second)
    assert queue.depth() == {"visible": 0, "in_flight": 0}
    assert queue.claim("w1", lease=60) is None


def test_an_expired_lease_is_lost_and_another_worker_gets_attempt_2(aws_queues: AwsQueues) -> None:
    queue = _queue()
    queue.put("job-1", b"{}")
    first = queue.claim("w1", lease=1)
    assert first is not None
    second = wait_for(lambda: queue.claim("w2", lease=60), what="the lease to expire", timeout=30, interval=0.2)
    assert second.attempt == 2
    queue.ack(second)
    with pytest.raises(LeaseLost):
        queue.renew(first, lease=60)


def test_dead_letter_is_the_redrive_policy_never_a_delete(aws_queues: AwsQueues) -> None:
    queue = _queue()
    assert queue.max_deliveries() == 3
    queue.put("poison", b"{}")
    for attempt in (1, 2, 3):
        claim = queue.claim("w1", lease=60)
        assert claim is not None and claim.attempt == attempt
        if attempt < 3:
            queue.release(claim)
    queue.dead_letter(claim)
    assert queue.claim("w1", lease=60) is None  # SQS moved it on this receive
    dead = aws_queues.dead()
    assert [m["MessageAttributes"]["cloudbuild-job-id"]["StringValue"] for m in dead] == ["poison"]


def test_start_up_refusals_name_the_fix(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    make_queues(aws, monkeypatch)
    aws_queues_sqs = SqsQueue("sqs://jobs-dead?wait=0")  # the DLQ itself has no redrive policy
    with pytest.raises(UsageError, match="no redrive policy"):
        aws_queues_sqs.max_deliveries()
    with pytest.raises(UsageError, match="12 h"):
        _queue().fit(12 * 3600 + 1)
    _queue().fit(11 * 3600)
    with pytest.raises(UsageError, match="no SQS queue named 'nope'"):
        open_queue("sqs://nope")
    with pytest.raises(UsageError, match="wait="):
        open_queue(f"sqs://{QUEUE}?wait=30")
    with pytest.raises(UsageError, match="s3://BUCKET/PREFIX"):
        open_store("s3://")


def test_an_unreachable_sqs_is_unreachable_not_a_failure(monkeypatch: pytest.MonkeyPatch, aws: Aws) -> None:
    make_queues(aws, monkeypatch)
    queue = _queue()
    monkeypatch.setattr(queue, "queue_url", "http://127.0.0.1:9/123456789012/jobs")
    queue.sqs = _client_at("sqs", "http://127.0.0.1:9")
    with pytest.raises(Unreachable):
        queue.claim("w1", lease=60)
    store = S3Store(f"s3://{BUCKET}/x", s3=_client_at("s3", "http://127.0.0.1:9"))
    with pytest.raises(Unreachable):
        store.status("job-1")


def _client_at(service: str, endpoint: str) -> Any:
    import boto3
    import botocore.config

    config = botocore.config.Config(retries={"total_max_attempts": 1}, connect_timeout=1)
    return boto3.Session().client(service, endpoint_url=endpoint, config=config)


def _file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def test_inputs_go_through_the_transfer_manager_multipart(
    aws_queues: AwsQueues, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from boto3.s3.transfer import TransferConfig

    monkeypatch.setattr(
        s3store, "TRANSFER", TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20)
    )
    parts: list[str] = []
    store = S3Store(f"s3://{BUCKET}/p")
    store.s3.meta.events.register("before-call.s3.UploadPart", lambda **kw: parts.append("part"))
    big = _file(tmp_path / "big", 11 * 2**20)
    key = store.put_input(big)
    assert key == "sha256-" + hashlib.sha256(big.read_bytes()).hexdigest()
    assert len(parts) == 3  # 5 + 5 + 1 MiB
    assert store.has_input(key) and not store.has_input("sha256-" + "0" * 64)
    store.get_input(key, tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == big.read_bytes()
    # a tampered input is refused, not handed to a build
    aws_queues.s3.put_object(Bucket=BUCKET, Key=f"p/inputs/{key}", Body=b"evil")
    with pytest.raises(Exception, match="does not match its digest"):
        store.get_input(key, tmp_path / "evil")
    assert not (tmp_path / "evil").exists()


def test_states_and_log_parts(aws_queues: AwsQueues) -> None:
    store = S3Store(f"s3://{BUCKET}/p")
    assert store.state("j") is None
    store.set_state("j", {"state": "queued"})
    store.set_state("j", {"state": "running", "attempt": 1})
    assert store.state("j") == {"state": "running", "attempt": 1}
    for part in (0, 1, 3):
        store.append_log("j", 1, part, f"line {part}\n".encode())
    assert store.log_parts("j", 1, 0) == [b"line 0\n", b"line 1\n"]  # up to the first gap
    with pytest.raises(Exception, match="not a plain name"):
        store.set_state("../x", {})


def _result(tmp_path: Path, tag: str) -> dict[str, Path]:
    folder = tmp_path / tag
    folder.mkdir()
    (folder / "a.rpm").write_bytes(tag.encode() * 1000)
    (folder / "link").symlink_to("a.rpm")
    return {"results/a.rpm": folder / "a.rpm", "results/link": folder / "link"}


def test_two_writers_racing_publish_one_result_and_the_loser_leaves_nothing(
    aws_queues: AwsQueues, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_a = S3Store(f"s3://{BUCKET}/p")
    store_b = S3Store(f"s3://{BUCKET}/p")
    # both pass the cheap "no status.json yet" check before either creates it: only the
    # conditional write can keep the first result
    barrier = threading.Barrier(2)
    for store in (store_a, store_b):
        real = store._exists

        def exists(key: str, real: Any = real) -> bool:
            seen = real(key)
            if key.endswith("status.json"):
                barrier.wait(timeout=30)
            return seen

        monkeypatch.setattr(store, "_exists", exists)
    outcome: dict[str, bool] = {}

    def publish(store: S3Store, tag: str) -> None:
        outcome[tag] = store.publish("job-1", 1 if tag == "A" else 2, _result(tmp_path, tag), {"state": "done", "tag": tag})

    threads = [threading.Thread(target=publish, args=(s, t)) for s, t in ((store_a, "A"), (store_b, "B"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcome.values()) == [False, True]
    winner = "A" if outcome["A"] else "B"
    status = store_a.status("job-1")
    assert status is not None and status["tag"] == winner
    keys = aws_queues.keys("p/jobs/job-1/attempts/")
    assert keys == [f"p/jobs/job-1/{status['prefix']}/results/a.rpm"]  # the loser's files are gone, links not uploaded
    store_a.fetch("job-1", "results/a.rpm", tmp_path / "got")
    assert (tmp_path / "got").read_bytes() == winner.encode() * 1000
    # a later duplicate delivery sees the result and does not even upload
    assert S3Store(f"s3://{BUCKET}/p").publish("job-1", 3, _result(tmp_path, "C"), {"state": "done"}) is False
    assert aws_queues.keys("p/jobs/job-1/attempts/") == keys
