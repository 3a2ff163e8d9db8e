"""The one logging set-up of every daemon (``coordinator serve``, ``node serve``, ``up``).

Two formats, one record per line on stderr:

- ``text``: ``2026-12-02 10:15:20,123 INFO vas.node.server: node node1 serving ...``
  (a traceback follows on the next lines, as the logging module prints it);
- ``json``: one JSON object per line with ``time`` (UTC, ISO 8601, milliseconds),
  ``level``, ``logger``, ``message`` and, when there is one, ``exception`` (the
  formatted traceback as one string), so a log shipper never has to join lines.

The level and format come from ``--log-level``/``--log-format`` (``$VAS_LOG_LEVEL``,
``$VAS_LOG_FORMAT``), mapped in src/vas/cli/daemons.py; ``serve()`` called without
them (embedded, in tests) sets up text at INFO only when nothing configured logging.

    setup_logging("DEBUG", "json")
"""
from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import TextIO

#: The formats ``--log-format`` takes.
LOG_FORMATS = ("text", "json")
#: The levels ``--log-level`` takes (any case).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_LOG_FORMAT = "text"
DEFAULT_LOG_LEVEL = "INFO"

_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message[, exception][, stack]."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
                    .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: a message argument json cannot encode is already in "message".
        return json.dumps(entry, ensure_ascii=False, default=str)


def formatter(log_format: str) -> logging.Formatter:
    """The formatter of ``log_format`` ("text" or "json"); ValueError for another."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(_TEXT)
    raise ValueError(f"invalid log format {log_format!r}: expected one of {', '.join(LOG_FORMATS)}")


def setup_logging(level: str = DEFAULT_LOG_LEVEL, log_format: str = DEFAULT_LOG_FORMAT,
                  stream: TextIO | None = None) -> None:
    """Send every record at ``level`` or above to ``stream`` (stderr) in ``log_format``,
    replacing the root logger's handlers (a process has one log).

    :raises ValueError: an unknown level or format.
    """
    if level.upper() not in LOG_LEVELS:
        raise ValueError(f"invalid log level {level!r}: expected one of {', '.join(LOG_LEVELS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())


def setup_default_logging() -> None:
    """Text at INFO on stderr, unless this process configured logging already (the CLI
    did, or the program embedding ``serve``)."""
    if not logging.getLogger().handlers:
        setup_logging()
