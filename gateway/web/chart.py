"""The status page's pictures: mails per minute by outcome, and delivery latency per minute.

Pure geometry: the store's per-minute rows in, shapes in SVG user units out; the template
draws them (server-side, no script). Both charts share the time axis: `PLOT_WIDTH` units for
the window, so over 24 h one unit is one minute. Each bar and point carries its numbers
(`<title>` and data attributes) so a reader can hover and a test can check the counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from gateway.outcomes import Outcome
from gateway.store import REDELIVERED, MinuteCount, MinuteLatency
from gateway.web.words import clock, zone

WINDOWS_HOURS = (1, 6, 24)  # the windows a reader can pick (`?hours=`)
LEFT, RIGHT, TOP, BOTTOM = 70.0, 20.0, 12.0, 34.0  # margins around the plot
PLOT_WIDTH, PLOT_HEIGHT = 1440.0, 180.0
WIDTH, HEIGHT = LEFT + PLOT_WIDTH + RIGHT, TOP + PLOT_HEIGHT + BOTTOM
GEOMETRY = {  # for the template: the frame both charts draw in
    "left": LEFT,
    "right": LEFT + PLOT_WIDTH,
    "top": TOP,
    "bottom": TOP + PLOT_HEIGHT,
    "width": WIDTH,
    "height": HEIGHT,
}

# The chart's categories, bottom of the stack first; outcomes not named count as "other".
CATEGORIES = ("triggered", "duplicate", "resolved", "unmatched", "quarantined", "other")
CATEGORY_OF = {
    Outcome.TRIGGERED: "triggered",
    Outcome.DUPLICATE: "duplicate",  # a repeat trigger for an open incident
    REDELIVERED: "duplicate",  # the same mail delivered again (RFC 5321 §6.1)
    Outcome.RESOLVED: "resolved",
    Outcome.UNMATCHED: "unmatched",
    Outcome.QUARANTINED: "quarantined",
}
MEANING = {
    "triggered": "opened an incident",
    "duplicate": "repeat trigger for an open incident, or the same mail delivered again",
    "resolved": "resolved an incident",
    "unmatched": "no rule matched (kept)",
    "quarantined": "could not be decided (kept, with the reason)",
    "other": "acknowledged, discarded, filtered, auto-replies, resolves with nothing open, undecided",
}
LATENCY_TICKS = (
    (0.001, "1 ms"),
    (0.01, "10 ms"),
    (0.1, "100 ms"),
    (1.0, "1 s"),
    (10.0, "10 s"),
    (60.0, "1 min"),
    (600.0, "10 min"),
    (3600.0, "1 h"),
    (36000.0, "10 h"),
    (360000.0, "100 h"),
)


@dataclass(frozen=True)
class Tick:
    at: float  # x or y in user units
    label: str


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    category: str
    minute: float
    count: int
    title: str


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    series: str  # 'p50' | 'p99'
    minute: float
    seconds: float
    title: str


@dataclass(frozen=True)
class Axes:
    """What both charts share: the window, the time ticks and their zone."""

    start: float
    end: float
    hours: int
    x_ticks: tuple[Tick, ...]
    zone: str

    def x(self, minute: float) -> float:
        return LEFT + (minute - self.start) / (self.end - self.start) * PLOT_WIDTH

    @property
    def minute_width(self) -> float:
        return PLOT_WIDTH / (self.hours * 60)


@dataclass(frozen=True)
class MailChart:
    axes: Axes
    bars: tuple[Bar, ...]
    y_ticks: tuple[Tick, ...]
    totals: dict[str, int]  # per category, over the window
    peak: int  # the most mails in one minute


@dataclass(frozen=True)
class LatencyChart:
    axes: Axes
    points: tuple[Point, ...]
    y_ticks: tuple[Tick, ...]
    deliveries: int
    worst_p99: float | None


def axes(now: float, hours: int) -> Axes:
    """The window ending with the current minute, ticks on round local times."""
    end = (math.floor(now / 60) + 1) * 60.0
    start = end - hours * 3600.0
    frame = Axes(start, end, hours, (), zone(now))
    step = {1: 600, 6: 3600, 24: 7200}.get(hours, 3600)
    ticks = tuple(Tick(frame.x(at), clock(at)) for at in _tick_times(start, end, step))
    return replace(frame, x_ticks=ticks)


def _tick_times(start: float, end: float, step: int) -> Iterable[float]:
    """Multiples of `step` on the local clock (a tick at 14:00 local, not 14:00 UTC)."""
    offset = datetime.fromtimestamp(start).astimezone().utcoffset()
    shift = offset.total_seconds() if offset else 0.0
    at = math.ceil((start + shift) / step) * step - shift
    while at <= end:
        yield at
        at += step


def mail_chart(rows: Iterable[MinuteCount], frame: Axes) -> MailChart:
    """Stacked bars per minute, one segment per category with mail."""
    minutes: dict[float, dict[str, int]] = {}
    totals = dict.fromkeys(CATEGORIES, 0)
    for row in rows:
        if not frame.start <= row.minute < frame.end:
            continue
        category = CATEGORY_OF.get(row.outcome, "other")
        per = minutes.setdefault(row.minute, {})
        per[category] = per.get(category, 0) + row.count
        totals[category] += row.count
    peak = max((sum(per.values()) for per in minutes.values()), default=0)
    top = nice_ceiling(peak)
    bars = [
        bar for minute in sorted(minutes) for bar in _stack(frame, minute, minutes[minute], top)
    ]
    ticks = tuple(Tick(_y_count(v, top), str(v)) for v in _count_ticks(top))
    return MailChart(frame, tuple(bars), ticks, totals, peak)


def _stack(frame: Axes, minute: float, per: dict[str, int], top: int) -> Iterable[Bar]:
    width = max(1.0, frame.minute_width - (1.0 if frame.minute_width >= 3 else 0.0))
    base, x, label = 0, frame.x(minute), clock(minute)
    for category in CATEGORIES:
        count = per.get(category, 0)
        if not count:
            continue
        y_top, y_base = _y_count(base + count, top), _y_count(base, top)
        title = f"{label}: {count} {category}"
        yield Bar(x, y_top, width, y_base - y_top, category, minute, count, title)
        base += count


def _y_count(value: float, top: int) -> float:
    return TOP + PLOT_HEIGHT * (1 - value / top)


def nice_ceiling(value: float) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... at or above `value` (at least 1)."""
    magnitude = 1
    while True:
        for step in (1, 2, 5):
            if step * magnitude >= value:
                return step * magnitude
        magnitude *= 10


def _count_ticks(top: int) -> list[int]:
    if top <= 5:
        return list(range(top + 1))
    return [0, top // 5, 2 * top // 5, 3 * top // 5, 4 * top // 5, top]


def latency_chart(rows: Sequence[MinuteLatency], frame: Axes) -> LatencyChart:
    """p50 and p99 per minute on a logarithmic axis from 1 ms."""
    shown = [r for r in rows if frame.start <= r.minute < frame.end]
    worst = max((r.p99 for r in shown), default=None)
    ticks = _latency_ticks(worst or 1.0)
    low, high = ticks[0][0], ticks[-1][0]
    points = []
    for row in shown:
        for series, seconds in (("p50", row.p50), ("p99", row.p99)):
            title = (
                f"{clock(row.minute)}: {row.deliveries} event(s) delivered, "
                f"p50 {seconds_words(row.p50)}, p99 {seconds_words(row.p99)}"
            )
            x = frame.x(row.minute) + frame.minute_width / 2
            y = _y_log(seconds, low, high)
            points.append(Point(x, y, series, row.minute, seconds, title))
    y_ticks = tuple(Tick(_y_log(at, low, high), label) for at, label in ticks)
    deliveries = sum(r.deliveries for r in shown)
    return LatencyChart(frame, tuple(points), y_ticks, deliveries, worst)


def _latency_ticks(worst: float) -> list[tuple[float, str]]:
    ticks = [LATENCY_TICKS[0]]
    for tick in LATENCY_TICKS[1:]:
        ticks.append(tick)
        if tick[0] >= max(worst, 1.0):
            break
    return ticks


def _y_log(seconds: float, low: float, high: float) -> float:
    clamped = min(max(seconds, low), high)
    share = (math.log10(clamped) - math.log10(low)) / (math.log10(high) - math.log10(low))
    return TOP + PLOT_HEIGHT * (1 - share)


def seconds_words(seconds: float) -> str:
    """`12 ms`, `1.4 s`, `3.0 min`, `2.5 h`."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def number(value: float) -> str:
    """A coordinate as short as SVG allows: `70`, `12.5` (the charts have thousands)."""
    return f"{value:.1f}".removesuffix(".0")
