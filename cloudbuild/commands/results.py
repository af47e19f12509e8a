"""`cloudbuild results --store URL JOB_ID --dest DIR`: a finished job's artifacts, log and statistics.

Like `cloudbuild build`: the artifacts into DIR, the build log to DIR.log, obs-build's
_statistics to DIR.statistics; every file checked against the digest in the job's status.json.
Exits with the job's own exit code (0, 1, 2) once fetched; 1 when it has no result (yet).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cloudbuild.buildroot.hoststeps import check_dest, log_path, statistics_path
from cloudbuild.commands.jobargs import parser
from cloudbuild.commands.status import describe
from cloudbuild.errors import UntrustedData, UsageError
from cloudbuild.worker.dirstore import digest_key
from cloudbuild.worker.urls import open_store


def main(argv: Sequence[str]) -> int:
    p = parser("results", __doc__ or "")
    p.add_argument("--dest", required=True, type=Path, metavar="DIR")
    p.add_argument("job_id", metavar="JOB_ID")
    args = p.parse_args(list(argv))
    store = open_store(args.store)
    status = store.status(args.job_id)
    if status is None:
        raise UsageError(f"job {args.job_id} has no result yet (`cloudbuild status` says where it is)")
    dest = args.dest.absolute()
    check_dest(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, digest in sorted(dict(status.get("files", {})).items()):
        if name == "build.log":
            target = log_path(dest)
        elif name == "_statistics":
            target = statistics_path(dest)
        elif name.startswith("results/"):
            target = dest / name.removeprefix("results/")
        else:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if str(digest).startswith("link:"):
            os.symlink(str(digest).removeprefix("link:"), target)
            continue
        store.fetch(args.job_id, name, target)
        if digest_key(target) != digest:
            raise UntrustedData(f"job {args.job_id}: {name} does not match the digest in its status.json")
    print(describe(args.job_id, status))
    if status.get("state") == "done":
        return int(status.get("exit_code", 1))
    return 1
