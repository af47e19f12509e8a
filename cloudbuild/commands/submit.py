"""`cloudbuild submit`: queue one build job; prints its id.

    cloudbuild submit --queue URL --store URL [--rootfs PATH|KEY] [--timeout S]
                      [--option K=V ...] [--label K=V ...] RECIPE_OR_JOB.json

RECIPE is an executable; its whole folder is uploaded to the store (keyed by content digest)
and runs as the build. JOB.json is a job document (docs/job.schema.json) whose inputs are
already in the store. Options no job may ever set are refused here already; whether the worker
allows the others is its operator's call (`cloudbuild status` shows a refusal).
"""

from __future__ import annotations

import os
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from cloudbuild.commands.jobargs import parser, positive_seconds
from cloudbuild.errors import UsageError
from cloudbuild.runner import run
from cloudbuild.worker import job as jobs
from cloudbuild.worker.dirstore import KEY
from cloudbuild.worker.protocols import Store
from cloudbuild.worker.urls import open_queue, open_store


def _pairs(option: str, values: list[str]) -> dict[str, str]:
    out = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise UsageError(f"{option} {value}: give KEY=VALUE")
        out[key.lstrip("-")] = val
    return out


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _upload_folder(store: Store, folder: Path, *, tar_command: bool) -> str:
    """A tarball of `folder`'s content, uploaded; its key."""
    with tempfile.TemporaryDirectory(prefix="cloudbuild-submit-") as tmp:
        tarball = Path(tmp) / "folder.tar"
        if tar_command:  # a build root: device nodes, owners and modes as they are
            run(["tar", "-C", folder, "--numeric-owner", "-cf", tarball, "."], timeout=1800)
        else:
            with tarfile.open(tarball, "w") as tar:
                tar.add(folder, arcname=".", filter=_anonymous)
        return store.put_input(tarball)


def _rootfs_key(store: Store, value: str) -> str:
    if KEY.match(value):
        if not store.has_input(value):
            raise UsageError(f"--rootfs {value}: no such key in the store {store.url}")
        return value
    path = Path(value)
    if path.is_dir():
        return _upload_folder(store, path, tar_command=True)
    if path.is_file():
        return store.put_input(path)
    raise UsageError(f"--rootfs {value}: neither a store key (sha256-...) nor a folder, tarball or image")


def main(argv: Sequence[str]) -> int:
    p = parser("submit", __doc__ or "", queue=True)
    p.add_argument("--rootfs", metavar="PATH|KEY", help="the build root (default: the worker's)")
    p.add_argument("--timeout", type=positive_seconds, metavar="SECONDS", help="the build's time limit")
    p.add_argument(
        "--option", action="append", default=[], metavar="K=V", help="a build option, e.g. vm-memory=1024"
    )
    p.add_argument("--label", action="append", default=[], metavar="K=V", help="a label kept with the job")
    p.add_argument("--id", help="the job id (default: generated)")
    p.add_argument("recipe", metavar="RECIPE_OR_JOB.json")
    args = p.parse_args(list(argv))
    queue, store = open_queue(args.queue), open_store(args.store)
    source = Path(args.recipe)
    if source.suffix == ".json":
        try:
            job = jobs.parse(source.read_bytes())
        except FileNotFoundError:
            raise UsageError(f"{source}: no such job document") from None
        if not store.has_input(job.recipe):
            raise UsageError(f"{source}: field 'recipe': {job.recipe} is not in the store {store.url}")
    else:
        if not source.is_file() or not os.access(source, os.X_OK):
            raise UsageError(f"recipe {source}: not an executable file (chmod +x it)")
        options = _pairs("--option", args.option)
        for name in options:
            if name not in jobs.JOB_SETTABLE:
                raise UsageError(
                    f"--option {name}: jobs may never set it (only {', '.join(jobs.JOB_SETTABLE)}); "
                    "it is the worker operator's"
                )
        job = jobs.Job(
            id=args.id or jobs.Job.new_id(),
            recipe=_upload_folder(store, source.absolute().parent, tar_command=False),
            script=source.name,
            rootfs=_rootfs_key(store, args.rootfs) if args.rootfs else None,
            options=options,
            timeout=args.timeout,
            labels=_pairs("--label", args.label),
        )
        jobs.parse(job.to_bytes())  # what the worker will check: refuse a bad id here, not there
    store.set_state(job.id, {"state": "queued", "attempt": 0, "queued_at": time.time()})
    try:
        queue.put(job.id, job.to_bytes())
    except FileExistsError:
        raise UsageError(f"job {job.id} is already queued") from None
    print(job.id)
    return 0
