"""`cloudbuild logs --store URL JOB_ID [--follow] [--attempt N]`: a job's build log.

Without --attempt, the latest attempt's. --follow prints the log live while the build runs,
in the chunks the worker uploads every few seconds, and ends when the job ends (or is released).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cloudbuild.commands.jobargs import parser, positive_int
from cloudbuild.commands.status import job_status
from cloudbuild.deadline import Deadline
from cloudbuild.errors import DeadlineExceeded
from cloudbuild.retry import wait_for
from cloudbuild.worker.protocols import Store
from cloudbuild.worker.urls import open_store

FOLLOW_LIMIT = 7 * 24 * 3600.0  # a follower gives up after a week


def _latest_attempt(store: Store, job_id: str) -> int:
    return max(1, int(job_status(store, job_id).get("attempt") or 1))


def main(argv: Sequence[str]) -> int:
    p = parser("logs", __doc__ or "")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing while the job runs")
    p.add_argument("--attempt", type=positive_int, help="this attempt's log (default: the latest)")
    p.add_argument("job_id", metavar="JOB_ID")
    args = p.parse_args(list(argv))
    store = open_store(args.store)
    attempt = args.attempt or _latest_attempt(store, args.job_id)
    out = sys.stdout.buffer
    part = 0

    def drain() -> None:
        nonlocal part
        for chunk in store.log_parts(args.job_id, attempt, part):
            out.write(chunk)
            part += 1
        out.flush()

    drain()
    if not args.follow:
        return 0
    deadline = Deadline("following the log", FOLLOW_LIMIT)

    def ended() -> bool:
        state = job_status(store, args.job_id)
        now_attempt = int(state.get("attempt") or 0)
        if state.get("state") == "running":
            return now_attempt > attempt
        # queued: not started yet (an earlier attempt number) or this attempt was released
        return state.get("state") != "queued" or now_attempt >= attempt

    def ended_or_grew() -> bool:
        before = part
        drain()
        return part != before or ended()

    while not ended():
        try:
            wait_for(
                ended_or_grew,
                what="the log to grow",
                timeout=deadline.remaining(floor=1.0) or 1.0,
                interval=0.5,
                max_interval=2.0,
            )
        except DeadlineExceeded:
            return 1
    drain()
    return 0
