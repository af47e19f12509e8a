"""`s3://BUCKET/PREFIX`: inputs, job states, live logs and results in an S3 bucket.

Keys (the same layout as the dir:// store, under PREFIX/):

    inputs/sha256-HEX                   recipes and build roots, named by their content digest
    jobs/ID/state.json                  queued / running attempt N (last writer wins)
    jobs/ID/logs/ATTEMPT/PART           the live log in numbered chunks
    jobs/ID/attempts/ATTEMPT-TOKEN/NAME one delivery's result files
    jobs/ID/status.json                 the result, written last with `If-None-Match: *`

Files go through boto3's transfer manager (multipart above `MULTIPART_THRESHOLD`). `status.json`
is a conditional create, so of two deliveries of one job racing to the finish S3 keeps exactly
one; the loser deletes its own attempt folder again. Links in a result are not uploaded: the
manifest in status.json records them (`link:TARGET`) and `cloudbuild results` recreates them.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from cloudbuild.errors import UntrustedData, UsageError
from cloudbuild.worker import aws
from cloudbuild.worker.dirstore import KEY, digest_key, safe_job_id, safe_name

MULTIPART_THRESHOLD = 64 * 1024 * 1024
TRANSFER = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=16 * 1024 * 1024)
CONDITION_LOST = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
MISSING = frozenset({"404", "NoSuchKey", "NotFound"})


def parse(url: str) -> tuple[str, str]:
    rest = url.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket or "?" in rest:
        raise UsageError(f"--store {url}: an s3:// URL names a bucket and a prefix (s3://BUCKET/PREFIX)")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


class S3Store:
    def __init__(self, url: str, s3: Any | None = None):
        self.url = url
        self.bucket, self.prefix = parse(url)
        self.s3 = s3 or aws.client("s3")

    def _key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    def _job(self, job_id: str, *parts: str) -> str:
        return self._key("jobs", safe_job_id(job_id), *parts)

    # -- raw objects --------------------------------------------------------------------------
    def _exists(self, key: str) -> bool:
        with aws.reaching(self.url, "HeadObject"):
            try:
                self.s3.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if aws.code(exc) in MISSING:
                    return False
                raise
        return True

    def _get(self, key: str) -> bytes | None:
        with aws.reaching(self.url, "GetObject"):
            try:
                body: bytes = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            except ClientError as exc:
                if aws.code(exc) in MISSING:
                    return None
                raise
        return body

    def _put(self, key: str, data: bytes) -> None:
        with aws.reaching(self.url, "PutObject"):
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)

    def _upload(self, source: Path, key: str) -> None:
        with aws.reaching(self.url, "upload"):
            self.s3.upload_file(str(source), self.bucket, key, Config=TRANSFER)

    def _download(self, key: str, dest: Path) -> None:
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
        try:
            with aws.reaching(self.url, "download"):
                self.s3.download_file(self.bucket, key, str(tmp), Config=TRANSFER)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(dest)

    def _delete_under(self, prefix: str) -> None:
        with aws.reaching(self.url, "DeleteObjects"):
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})

    # -- inputs -------------------------------------------------------------------------------
    def put_input(self, source: Path) -> str:
        key = digest_key(source)
        if not self._exists(self._key("inputs", key)):
            self._upload(source, self._key("inputs", key))
        return key

    def has_input(self, key: str) -> bool:
        return bool(KEY.match(key)) and self._exists(self._key("inputs", key))

    def get_input(self, key: str, dest: Path) -> None:
        if not KEY.match(key):
            raise UntrustedData(f"store key {key!r} is not a content digest")
        self._download(self._key("inputs", key), dest)
        if digest_key(dest) != key:
            dest.unlink()
            raise UntrustedData(f"store input {key} does not match its digest")

    # -- states and logs ----------------------------------------------------------------------
    def set_state(self, job_id: str, state: Mapping[str, Any]) -> None:
        self._put(self._job(job_id, "state.json"), json.dumps(dict(state), sort_keys=True).encode())

    def state(self, job_id: str) -> dict[str, Any] | None:
        return _json(self._get(self._job(job_id, "state.json")), "state.json")

    def append_log(self, job_id: str, attempt: int, part: int, data: bytes) -> None:
        self._put(self._job(job_id, "logs", str(attempt), f"{part:08d}"), data)

    def log_parts(self, job_id: str, attempt: int, first: int) -> list[bytes]:
        parts = []
        number = first
        while (data := self._get(self._job(job_id, "logs", str(attempt), f"{number:08d}"))) is not None:
            parts.append(data)
            number += 1
        return parts

    # -- results ------------------------------------------------------------------------------
    def publish(
        self, job_id: str, attempt: int, files: Mapping[str, Path], status: Mapping[str, Any]
    ) -> bool:
        status_key = self._job(job_id, "status.json")
        if self._exists(status_key):
            return False
        prefix = f"attempts/{attempt}-{secrets.token_hex(4)}"
        staged = self._job(job_id, prefix) + "/"
        won = False
        try:
            for name, source in files.items():
                if not source.is_symlink():  # links live in the manifest only
                    self._upload(source, staged + safe_name(name))
            record = {**status, "job": job_id, "attempt": attempt, "prefix": prefix}
            won = self._create(status_key, json.dumps(record, sort_keys=True).encode())
        finally:
            if not won:
                self._delete_under(staged)
        return won

    def _create(self, key: str, data: bytes) -> bool:
        """PutObject only if the key does not exist yet; False when another writer was first."""
        with aws.reaching(self.url, "PutObject(If-None-Match)"):
            try:
                self.s3.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
            except ClientError as exc:
                if aws.code(exc) in CONDITION_LOST or aws.status_code(exc) in (409, 412):
                    return False
                raise
        return True

    def status(self, job_id: str) -> dict[str, Any] | None:
        return _json(self._get(self._job(job_id, "status.json")), "status.json")

    def fetch(self, job_id: str, name: str, dest: Path) -> None:
        record = self.status(job_id)
        if record is None:
            raise FileNotFoundError(f"job {job_id} has no result yet")
        self._download(self._job(job_id, safe_name(str(record["prefix"])), safe_name(name)), dest)


def _json(data: bytes | None, what: str) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        value = json.loads(data)
    except ValueError:
        raise UntrustedData(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise UntrustedData(f"{what} is not a JSON object")
    return value
