"""`cloudbuild worker`: take build jobs from a queue, build each as a child `cloudbuild build`, store results.

    cloudbuild worker --queue URL --store URL [--slots N] [--max-jobs N] [--idle-exit SECONDS]
                      [--drain-timeout SECONDS] [--lease SECONDS] [--metrics-port PORT]
                      [--health-port PORT] [--allow OPTION[=MAX] ...] [build options ...]

Build options (`--vm-type`, `--vm-memory`, `--rootfs`, `--ec2-*`, ...) are the operator's and go
to every build; a job may only change those named by --allow, up to MAX. Exit codes: 0 done
(drained, idle, --max-jobs reached), 1 bad options, 3 queue/store unreachable for too long,
4 this host is broken (a build exited 4). See docs/worker.md.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path

from cloudbuild import log as cblog
from cloudbuild import options as cboptions
from cloudbuild.commands.jobargs import Parser, parser, positive_int, positive_seconds
from cloudbuild.errors import UsageError
from cloudbuild.worker.job import Allowance
from cloudbuild.worker.observe import Metrics
from cloudbuild.worker.supervisor import Supervisor, WorkerConfig
from cloudbuild.worker.urls import open_queue, open_store

# the worker sets these per job and slot; the operator may not
PER_JOB = ("dest", "build_id", "root", "vm_worker_nr", "log_format")


def _parser() -> Parser:
    p = parser("worker", __doc__ or "", queue=True)
    p.add_argument("--slots", type=positive_int, default=1, help="builds at once (default 1)")
    p.add_argument("--max-jobs", type=positive_int, help="exit after this many jobs (ephemeral workers)")
    p.add_argument(
        "--idle-exit", type=positive_seconds, metavar="SECONDS", help="exit after idling this long"
    )
    p.add_argument("--drain-timeout", type=positive_seconds, default=600.0, metavar="SECONDS")
    p.add_argument(
        "--lease", type=positive_seconds, default=300.0, metavar="SECONDS", help="job lease (default 300)"
    )
    p.add_argument(
        "--max-attempts", type=positive_int, default=3, help="deliveries before dead-letter (default 3)"
    )
    p.add_argument("--metrics-port", type=int, metavar="PORT", help="Prometheus metrics on 127.0.0.1:PORT")
    p.add_argument("--health-port", type=int, metavar="PORT", help="health (200/503) on 127.0.0.1:PORT")
    p.add_argument(
        "--allow", action="append", default=[], metavar="OPTION[=MAX]", help="an option jobs may set"
    )
    p.add_argument(
        "--worker-id", default=socket.gethostname(), help="this worker's name (default: host name)"
    )
    p.add_argument("--work-dir", type=Path, help="slots and caches (default /var/lib/cloudbuild/worker/ID)")
    p.add_argument("--log-format", choices=cboptions.LOG_FORMATS, default="auto")
    return p


def main(argv: Sequence[str]) -> int:
    args, build_argv = _parser().parse_known_args(list(argv))
    cblog.configure(args.log_format)
    base = cboptions.resolve_paths(cboptions.parse(build_argv))
    if base.positionals:
        raise UsageError(f"unexpected argument {base.positionals[0]!r} (recipes come from the queue)")
    for name in PER_JOB:
        if getattr(base, name) != getattr(cboptions.VmOptions(), name):
            raise UsageError(
                f"worker: --{name.replace('_', '-')} is set per job and slot by the worker; drop it"
            )
    if not base.rootfs:
        raise UsageError("--rootfs is required (the build root of jobs that bring none)")
    if args.max_attempts < 1:
        raise UsageError("--max-attempts must be at least 1")
    workdir = (args.work_dir or Path("/var/lib/cloudbuild/worker") / args.worker_id).absolute()
    config = WorkerConfig(
        owner=args.worker_id,
        workdir=workdir,
        build_argv=tuple(build_argv),
        base=base,
        allowance=Allowance.parse(args.allow),
        slots=args.slots,
        max_jobs=args.max_jobs,
        idle_exit=args.idle_exit,
        drain_timeout=args.drain_timeout,
        lease=args.lease,
        max_attempts=args.max_attempts,
    )
    metrics = Metrics()
    supervisor = Supervisor(config, open_queue(args.queue), open_store(args.store), metrics=metrics)
    if args.metrics_port is not None:
        metrics.serve(args.metrics_port)
    if args.health_port is not None:
        supervisor.health.serve(args.health_port)
    with cblog.bound(worker=args.worker_id):
        return supervisor.run()
