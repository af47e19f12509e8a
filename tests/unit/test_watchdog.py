from __future__ import annotations

import threading
from pathlib import Path

from cloudbuild.watchdog import MARKER_END, MARKER_START, TRIGGERED, BuildLog, Watchdog, watchdog_timeout
from tests.fakes.console import RecordingConsole


def watchdog(timeout: float | None = 0.2) -> tuple[Watchdog, RecordingConsole, threading.Event]:
    sink = RecordingConsole()
    fired = threading.Event()
    return Watchdog(sink, timeout=timeout, on_fire=fired.set), sink, fired


def test_start_marker_left_open_fires_and_logs_the_trigger() -> None:
    dog, sink, fired = watchdog()
    dog.open()
    assert fired.wait(5)
    assert dog.fired
    assert MARKER_START in sink.data and TRIGGERED in sink.data


def test_end_marker_from_the_guest_disarms_it() -> None:
    dog, sink, fired = watchdog(0.3)
    dog.open()
    dog.write(b"booting\n" + MARKER_END + b"\nbuilding...\n")
    assert not fired.wait(0.6)
    dog.close()
    assert not dog.fired
    assert sink.data.endswith(MARKER_END + b"\n")  # the host's END after the machine stopped


def test_markers_split_across_writes_are_seen() -> None:
    dog, _, fired = watchdog(0.3)
    dog.open()
    half = len(MARKER_END) // 2
    dog.write(b"noise " + MARKER_END[:half])
    dog.write(MARKER_END[half:] + b"\n")
    assert not fired.wait(0.6)
    dog.write(b"shutting down " + MARKER_START[:5])
    dog.write(MARKER_START[5:] + b"\n")
    assert fired.wait(5)


def test_the_last_marker_of_a_chunk_wins() -> None:
    dog, _, fired = watchdog(0.3)
    dog.open()
    dog.write(MARKER_END + b"\n" + MARKER_START + b"\n")
    assert fired.wait(5)
    dog2, _, fired2 = watchdog(0.3)
    dog2.open()
    dog2.write(MARKER_START + b"\n" + MARKER_END + b"\n")
    assert not fired2.wait(0.6)


def test_disabled_watchdog_never_fires_but_notices_a_panic() -> None:
    dog, sink, fired = watchdog(None)
    dog.open()
    dog.write(MARKER_START + b"\n[ 1.0] Kernel panic - not syncing: Attempted to kill init!\n")
    assert not fired.wait(0.3)
    assert dog.panicked and not dog.enabled
    dog.close()
    assert MARKER_END not in sink.data  # no markers of our own when disabled


def test_nothing_fires_after_close() -> None:
    dog, _, fired = watchdog(0.2)
    dog.open()
    dog.close()
    dog.write(MARKER_START + b"\n")
    assert not fired.wait(0.5)


def test_timeout_from_environment(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CLOUDBUILD_WATCHDOG_TIMEOUT", "12.5")
    assert watchdog_timeout() == 12.5
    monkeypatch.setenv("CLOUDBUILD_WATCHDOG_TIMEOUT", "bogus")
    assert watchdog_timeout() == 300.0


def test_build_log_appends_and_echoes(tmp_path: Path) -> None:
    echo = tmp_path / "echo"
    with open(echo, "wb") as stream:
        log = BuildLog(tmp_path / "sub" / "out.log", echo=stream)
        log.write(b"console bytes \xff\n")
        log.line("host line")
        log.close()
        log.write(b"after close goes only to the echo\n")
    assert (tmp_path / "sub" / "out.log").read_bytes() == b"console bytes \xff\nhost line\n"
    assert echo.read_bytes().endswith(b"after close goes only to the echo\n")


def test_build_log_survives_a_closed_echo(tmp_path: Path) -> None:
    stream = open(tmp_path / "echo", "wb")  # noqa: SIM115
    log = BuildLog(tmp_path / "out.log", echo=stream)
    stream.close()
    log.write(b"still logged\n")
    log.close()
    assert (tmp_path / "out.log").read_bytes() == b"still logged\n"
