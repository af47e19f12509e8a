"""Streaming a server's console log through `os-getConsoleOutput`, which only ever returns a tail.

Nova answers "the last `length` lines" of the console log (and the log itself may be cut at the
front: libvirt keeps a bounded file, Nova reads at most its last 100 KiB). To stream it we ask for
a window of lines, find where what we already passed on ends inside the answer, and pass on only
what follows:

- Exact first: while the log is not cut at the front, line N of the answer is line N of the log,
  so the new lines start at the number of lines already emitted. This is checked against the
  last lines emitted, so it holds even when the build prints the same line over and over.
- Otherwise by overlap: the latest place where the answer repeats the last lines emitted.
- No overlap at all means the window was too small (more output arrived since the last poll than
  the window holds): the window grows and the poll repeats; past the cap the gap is marked in the
  stream instead of pretending nothing was lost.

An unterminated last line is held back until it is finished or the server has stopped (`flush`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from cloudbuild.backend import Console

ANCHOR_LINES = 32
FIRST_WINDOW = 200
MAX_WINDOW = 20000
GAP_MARKER = b"[cloudbuild: console output was lost here: more arrived than the cloud keeps]\n"


class ConsoleStream:
    """Feeds `sink` each console line once. `fetch(length)` returns the last `length` lines (None: all)."""

    def __init__(self, fetch: Callable[[int | None], str], sink: Console):
        self.fetch = fetch
        self.sink = sink
        self.emitted = 0  # complete lines passed on
        self.anchor: deque[str] = deque(maxlen=ANCHOR_LINES)
        self.window = FIRST_WINDOW
        self.bytes = 0

    def poll(self) -> None:
        """Fetch the console once (more when the window was too small) and pass on the new lines."""
        while True:
            text = self.fetch(self.window)
            lines = text.splitlines(keepends=True)
            complete = lines if not lines or lines[-1].endswith("\n") else lines[:-1]
            start = self._new_start(complete)
            if start is not None:
                self._emit(complete[start:])
                return
            if len(complete) < self.window:
                # everything the cloud still has, and none of it overlaps: the front was cut
                self._gap(complete)
                return
            if self.window >= MAX_WINDOW:
                self._gap(complete)
                return
            self.window = min(MAX_WINDOW, self.window * 4)

    def flush(self) -> None:
        """The server has stopped: pass on everything left, an unterminated last line included."""
        self.poll()
        text = self.fetch(self.window)
        lines = text.splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            last = lines[-1]
            self._write(last.encode("utf-8", "replace") + b"\n")

    def _new_start(self, lines: list[str]) -> int | None:
        """Index in `lines` where the lines not emitted yet begin; None when it cannot be placed."""
        if not self.anchor:
            return 0
        anchor = list(self.anchor)
        k = len(anchor)
        # exact: the answer is the whole log (it is shorter than the window) and lines up by count
        if (
            len(lines) < self.window
            and len(lines) >= self.emitted >= k
            and lines[self.emitted - k : self.emitted] == anchor
        ):
            return self.emitted
        # overlap: the latest end position p such that the lines before p are the anchor's tail
        for p in range(len(lines), 0, -1):
            n = min(k, p)
            if n < min(k, 4):
                break  # an overlap of a line or two is a coincidence, not a position
            if lines[p - n : p] == anchor[k - n :]:
                return p
        return None

    def _emit(self, lines: list[str]) -> None:
        if not lines:
            return
        self._write("".join(lines).encode("utf-8", "replace"))
        self.emitted += len(lines)
        self.anchor.extend(lines)

    def _gap(self, lines: list[str]) -> None:
        self._write(GAP_MARKER)
        self.anchor.clear()
        self._emit(lines)
        self.emitted = 1 << 62  # never line up by count again: the log's front was cut

    def _write(self, data: bytes) -> None:
        self.bytes += len(data)
        self.sink.write(data)
