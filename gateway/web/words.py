"""Times and durations as the status page and /healthz say them: with their time zone, since
an on-call engineer may be reading from another one than the server's."""

from __future__ import annotations

from datetime import datetime

from gateway.display import age


def when(ts: float | None) -> str:
    """`2024-05-01 14:03:09 CEST` in the server's zone; `-` when there is none."""
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def instant(ts: float | None) -> str:
    """`14:03:09.412 CEST`: a timeline's moments, to the millisecond."""
    if not ts:
        return "-"
    moment = datetime.fromtimestamp(ts).astimezone()
    return f"{moment:%Y-%m-%d %H:%M:%S}.{moment.microsecond // 1000:03d} {moment:%Z}"


def clock(ts: float) -> str:
    """`14:03 CEST`: an axis label."""
    return datetime.fromtimestamp(ts).astimezone().strftime("%H:%M %Z")


def zone(ts: float) -> str:
    """`CEST (UTC+02:00)`: the zone every time on a page is in."""
    moment = datetime.fromtimestamp(ts).astimezone()
    offset = moment.strftime("%z")
    return f"{moment.strftime('%Z')} (UTC{offset[:3]}:{offset[3:]})"


def ago(ts: float | None, now: float) -> str:
    """`2.5m ago`; `never` when there is no time."""
    return f"{age(max(0.0, now - ts))} ago" if ts else "never"


def duration(seconds: float) -> str:
    """`45s`, `2.5m`, `3.0h` (as the CLI shows ages)."""
    return age(max(0.0, seconds))
