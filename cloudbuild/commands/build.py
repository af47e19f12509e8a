"""`cloudbuild build`: one build in a VM (or container/chroot), its results into --dest.

    cloudbuild build --vm-type qemu|kvm --rootfs DIR|TARBALL|IMAGE --dest OUT [vm options] RECIPE

RECIPE is an executable; its folder is copied to /.build-srcdir in the build root and it runs
there (inside the machine, chrooted into the build root). What it puts into $BUILD_RESULTS
comes back into OUT. Beside OUT:

    OUT.log          the build log: the machine's console, as it streamed (also echoed on stdout)
    OUT.statistics   obs-build's _statistics (MAX_mb_used_*, IO_*, TIME_*), also of a failed build

Exit codes: 0 ok (results in OUT), 1 the recipe failed (nothing in OUT), 3 infrastructure
(timeout, watchdog, crash, no status: retry elsewhere), 4 host broken (e.g. kvm without
hardware virtualisation). Host events are logged on stderr (JSON lines unless a TTY).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

from cloudbuild import log as cblog
from cloudbuild import options as cboptions
from cloudbuild.backend import Backend, create_backend
from cloudbuild.build import BuildJob, BuildOutcome, PhaseLimits, run_build
from cloudbuild.buildroot.hoststeps import DiskHostSteps, check_dest, log_path, statistics_path
from cloudbuild.buildroot.stage import rootfs_kind
from cloudbuild.errors import ExitCode, UsageError
from cloudbuild.watchdog import BuildLog

USAGE = "usage: cloudbuild build --vm-type TYPE --rootfs DIR|TARBALL|IMAGE --dest OUT [options] RECIPE"


SHELL_VM_TYPES = ("qemu", "kvm", cboptions.NO_VM)


def check_shell(options: cboptions.VmOptions) -> None:
    """--shell needs a machine whose console is this terminal, and a terminal."""
    if not (options.shell or options.shell_after_fail):
        return
    flag = "--shell" if options.shell else "--shell-after-fail"
    if options.vm_type not in SHELL_VM_TYPES:
        raise UsageError(f"{flag}: --vm-type {options.vm_type} has no console here (use qemu, kvm or none)")
    if not sys.stdin.isatty():
        raise UsageError(f"{flag}: stdin is no terminal (run the build in one, e.g. under tmux or script)")


def check_recipe(options: cboptions.VmOptions) -> Path:
    if len(options.positionals) != 1:
        raise UsageError(f"give exactly one RECIPE (got {len(options.positionals)})\n{USAGE}")
    recipe = Path(options.positionals[0]).absolute()
    if not recipe.is_file():
        raise UsageError(f"recipe {recipe}: no such file")
    if not os.access(recipe, os.X_OK):
        raise UsageError(f"recipe {recipe}: not executable (chmod +x it)")
    return recipe


@contextlib.contextmanager
def _terminate_as_interrupt(backend: Backend) -> Iterator[None]:
    """SIGTERM/SIGHUP stop the machine at once and unwind like Ctrl-C through the orchestrator's cleanup.

    The machine is stopped from a thread: the main thread may be inside the machine process'
    wait(), which a signal handler must not re-enter.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=backend.kill, name="kill-on-signal", daemon=True).start()
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _workdir(options: cboptions.VmOptions, build_id: str, recipe: Path) -> Iterator[Path]:
    """--root (kept, obs-build's BUILD_ROOT) or a private temporary folder (removed)."""
    base = Path(options.root) if options.root else Path(os.environ.get("TMPDIR", "/var/tmp"))
    if base.resolve().is_relative_to(recipe.parent.resolve()):
        raise UsageError(
            f"the work folder {base} is inside the recipe's folder {recipe.parent}, which is copied into "
            "the build root: use another --root or TMPDIR"
        )
    if options.root:
        base.mkdir(parents=True, exist_ok=True)
        yield base
        return
    folder = Path(tempfile.mkdtemp(prefix=f"cloudbuild-{build_id}-", dir=base))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run(options: cboptions.VmOptions, *, echo: bool = True) -> BuildOutcome:
    """Run one build with parsed options (the CLI without argv parsing and exit codes)."""
    recipe = check_recipe(options)
    check_shell(options)
    if not options.dest:
        raise UsageError(f"--dest OUT is required\n{USAGE}")
    if not options.rootfs:
        raise UsageError(f"--rootfs is required (make one with `cloudbuild rootfs DIR`)\n{USAGE}")
    dest = Path(options.dest)
    check_dest(dest)
    rootfs_kind(Path(options.rootfs))  # a missing or unknown --rootfs fails before any disk work
    build_id = options.build_id or BuildJob.new_id()
    started = time.monotonic()
    for stale in (log_path(dest), statistics_path(dest)):  # of an earlier build with this --dest
        stale.unlink(missing_ok=True)
    console = BuildLog(log_path(dest), echo=sys.stdout.buffer if echo else None)
    try:
        backend = create_backend(options)
        with _workdir(options, build_id, recipe) as workdir, _terminate_as_interrupt(backend):
            steps = DiskHostSteps(options, recipe, build_id=build_id, workdir=workdir)
            job = BuildJob(build_id, dest, workdir, limits=PhaseLimits(boot=options.build_timeout))
            outcome = run_build(job, backend, steps, console)
    finally:
        console.close()
    stats = statistics_path(dest)
    if stats.exists():
        with open(stats, "a", encoding="ascii") as f:
            f.write(f"TIME_total: {round(time.monotonic() - started)}\n")
    return outcome


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    if any(a in ("-h", "--help", "-help") for a in args):
        with contextlib.suppress(BrokenPipeError):  # `cloudbuild build --help | head`
            print(cboptions.help_text(USAGE))
        return 0
    options = cboptions.resolve_paths(cboptions.parse(args))
    cblog.configure(options.log_format)  # type: ignore[arg-type]
    outcome = run(options)
    dest = Path(options.dest or "")
    if outcome.exit_code == ExitCode.OK:
        print(
            f"cloudbuild build: results in {dest}, log {log_path(dest)}, statistics {statistics_path(dest)}",
            file=sys.stderr,
        )
    else:
        print(
            f"cloudbuild build: {outcome.message} (exit {int(outcome.exit_code)}; log {log_path(dest)})",
            file=sys.stderr,
        )
    return int(outcome.exit_code)
