"""The dir:// queue and store on a real folder, raced by real processes."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from cloudbuild.worker import dirqueue
from cloudbuild.worker.dirqueue import DirQueue
from cloudbuild.worker.dirstore import DirStore
from cloudbuild.worker.protocols import LeaseLost, Unreachable


def test_claim_lease_release_counts_attempts(tmp_path: Path) -> None:
    q = DirQueue(tmp_path)
    q.put("a", b"body-a")
    with pytest.raises(FileExistsError):
        q.put("a", b"again")
    first = q.claim("w1", lease=60)
    assert first is not None and (first.message_id, first.attempt, first.body) == ("a", 1, b"body-a")
    assert q.claim("w2", lease=60) is None  # held
    q.renew(first, lease=60)
    q.release(first)
    second = q.claim("w2", lease=60)
    assert second is not None and second.attempt == 2
    with pytest.raises(LeaseLost):
        q.renew(first, lease=60)  # an old delivery cannot touch the new one
    q.ack(second)
    assert q.counts() == {"pending": 0, "claimed": 0, "done": 1, "dead": 0}


def test_an_expired_lease_is_reclaimed_by_another_worker(tmp_path: Path) -> None:
    q = DirQueue(tmp_path)
    q.put("a", b"x")
    first = q.claim("w1", lease=0.01)
    assert first is not None
    time.sleep(0.05)  # let the lease run out (a real clock is what the queue reads)
    second = q.claim("w2", lease=60)
    assert second is not None and second.attempt == 2
    with pytest.raises(LeaseLost):
        q.renew(first, lease=60)
    with pytest.raises(LeaseLost):
        q.ack(first)


def test_a_fresh_claim_without_its_lease_yet_is_not_reclaimed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = DirQueue(tmp_path)
    q.put("a", b"x")
    claim = q.claim("w1", lease=0.01)
    assert claim is not None
    # the moment between the claiming rename and the lease write: an earlier claim's stale lease
    (Path(claim.token) / "lease").write_text("oldtoken 1.0")
    assert q.claim("w2", lease=60) is None
    monkeypatch.setattr(dirqueue, "RECLAIM_GRACE", 0.0)  # a claimer that died before writing its lease
    assert q.claim("w2", lease=60) is not None


def test_sweep_releases_what_an_earlier_run_of_the_same_worker_held(tmp_path: Path) -> None:
    q = DirQueue(tmp_path)
    q.put("a", b"x")
    q.put("b", b"y")
    assert q.claim("w1", lease=3600) is not None
    assert q.claim("w2", lease=3600) is not None
    assert q.sweep("w1") != [] and q.sweep("w1") == []
    assert q.counts()["pending"] == 1 and q.counts()["claimed"] == 1


def test_dead_letter_is_never_claimed_again(tmp_path: Path) -> None:
    q = DirQueue(tmp_path)
    q.put("a", b"x")
    claim = q.claim("w1", lease=60)
    assert claim is not None
    q.dead_letter(claim)
    assert q.claim("w1", lease=60) is None
    assert q.counts()["dead"] == 1


def _claimer(root: str, owner: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    q = DirQueue(Path(root))
    got = []
    while (claim := q.claim(owner, lease=600)) is not None:
        got.append(claim.message_id)
    out.put(got)


def test_several_processes_never_claim_the_same_message(tmp_path: Path) -> None:
    q = DirQueue(tmp_path)
    ids = [f"m{i:03d}" for i in range(200)]
    for message_id in ids:
        q.put(message_id, b"x")
    out: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    procs = [multiprocessing.Process(target=_claimer, args=(str(tmp_path), f"w{i}", out)) for i in range(4)]
    for p in procs:
        p.start()
    claimed = [m for _ in procs for m in out.get(timeout=60)]
    for p in procs:
        p.join()
    assert sorted(claimed) == ids  # every message exactly once


def test_unreachable_root_is_reported_as_such(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    with pytest.raises(Unreachable):
        DirQueue(gone).claim("w", lease=1)
    with pytest.raises(Unreachable):
        DirStore(gone).status("j")


def test_inputs_are_keyed_and_verified_by_digest(tmp_path: Path) -> None:
    store = DirStore(tmp_path / "s")
    (tmp_path / "s").mkdir()
    src = tmp_path / "in.tar"
    src.write_bytes(os.urandom(1000))
    key = store.put_input(src)
    assert store.has_input(key) and not store.has_input("sha256-" + "0" * 64)
    store.get_input(key, tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == src.read_bytes()
    (tmp_path / "s" / "inputs" / key).write_bytes(b"tampered")
    with pytest.raises(Exception, match="does not match its digest"):
        store.get_input(key, tmp_path / "copy2")


def _publisher(root: str, attempt: int, start: float, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    store = DirStore(Path(root))
    src = Path(root).parent / f"result-{attempt}"
    src.write_bytes(str(attempt).encode() * 100000)
    while time.time() < start:  # line both processes up on the same instant
        pass
    out.put((attempt, store.publish("j", attempt, {"out/file": src}, {"state": "done", "exit_code": 0})))


@pytest.mark.parametrize("round_", range(5))
def test_two_deliveries_finishing_together_publish_one_result(tmp_path: Path, round_: int) -> None:
    (tmp_path / "s").mkdir()
    out: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    start = time.time() + 0.5
    procs = [
        multiprocessing.Process(target=_publisher, args=(str(tmp_path / "s"), a, start, out)) for a in (1, 2)
    ]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=30) for _ in procs)
    for p in procs:
        p.join()
    winners = [a for a, won in results.items() if won]
    assert len(winners) == 1
    store = DirStore(tmp_path / "s")
    status = store.status("j")
    assert status is not None and status["attempt"] == winners[0]
    store.fetch("j", "out/file", tmp_path / "fetched")
    assert (tmp_path / "fetched").read_bytes() == str(winners[0]).encode() * 100000  # not a mix
    assert (
        len(list((tmp_path / "s" / "jobs" / "j" / "attempts").iterdir())) == 1
    )  # the loser's files are gone


def test_a_published_result_is_never_replaced(tmp_path: Path) -> None:
    store = DirStore(tmp_path)
    src = tmp_path / "f"
    src.write_bytes(b"1")
    assert store.publish("j", 1, {"a": src}, {"state": "done"})
    assert not store.publish("j", 2, {"a": src}, {"state": "done"})
    assert store.status("j")["attempt"] == 1  # type: ignore[index]


def test_result_names_from_outside_cannot_escape(tmp_path: Path) -> None:
    store = DirStore(tmp_path)
    src = tmp_path / "f"
    src.write_bytes(b"1")
    with pytest.raises(Exception, match="not a plain relative path"):
        store.publish("j", 1, {"../../evil": src}, {"state": "done"})
    assert store.status("j") is None


def test_live_log_parts_are_read_in_order_up_to_the_first_gap(tmp_path: Path) -> None:
    store = DirStore(tmp_path)
    store.append_log("j", 1, 0, b"a")
    store.append_log("j", 1, 1, b"b")
    store.append_log("j", 1, 3, b"d")
    assert store.log_parts("j", 1, 0) == [b"a", b"b"]
    assert store.log_parts("j", 1, 2) == []
