"""A progress bar on stderr for uploads (they take minutes); silent when not asked for."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class Progress:
    def __init__(self, what: str, total: int, *, enabled: bool, stream: TextIO | None = None):
        self.what = what
        self.total = max(total, 1)
        self.done = 0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()
        self._shown = 0.0

    def add(self, count: int) -> None:
        with self._lock:
            self.done += count
            now = time.monotonic()
            if self.enabled and (now - self._shown > 0.5 or self.done >= self.total):
                self._shown = now
                width = 30
                filled = width * min(self.done, self.total) // self.total
                self.stream.write(
                    f"\r{self.what} [{'#' * filled}{'.' * (width - filled)}] "
                    f"{100 * self.done // self.total:3d}% {self.done >> 20}/{self.total >> 20} MiB"
                )
                self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
