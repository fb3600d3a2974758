"""Logging setup: human lines on a terminal, JSON lines under systemd or when asked.

Log lines carry mail data (senders, subjects, rule reasons), which is hostile: both formats
escape control characters (`gateway.display.printable`), so a NUL in `MAIL FROM` or an ESC
sequence in a subject can neither drive the operator's terminal nor forge a log line.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from gateway.display import json_line, printable

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for journald / log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        # fields passed with `extra=` (message, service, rule, outcome, ...) become JSON keys
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json_line(entry)


class HumanFormatter(logging.Formatter):
    """`12:03:09 INFO    gateway.x: message`, escaped; the lines of a multi-line message
    (reload problems, tracebacks) are indented so none of them can pass for a record."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record), keep_newlines=True).replace("\n", "\n    ")


_RECORD_ATTRIBUTES = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)


def choose_format(requested: str) -> str:
    """'auto' means JSON under systemd (JOURNAL_STREAM set) or when stderr is not a terminal.

    $GATEWAY_LOG_FORMAT (set by `gateway --log-format`) wins over the config file, so the
    worker child process logs in the same format as its parent.
    """
    requested = os.environ.get("GATEWAY_LOG_FORMAT") or requested
    if requested != "auto":
        return requested
    if os.environ.get("JOURNAL_STREAM") or not sys.stderr.isatty():
        return "json"
    return "human"


def setup_logging(level: str = "info", fmt: str = "auto") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if choose_format(fmt) == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(HumanFormatter())
    # No formatter here prints thread or process names: spare every record looking them up
    # (the logging HOWTO's "Optimization" switches).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS.get(level, logging.INFO))
    # third-party chatter at info level hides our one-line-per-message log
    for noisy in ("httpx", "httpcore", "mail.log"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
