"""The build log and the host-side watchdog on the build machine's console.

obs-build's `background_watchdog` greps the log file every 5 s for the last
`### WATCHDOG MARKER START/END ###` and kills the VM when a START stays open for 300 s: the
host writes START before booting, the guest writes END once its 2nd stage runs and START again
when it shuts down, and the host writes END after the VM exited. So a VM that hangs while
booting or while shutting down is killed, a long build is not.

Here the console stream itself is watched as it arrives (no polling of the file): a START arms
a timer, an END disarms it, and the timer kills the machine. The console is guest data: only
bounded line fragments are kept for matching.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from cloudbuild.backend import Console
from cloudbuild.log import get_logger

log = get_logger(__name__)

MARKER_START = b"### WATCHDOG MARKER START ###"
MARKER_END = b"### WATCHDOG MARKER END ###"
TRIGGERED = b"### WATCHDOG TRIGGERED, KILLING VM ###"
PANIC = b"Kernel panic - not syncing"
DEFAULT_TIMEOUT = 300.0
_TAIL = 256  # bytes kept across writes to find a marker split between two reads


def watchdog_timeout() -> float:
    """300 s as obs-build; $CLOUDBUILD_WATCHDOG_TIMEOUT overrides it (tests)."""
    try:
        return float(os.environ.get("CLOUDBUILD_WATCHDOG_TIMEOUT", DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT


class BuildLog:
    """A Console that appends everything to the build log file and, optionally, echoes it live."""

    def __init__(self, path: Path | None, *, echo: BinaryIO | None = None):
        self.path = path
        self.echo = echo
        self._file: BinaryIO | None = None
        self._lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - closed in close()

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._file is not None:
                self._file.write(data)
            if self.echo is not None:
                try:
                    self.echo.write(data)
                    self.echo.flush()
                except (OSError, ValueError):
                    self.echo = None  # a closed terminal must not stop the build

    def line(self, text: str) -> None:
        """A host-side line in the log (like obs-build's echo into $LOGFILE)."""
        self.write(text.encode() + b"\n")

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class Watchdog:
    """A Console wrapper: passes everything on to `inner`, watches markers and kernel panics.

    With `timeout` None the markers are still recognised (and `panicked` set) but nothing fires.
    """

    def __init__(
        self,
        inner: Console,
        *,
        timeout: float | None,
        on_fire: Callable[[], None],
    ):
        self.inner = inner
        self.timeout = timeout
        self.on_fire = on_fire
        self.fired = False
        self.panicked = False
        self.closed = False
        self._tail = b""
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.timeout is not None

    def write(self, data: bytes) -> None:
        self.inner.write(data)
        with self._lock:
            window = self._tail + data
            self._tail = window[-_TAIL:]
            if PANIC in window:
                self.panicked = True
            start = window.rfind(MARKER_START)
            end = window.rfind(MARKER_END)
            if start < 0 and end < 0:
                return
            # the last marker wins, as `grep ... | tail -n 1` in obs-build; drop the matched
            # part of the tail so the same marker is not seen twice
            self._tail = window[max(start, end) + 1 :][-_TAIL:]
            if start > end:
                self._arm()
            else:
                self._disarm()

    def open(self) -> None:
        """The host's START marker before the machine boots."""
        if self.enabled:
            self.inner.write(MARKER_START + b"\n")
            with self._lock:
                self._arm()

    def close(self) -> None:
        """The host's END marker after the machine stopped; nothing fires after this."""
        with self._lock:
            enabled = self.enabled
            self._disarm()
            self.closed = True
        if enabled and not self.fired:
            self.inner.write(MARKER_END + b"\n")

    def _arm(self) -> None:
        if self.timeout is None or self._timer is not None or self.fired or self.closed:
            return
        self._timer = threading.Timer(self.timeout, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        with self._lock:
            if self._timer is None:
                return  # disarmed while the timer was firing
            self._timer = None
            self.fired = True
        log.warning("watchdog triggered, killing the build machine", timeout=self.timeout)
        self.inner.write(b"\n" + TRIGGERED + b"\n")
        self.on_fire()
