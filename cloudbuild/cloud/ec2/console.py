"""The builder's console: EC2 returns the last ~64 KiB on every GetConsoleOutput; only new bytes go on."""

from __future__ import annotations

from cloudbuild.log import get_logger

log = get_logger(__name__)

# --- console ------------------------------------------------------------------------------------

CONSOLE_KEEP = 256 * 1024


class ConsoleTail:
    """Turns EC2's repeated console snapshots (the last ~64 KiB each time) into the new bytes only."""

    def __init__(self) -> None:
        self._seen = b""

    def feed(self, snapshot: bytes) -> bytes:
        if not snapshot:
            return b""
        if not self._seen:
            new = snapshot
        elif snapshot.startswith(self._seen):
            new = snapshot[len(self._seen) :]
        else:
            new = snapshot[self._overlap(snapshot) :]
        self._seen = (self._seen + new)[-CONSOLE_KEEP:]
        return new

    def _overlap(self, snapshot: bytes) -> int:
        """Length of the longest prefix of `snapshot` that is a suffix of what we saw (0: a gap)."""
        anchor = self._seen[-min(len(self._seen), 512) :]
        best = 0
        start = snapshot.find(anchor)
        while start != -1:
            end = start + len(anchor)
            if self._seen.endswith(snapshot[:end]):
                best = end
            start = snapshot.find(anchor, start + 1)
        return best


def decode_console(output: str | None) -> bytes:
    """The console text as bytes. botocore already base64-decoded `Output` (its after-call handler
    `decode_console_output`, undecodable bytes replaced), so this must not decode again."""
    if not output:
        return b""
    return output.encode("utf-8", errors="replace")
