from __future__ import annotations

import os
from pathlib import Path

from cloudbuild.guest import stats

MEMINFO = """\
MemTotal:        1000000 kB
MemFree:          400000 kB
MemAvailable:     700000 kB
Buffers:           10000 kB
Cached:           100000 kB
SwapCached:         1000 kB
SwapTotal:        200000 kB
SwapFree:         150000 kB
Weird line
"""


def test_memory_used_counts_like_obs_build() -> None:
    # (1000000 + 200000 - 400000 - 150000 - 1000 - 100000 - 10000) kB = 539000 kB
    assert stats.memory_used_mib(MEMINFO) == 539000 // 1024
    assert stats.memory_used_mib("") == 0


def test_disk_used_is_positive_for_a_real_filesystem(tmp_path: Path) -> None:
    assert stats.disk_used_mib(str(tmp_path)) >= 0


def test_io_counters_skip_zero_fields(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    fake = tmp_path / "sys/block/vda"
    fake.mkdir(parents=True)
    (fake / "stat").write_text("  40 0 3586 10 19 0 10392 5 0 20 30 0 0 0 0\n")
    real_open = open

    def fake_open(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(path).startswith("/sys/block/"):
            path = str(tmp_path) + str(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    assert stats.io_counters("vda") == {
        "IO_requests_read": 40,
        "IO_sectors_read": 3586,
        "IO_requests_write": 19,
        "IO_sectors_write": 10392,
    }
    assert stats.io_counters("nosuchdisk") == {}


def test_peaks_store_and_reload(tmp_path: Path) -> None:
    peaks = stats.Peaks(str(tmp_path))
    peaks.sample(str(tmp_path))
    assert (tmp_path / "_statistics.memory").read_text().isdigit()
    (tmp_path / "_statistics.memory").write_text("999999")
    (tmp_path / "_statistics.df").write_text("garbage")
    peaks.load()
    assert peaks.memory == 999999


def test_monitor_samples_in_a_child_and_stops(tmp_path: Path) -> None:
    monitor = stats.Monitor(str(tmp_path), str(tmp_path), interval=0.05)
    monitor.start()
    assert monitor.pid is not None
    pid = monitor.pid
    peaks = monitor.stop()
    assert monitor.pid is None and peaks.memory > 0
    try:
        os.kill(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive


def test_statistics_format_and_bounded_parse() -> None:
    text = stats.format_statistics({"TIME_main_build": 3, "MAX_mb_used_memory": 40})
    assert text == "TIME_main_build: 3\nMAX_mb_used_memory: 40\n"
    parsed = stats.parse_statistics(text + "bad line\nKEY WITH SPACE: 1\n" + "X: " + "9" * 100 + "\n")
    assert parsed == {"TIME_main_build": "3", "MAX_mb_used_memory": "40"}
