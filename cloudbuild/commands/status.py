"""`cloudbuild status --store URL JOB_ID [--json]`: queued | running | done (exit code) | failed-permanently.

Exit 0 when the job is known (whatever its state), 1 when the store has never heard of it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from cloudbuild.commands.jobargs import parser
from cloudbuild.errors import UsageError
from cloudbuild.worker.protocols import Store
from cloudbuild.worker.urls import open_store


def job_status(store: Store, job_id: str) -> dict[str, Any]:
    """The published result when there is one, else the job's last recorded state."""
    result = store.status(job_id)
    if result is not None:
        return result
    state = store.state(job_id)
    if state is None:
        raise UsageError(f"job {job_id}: unknown to the store {store.url}")
    return state


def describe(job_id: str, status: dict[str, Any]) -> str:
    state = status.get("state", "unknown")
    attempt = status.get("attempt")
    if state == "done":
        return f"{job_id}: done (exit {status.get('exit_code')}) attempt {attempt}"
    if state == "failed-permanently":
        return f"{job_id}: failed-permanently: {status.get('reason', '')}"
    if state == "running":
        return f"{job_id}: running (attempt {attempt} on {status.get('worker')} slot {status.get('slot')})"
    reason = f" ({status['reason']})" if status.get("reason") else ""
    return f"{job_id}: {state}{reason}"


def main(argv: Sequence[str]) -> int:
    p = parser("status", __doc__ or "")
    p.add_argument("--json", action="store_true", help="the status record as JSON")
    p.add_argument("job_id", metavar="JOB_ID")
    args = p.parse_args(list(argv))
    status = job_status(open_store(args.store), args.job_id)
    print(json.dumps(status, indent=2, sort_keys=True) if args.json else describe(args.job_id, status))
    return 0
