"""Write hostile/obs/ (today's form) from hostile/obs-2018/ by `tests.disk.forms.to_today`.

Run from the repository root after adding a case: `.venv/bin/python -m tests.disk.hostile.regenerate`.
`test_extract_hostile.py` checks that hostile/obs/ is what this writes.
"""

from __future__ import annotations

from pathlib import Path

from tests.disk.forms import to_today

HERE = Path(__file__).parent
OLD = HERE / "obs-2018"
TODAY = HERE / "obs"


def generated() -> dict[str, bytes]:
    return {case.name: to_today(case.read_bytes()) for case in sorted(OLD.glob("*.manifest"))}


def main() -> None:
    TODAY.mkdir(exist_ok=True)
    for stale in TODAY.glob("*.manifest"):
        stale.unlink()
    for name, data in generated().items():
        (TODAY / name).write_bytes(data)


if __name__ == "__main__":
    main()
