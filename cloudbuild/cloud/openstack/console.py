"""Streaming a server's console log through `os-getConsoleOutput`, which only ever returns a tail.

Nova answers "the last `length` lines" of the console log (and the log itself may be cut at the
front: libvirt keeps a bounded file, Nova reads at most its last 100 KiB). To stream it:

- The window (`length`) grows, 200 lines times 4 up to 20000, until the answer is shorter than
  asked for: everything the cloud still keeps.
- Exact first: while the log is not cut at the front, line N of the answer is line N of the log,
  so the new lines start at the number of lines already passed on. This is checked against the
  last lines passed on, and it holds even when the build prints the same line over and over.
- Otherwise (the front was cut, or the log is longer than the largest window) by overlap: the
  latest place where the answer has the last 32 lines passed on.
- Neither: output was lost between two polls; a marker line says so in the stream rather than
  pretending nothing was lost, and streaming goes on from what the cloud has.

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
        """Fetch the console (growing the window until the answer is all the cloud keeps, up to a
        cap) and pass on the new lines."""
        while True:
            lines = self.fetch(self.window).splitlines(keepends=True)
            whole = len(lines) < self.window  # everything the cloud still has
            if not whole and self.window < MAX_WINDOW:
                self.window = min(MAX_WINDOW, self.window * 4)
                continue
            complete = lines if not lines or lines[-1].endswith("\n") else lines[:-1]
            start = self._new_start(complete, whole=whole)
            if start is None:
                self._gap(complete)
            else:
                self._emit(complete[start:])
            return

    def flush(self) -> None:
        """The server has stopped: pass on everything left, an unterminated last line included."""
        self.poll()
        lines = self.fetch(self.window).splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            self._write(lines[-1].encode("utf-8", "replace") + b"\n")

    def _new_start(self, lines: list[str], *, whole: bool) -> int | None:
        """Index in `lines` where the lines not passed on yet begin; None when that cannot be known."""
        if not self.anchor:
            return 0 if whole else None
        anchor = list(self.anchor)
        k = len(anchor)
        # exact: the answer is the whole log and lines up by count (holds for repeated lines too)
        if whole and len(lines) >= self.emitted >= k and lines[self.emitted - k : self.emitted] == anchor:
            return self.emitted
        # overlap: the log was cut at the front; the latest place the whole anchor appears
        for p in range(len(lines), k - 1, -1):
            if lines[p - k : p] == anchor:
                return p
        # the cut fell inside the anchor (maybe mid-line): the longest end of it that starts the answer
        for skip in (0, 1):
            for m in range(min(k, len(lines) - skip), 0, -1):
                if lines[skip : skip + m] == anchor[k - m :]:
                    return skip + m
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
