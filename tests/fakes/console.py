"""The one console recorder of the tests: a `cloudbuild.backend.Console` that keeps what arrives."""

from __future__ import annotations


class RecordingConsole:
    """Every write in order (`chunks`: how the output arrived) and all of it (`data`)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(bytes(data))

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    text = data  # the name EC2 tests read it by
