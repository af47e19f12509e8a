"""The embedded store, `dir:///abs/path`: inputs, job states, live logs and results in one folder.

Layout:

    inputs/sha256-HEX                      recipes and build roots, named by their content digest
    jobs/ID/state.json                     queued / running attempt N (rewritten, last writer wins)
    jobs/ID/logs/ATTEMPT/PART              the live log in numbered chunks
    jobs/ID/attempts/ATTEMPT-TOKEN/NAME    one delivery's result files, staged
    jobs/ID/status.json                    the result: created once (link(2)), naming its attempt folder

`status.json` is written last and never replaced, so a reader sees either no result or a whole
one, and of two deliveries of the same job finishing together exactly one result is visible.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cloudbuild.errors import UntrustedData
from cloudbuild.worker.fsatomic import create_exclusive, fsync_dir, write_atomic
from cloudbuild.worker.protocols import Unreachable

KEY = re.compile(r"^sha256-[0-9a-f]{64}$")
NAME = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
CHUNK = 1024 * 1024


def digest_key(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return "sha256-" + h.hexdigest()


def _safe_name(name: str) -> str:
    if not NAME.match(name) or any(part in (".", "..") for part in name.split("/")):
        raise UntrustedData(f"store file name {name!r} is not a plain relative path")
    return name


class DirStore:
    def __init__(self, root: Path):
        self.root = root
        self.url = f"dir://{root}"

    def _top(self, name: str) -> Path:
        if not self.root.is_dir():
            raise Unreachable(f"store {self.url}: {self.root} is not a folder (not mounted?)")
        path = self.root / name
        path.mkdir(exist_ok=True)
        return path

    def _job(self, job_id: str) -> Path:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", job_id):
            raise UntrustedData(f"job id {job_id!r} is not a plain name")
        path = self._top("jobs") / job_id
        path.mkdir(exist_ok=True)
        return path

    # -- inputs -------------------------------------------------------------------------------
    def put_input(self, source: Path) -> str:
        key = digest_key(source)
        target = self._top("inputs") / key
        if not target.exists():
            tmp = target.with_name(f".{key}.{secrets.token_hex(4)}.tmp")
            shutil.copyfile(source, tmp)
            tmp.replace(target)
        return key

    def has_input(self, key: str) -> bool:
        return bool(KEY.match(key)) and (self._top("inputs") / key).is_file()

    def get_input(self, key: str, dest: Path) -> None:
        if not KEY.match(key):
            raise UntrustedData(f"store key {key!r} is not a content digest")
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
        shutil.copyfile(self._top("inputs") / key, tmp)
        if digest_key(tmp) != key:
            tmp.unlink()
            raise UntrustedData(f"store input {key} does not match its digest")
        tmp.replace(dest)

    # -- states and logs ----------------------------------------------------------------------
    def set_state(self, job_id: str, state: Mapping[str, Any]) -> None:
        write_atomic(self._job(job_id) / "state.json", json.dumps(dict(state), sort_keys=True).encode())

    def state(self, job_id: str) -> dict[str, Any] | None:
        return _read_json(self._job(job_id) / "state.json")

    def append_log(self, job_id: str, attempt: int, part: int, data: bytes) -> None:
        folder = self._job(job_id) / "logs" / str(attempt)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / f"{part:08d}", data)

    def log_parts(self, job_id: str, attempt: int, first: int) -> list[bytes]:
        folder = self._job(job_id) / "logs" / str(attempt)
        parts = []
        number = first
        while (path := folder / f"{number:08d}").is_file():
            parts.append(path.read_bytes())
            number += 1
        return parts

    # -- results ------------------------------------------------------------------------------
    def publish(
        self, job_id: str, attempt: int, files: Mapping[str, Path], status: Mapping[str, Any]
    ) -> bool:
        job = self._job(job_id)
        if (job / "status.json").exists():
            return False
        prefix = f"attempts/{attempt}-{secrets.token_hex(4)}"
        staged = job / prefix
        staged.mkdir(parents=True)
        try:
            for name, source in files.items():
                target = staged / _safe_name(name)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target, follow_symlinks=False)
            fsync_dir(staged)
            record = {**status, "job": job_id, "attempt": attempt, "prefix": prefix}
            won = create_exclusive(job / "status.json", json.dumps(record, sort_keys=True).encode())
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        if not won:
            shutil.rmtree(staged, ignore_errors=True)
        return won

    def status(self, job_id: str) -> dict[str, Any] | None:
        return _read_json(self._job(job_id) / "status.json")

    def fetch(self, job_id: str, name: str, dest: Path) -> None:
        record = self.status(job_id)
        if record is None:
            raise FileNotFoundError(f"job {job_id} has no result yet")
        prefix = _safe_name(str(record["prefix"]))
        shutil.copy2(self._job(job_id) / prefix / _safe_name(name), dest, follow_symlinks=False)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    if not isinstance(data, dict):
        raise UntrustedData(f"{path} is not a JSON object")
    return data
