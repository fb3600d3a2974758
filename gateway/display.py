"""Human-facing formatting shared by the CLI, the logs and the status page: timestamps, ages,
and text made safe for a terminal.

A base module: it knows nothing about mail, rules or the store, only how to show values.
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime


def when(ts: float | None) -> str:
    """A Unix timestamp as local time, `2024-05-01 14:03:09`; `-` when there is none."""
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def iso_utc(ts: float | None) -> str | None:
    """A Unix timestamp as ISO 8601 in UTC with milliseconds, as the JSON log lines write it:
    `2024-05-01T12:03:09.250Z`; None when there is none. For `--json` output."""
    if ts is None:
        return None
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def age(seconds: float) -> str:
    """A duration in its largest unit, one decimal: `45s`, `2.5m`, `3.0h`, `1.2d`."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def age_of(ts: float | None, now: float | None = None) -> str:
    """How long ago a Unix timestamp was, as `age` shows it; `-` when there is none."""
    return age((time.time() if now is None else now) - ts) if ts else "-"


# What a terminal or a log reader could take for something other than text: C0 and C1 controls
# (ESC starts terminal sequences, NUL and CR forge or hide output), DEL, line and paragraph
# separators, bidirectional overrides ("Trojan Source") and lone surrogates (undecodable bytes,
# which would also make printing raise).
_OTHER_CONTROLS = "\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_UNPRINTABLE = re.compile(f"[\x00-\x1f{_OTHER_CONTROLS}]")
_UNPRINTABLE_BUT_NEWLINE = re.compile(f"[\x00-\x09\x0b-\x1f{_OTHER_CONTROLS}]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: object, *, keep_newlines: bool = False) -> str:
    """`text` safe to show on a terminal or in a log line: every control character escaped as
    Python would write it (`\\x1b`, `\\x00`, `\\u202e`), so mail content can neither drive the
    terminal nor forge lines. `keep_newlines` leaves `\\n` for multi-line messages whose
    caller indents the continuation lines."""
    text = str(text)
    pattern = _UNPRINTABLE_BUT_NEWLINE if keep_newlines else _UNPRINTABLE
    if pattern.search(text) is None:  # the common case: nothing to copy
        return text
    return pattern.sub(_escape, text)


# one encoder for every line: json.dumps builds a new one per call when given options
_JSON = json.JSONEncoder(ensure_ascii=False, default=str)


def json_line(value: object) -> str:
    """`value` as one line of JSON (non-ASCII text kept readable), with the characters that
    `printable` escapes written as `\\uXXXX`: `--json` output and JSON log lines."""
    text = _JSON.encode(value)  # escapes C0 controls itself
    if _UNPRINTABLE.search(text) is None:
        return text
    return _UNPRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
