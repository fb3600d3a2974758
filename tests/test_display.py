"""Timestamps and ages as people read them (CLI tables, status page)."""

from __future__ import annotations

import re

import pytest

from gateway.display import age, age_of, when


def test_when_shows_local_seconds_and_a_dash_for_nothing() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", when(1_700_000_000.7))
    assert when(None) == "-"


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0s"), (59.4, "59s"), (90, "1.5m"), (3600, "1.0h"), (86400 * 2.5, "2.5d")],
)
def test_age_uses_the_largest_unit(seconds: float, shown: str) -> None:
    assert age(seconds) == shown


def test_age_of_counts_back_from_now() -> None:
    assert age_of(1000.0, now=1090.0) == "1.5m"
    assert age_of(None) == "-"
