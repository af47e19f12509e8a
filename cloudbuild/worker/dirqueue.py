"""The embedded queue, `dir:///abs/path`: one machine, any number of worker processes, no server.

Layout (every move is one rename(2), so exactly one process wins each race):

    pending/ID/            body, attempts           claimable
    claimed/OWNER/ID.TOKEN/ body, attempts, lease    held by OWNER; lease = "TOKEN DEADLINE" (epoch s)
    done/ID/               acknowledged
    dead/ID/               dead-lettered
    incoming/              where `put` builds a message before its rename into pending/

A claim is `rename(pending/ID, claimed/OWNER/ID.TOKEN)`; the winner then counts the attempt and
writes its lease. For the instant between the rename and that write the folder holds no lease
or an earlier claim's (another TOKEN): a reclaimer then goes by the folder's ctime, which the
rename set, and leaves it alone for RECLAIM_GRACE.
"""

from __future__ import annotations

import secrets
import shutil
import time
from pathlib import Path

from cloudbuild.worker.fsatomic import fsync_dir, rename_no_replace, write_atomic
from cloudbuild.worker.protocols import Claim, LeaseLost, Unreachable

RECLAIM_GRACE = 30.0  # a claim without its own lease yet is honoured this long after its rename


class DirQueue:
    def __init__(self, root: Path):
        self.root = root
        self.url = f"dir://{root}"

    # -- layout -------------------------------------------------------------------------------
    def _dir(self, name: str) -> Path:
        if not self.root.is_dir():
            raise Unreachable(f"queue {self.url}: {self.root} is not a folder (not mounted?)")
        path = self.root / name
        path.mkdir(exist_ok=True)
        return path

    def _held(self, claim: Claim) -> Path:
        return Path(claim.token)

    # -- Queue --------------------------------------------------------------------------------
    def put(self, message_id: str, body: bytes) -> None:
        staging = self._dir("incoming") / f"{message_id}.{secrets.token_hex(4)}"
        staging.mkdir()
        write_atomic(staging / "body", body)
        write_atomic(staging / "attempts", b"0")
        if not rename_no_replace(staging, self._dir("pending") / message_id):
            shutil.rmtree(staging, ignore_errors=True)
            raise FileExistsError(f"queue {self.url}: message {message_id} is already queued")
        fsync_dir(self.root / "pending")

    def claim(self, owner: str, lease: float) -> Claim | None:
        self._reclaim_expired()
        pending = self._dir("pending")
        mine = self._dir("claimed") / owner
        mine.mkdir(exist_ok=True)
        candidates = []
        for entry in pending.iterdir():
            try:
                candidates.append((entry.stat().st_ctime, entry.name))
            except FileNotFoundError:  # claimed by someone else meanwhile
                continue
        for _, message_id in sorted(candidates):
            held = mine / f"{message_id}.{secrets.token_hex(6)}"
            if not rename_no_replace(pending / message_id, held):
                continue
            attempt = int((held / "attempts").read_text() or "0") + 1
            write_atomic(held / "attempts", str(attempt).encode())
            _write_lease(held, lease)
            return Claim(message_id, attempt, (held / "body").read_bytes(), str(held))
        return None

    def renew(self, claim: Claim, lease: float) -> None:
        held = self._held(claim)
        self._dir("claimed")
        try:
            _write_lease(held, lease)
        except FileNotFoundError:
            raise LeaseLost(
                f"queue {self.url}: the lease on {claim.message_id} expired and was reclaimed"
            ) from None

    def _finish(self, claim: Claim, where: str) -> None:
        held = self._held(claim)
        target = self._dir(where) / claim.message_id
        if target.exists():  # an earlier delivery of the same id already finished there
            target = self._dir(where) / f"{claim.message_id}.{secrets.token_hex(4)}"
        if not rename_no_replace(held, target):
            raise LeaseLost(f"queue {self.url}: the lease on {claim.message_id} expired and was reclaimed")

    def ack(self, claim: Claim) -> None:
        self._finish(claim, "done")

    def dead_letter(self, claim: Claim) -> None:
        self._finish(claim, "dead")

    def release(self, claim: Claim) -> None:
        held = self._held(claim)
        (held / "lease").unlink(missing_ok=True)
        if not rename_no_replace(held, self._dir("pending") / claim.message_id):
            raise LeaseLost(f"queue {self.url}: the lease on {claim.message_id} expired and was reclaimed")

    def sweep(self, owner: str) -> list[str]:
        mine = self._dir("claimed") / owner
        released = []
        if mine.is_dir():
            for held in sorted(mine.iterdir()):
                message_id = held.name.rsplit(".", 1)[0]
                if rename_no_replace(held, self._dir("pending") / message_id):
                    released.append(message_id)
        return released

    # -- reclaim ------------------------------------------------------------------------------
    def _expired(self, held: Path, now: float) -> bool:
        token = held.name.rsplit(".", 1)[-1]
        try:
            lease_token, _, deadline = (held / "lease").read_text().partition(" ")
            if lease_token == token:
                return float(deadline) < now
        except (FileNotFoundError, ValueError):
            pass
        try:  # no lease of this claim yet: just claimed, or its claimer died before writing one
            return now - held.stat().st_ctime > RECLAIM_GRACE
        except FileNotFoundError:
            return False

    def _reclaim_expired(self) -> None:
        now = time.time()
        pending = self._dir("pending")
        for owner in self._dir("claimed").iterdir():
            for held in owner.iterdir() if owner.is_dir() else ():
                if self._expired(held, now):
                    rename_no_replace(held, pending / held.name.rsplit(".", 1)[0])

    def counts(self) -> dict[str, int]:
        """Messages per place (for tests and `cloudbuild status` of the queue)."""
        out = {name: len(list(self._dir(name).iterdir())) for name in ("pending", "done", "dead")}
        out["claimed"] = sum(len(list(o.iterdir())) for o in self._dir("claimed").iterdir() if o.is_dir())
        return out


def _write_lease(held: Path, lease: float) -> None:
    token = held.name.rsplit(".", 1)[-1]
    write_atomic(held / "lease", f"{token} {time.time() + lease:.3f}".encode())
