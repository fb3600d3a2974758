"""The status page's charts as geometry: counts per category, stacking, scales and ticks."""

from __future__ import annotations

import pytest

from gateway.outcomes import Outcome
from gateway.store import REDELIVERED, MinuteCount, MinuteLatency
from gateway.web import chart

NOW = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


def frame(hours: int = 24) -> chart.Axes:
    return chart.axes(NOW, hours)


def test_the_window_ends_with_the_current_minute() -> None:
    axes = frame()
    assert axes.end == 1_700_000_040.0 and axes.end - axes.start == 24 * 3600
    assert axes.x(axes.start) == chart.LEFT
    assert axes.x(axes.end) == chart.LEFT + chart.PLOT_WIDTH
    assert axes.minute_width == 1.0 and frame(1).minute_width == 24.0


def test_time_ticks_are_round_local_times_inside_the_plot() -> None:
    for hours, count in ((24, 12), (6, 6), (1, 6)):
        ticks = frame(hours).x_ticks
        assert len(ticks) == count
        assert all(chart.LEFT <= t.at <= chart.LEFT + chart.PLOT_WIDTH for t in ticks)
        assert all(t.label[2] == ":" and t.label[3:5] in ("00", "10", "20", "30", "40", "50")
                   for t in ticks)  # fmt: skip


def test_outcomes_fall_into_the_chart_categories() -> None:
    minute = frame().end - 120
    rows = [
        MinuteCount(minute, Outcome.TRIGGERED, 3),
        MinuteCount(minute, Outcome.DUPLICATE, 1),
        MinuteCount(minute, REDELIVERED, 2),
        MinuteCount(minute, Outcome.RESOLVED, 1),
        MinuteCount(minute, Outcome.UNMATCHED, 4),
        MinuteCount(minute, Outcome.QUARANTINED, 1),
        MinuteCount(minute, Outcome.DISCARDED, 1),
        MinuteCount(minute, "pending", 1),
        MinuteCount(minute - 60, Outcome.TRIGGERED, 1),
        MinuteCount(frame().start - 60, Outcome.TRIGGERED, 50),  # before the window: left out
    ]
    mails = chart.mail_chart(rows, frame())
    assert mails.totals == {"triggered": 4, "duplicate": 3, "resolved": 1, "unmatched": 4,
                            "quarantined": 1, "other": 2}  # fmt: skip
    assert mails.peak == 14 and mails.y_ticks[-1].label == "20"
    assert sum(b.count for b in mails.bars) == sum(mails.totals.values())


def test_bars_of_one_minute_stack_from_the_axis_up() -> None:
    minute = frame().end - 60
    rows = [MinuteCount(minute, Outcome.TRIGGERED, 2), MinuteCount(minute, Outcome.UNMATCHED, 3)]
    first, second = chart.mail_chart(rows, frame()).bars
    bottom = chart.TOP + chart.PLOT_HEIGHT
    assert (first.category, second.category) == ("triggered", "unmatched")
    assert first.y + first.height == pytest.approx(bottom)
    assert second.y + second.height == pytest.approx(first.y)
    assert second.y == pytest.approx(chart.TOP)  # 5 of a scale topped at 5: full height
    assert first.height == pytest.approx(chart.PLOT_HEIGHT * 2 / 5)
    assert first.x == second.x == pytest.approx(frame().x(minute))
    assert first.title.endswith(": 2 triggered")


@pytest.mark.parametrize(
    ("value", "ceiling"), [(0, 1), (1, 1), (3, 5), (7, 10), (11, 20), (150, 200), (501, 1000)]
)
def test_nice_ceiling(value: int, ceiling: int) -> None:
    assert chart.nice_ceiling(value) == ceiling


def test_latency_points_on_a_log_scale() -> None:
    minute = frame().end - 60
    rows = [MinuteLatency(minute, 10, 0.05, 2.0), MinuteLatency(minute - 60, 1, 0.0001, 0.0001)]
    latency = chart.latency_chart(rows, frame())
    assert latency.deliveries == 11 and latency.worst_p99 == 2.0
    assert [t.label for t in latency.y_ticks] == ["1 ms", "10 ms", "100 ms", "1 s", "10 s"]
    ticks = {t.label: t.at for t in latency.y_ticks}
    p50, p99 = [p for p in latency.points if p.minute == minute]
    assert ticks["10 ms"] > p50.y > ticks["100 ms"]  # 50 ms: between the two
    assert ticks["1 s"] > p99.y > ticks["10 s"]
    fast = [p for p in latency.points if p.minute != minute]
    assert all(p.y == ticks["1 ms"] for p in fast)  # below the axis: drawn on it, titled true
    assert "p50 0 ms" in fast[0].title


@pytest.mark.parametrize(
    ("seconds", "words"),
    [(0.0123, "12 ms"), (1.44, "1.4 s"), (180, "3.0 min"), (9000, "2.5 h")],
)
def test_seconds_in_words(seconds: float, words: str) -> None:
    assert chart.seconds_words(seconds) == words
