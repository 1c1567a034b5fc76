"""structlog set-up shared by plexusd, plexusctl and plexus-controller: JSON lines in production
(one object per line), key=value on a terminal. Request context (container_id, pod, namespace,
ifname) is bound per request through contextvars; `context` keys (the controller replica's
identity) are added to every line, from every thread, since threads do not inherit the main
thread's contextvars."""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    *,
    stream: TextIO | None = None,
    cache: bool = True,
    **context: str,
) -> None:
    """`cache=False` where a logger bound once must follow a later configure (the controller's
    tests reconfigure in one process)."""
    out = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )

    def static(_: object, __: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
        for key, value in context.items():
            event.setdefault(key, value)
        return event

    processors: list[structlog.typing.Processor] = [structlog.contextvars.merge_contextvars]
    if context:
        processors.append(static)
    processors += [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=cache,
    )
