"""structlog for the controller: JSON lines (one object per line, with the replica's identity
bound on every line), or key=value on a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}  # fmt: skip


def configure(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    *,
    stream: TextIO | None = None,
    **context: str,
) -> None:
    out = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )

    def static(_: object, __: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
        # Bound here, not in contextvars: the elector, informers and reconciler log from
        # threads that do not inherit the main thread's context.
        for key, value in context.items():
            event.setdefault(key, value)
        return event

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            static,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        # Not cached: a logger bound once must follow a later configure (tests reconfigure).
        cache_logger_on_first_use=False,
    )
