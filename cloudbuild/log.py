"""structlog setup: a console renderer on a TTY, JSON lines otherwise.

Context (build id, volume id, phase) is bound with `bind()` / `bound()` and travels with every
event through structlog's contextvars, so modules log with `get_logger(__name__)` and never
repeat the build id by hand.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any, Literal, TextIO

import structlog
from structlog._config import BoundLoggerLazyProxy

LogFormat = Literal["auto", "console", "json"]

_configured = False


def configure(fmt: LogFormat = "auto", *, stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Configure structlog once for the process (calling again reconfigures)."""
    global _configured
    out = stream if stream is not None else sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False) if use_console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(name: str | None = None, **context: Any) -> Any:
    """A bound logger; `name` is the module, `context` anything to carry on every event."""
    if not _configured:
        configure()
    if name:
        context = {"logger": name, **context}
    # A lazy proxy with initial values, not get_logger().bind(): bind() builds the logger at once
    # and freezes this moment's processors, level and stream, so every module-level logger would
    # ignore a later configure() (--log-format, tests' capture_logs). get_logger(**context) cannot
    # carry our "logger" key (it collides with wrap_logger's parameter), hence the proxy itself.
    return BoundLoggerLazyProxy(None, initial_values=context, logger_factory_args=())


def bind(**context: Any) -> None:
    """Bind context (build, volume, phase, ...) for every later event in this thread/task."""
    structlog.contextvars.bind_contextvars(**context)


@contextlib.contextmanager
def bound(**context: Any) -> Iterator[None]:
    """Bind context for the duration of a block, restoring the previous values after it."""
    tokens = structlog.contextvars.bind_contextvars(**context)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
