"""Human-facing formatting shared by the CLI and the status page: timestamps and ages.

A base module: it knows nothing about mail, rules or the store, only how to show numbers.
"""

from __future__ import annotations

import time
from datetime import datetime


def when(ts: float | None) -> str:
    """A Unix timestamp as local time, `2024-05-01 14:03:09`; `-` when there is none."""
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def age(seconds: float) -> str:
    """A duration in its largest unit, one decimal: `45s`, `2.5m`, `3.0h`, `1.2d`."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def age_of(ts: float | None, now: float | None = None) -> str:
    """How long ago a Unix timestamp was, as `age` shows it; `-` when there is none."""
    return age((time.time() if now is None else now) - ts) if ts else "-"
