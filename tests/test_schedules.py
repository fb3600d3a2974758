"""Named schedules: weekly hours in an IANA zone, holidays, dated exceptions, DST change days.

Every instant is given (never the wall clock): the functions under test judge the time they
are handed, which is what makes these days reproducible.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.schedules import is_within, parse_duration, parse_hours

UTC = ZoneInfo("UTC")


def utc(text: str) -> float:
    """'2026-03-29 08:30' read as UTC -> Unix time."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def write_config(tmp_path: Path, extra: str) -> Path:
    (tmp_path / "rules").mkdir(exist_ok=True)
    (tmp_path / "rules" / "r.toml").write_text("")
    path = tmp_path / "config.toml"
    path.write_text(
        '[gateway]\nrules_dir = "rules"\n[[service]]\nname = "helpdesk"\n'
        'addresses = ["desk@*"]\nrules = ["r.toml"]\n' + extra
    )
    return path


BUSINESS = """
[schedules.business_hours]
timezone = "{zone}"
weekdays = ["09:00-17:00"]
friday = ["09:00-15:00"]
holidays = [2026-12-25, "2026-12-26"]
[schedules.business_hours.exceptions]
"2026-12-24" = ["09:00-12:00"]
"""


def schedule(tmp_path: Path, zone: str = "Europe/Berlin", extra: str = ""):
    config = load_config(write_config(tmp_path, BUSINESS.format(zone=zone) + extra))
    return config.schedules


# --------------------------------------------------------------------------- Europe/Berlin


@pytest.mark.parametrize(
    ("instant", "within"),
    [
        # Friday 2026-03-27, CET (UTC+1): 09:00 local is 08:00 UTC; Friday closes at 15:00
        pytest.param("2026-03-27 07:59", False, id="fri-before-open"),
        pytest.param("2026-03-27 08:00", True, id="fri-opens-0900-cet"),
        pytest.param("2026-03-27 13:59", True, id="fri-1459-cet"),
        pytest.param("2026-03-27 14:00", False, id="fri-closes-1500"),
        # Sunday 2026-03-29: clocks go 02:00 -> 03:00; a weekend day, closed all day
        pytest.param("2026-03-29 10:00", False, id="dst-sunday-closed"),
        # Monday 2026-03-30, CEST (UTC+2): 09:00 local is now 07:00 UTC
        pytest.param("2026-03-30 06:59", False, id="mon-0859-cest"),
        pytest.param("2026-03-30 07:00", True, id="mon-0900-cest"),
        pytest.param("2026-03-30 14:59", True, id="mon-1659-cest"),
        pytest.param("2026-03-30 15:00", False, id="mon-1700-cest"),
        # Friday 2026-10-23 (CEST) and Monday 2026-10-26 (CET, after the 25th's change)
        pytest.param("2026-10-23 07:00", True, id="fri-0900-cest"),
        pytest.param("2026-10-26 07:30", False, id="mon-0830-cet"),
        pytest.param("2026-10-26 08:00", True, id="mon-0900-cet"),
    ],
)
def test_business_hours_follow_berlin_wall_clock_across_dst(
    tmp_path: Path, instant: str, within: bool
) -> None:
    assert is_within(schedule(tmp_path)["business_hours"], utc(instant)) is within


def test_holidays_close_the_whole_day_and_exceptions_change_its_hours(tmp_path: Path) -> None:
    business = schedule(tmp_path)["business_hours"]
    assert is_within(business, utc("2026-12-23 10:00"))  # Wednesday 11:00 CET: open
    assert not is_within(business, utc("2026-12-25 10:00"))  # Friday, holiday (TOML date)
    assert not is_within(business, utc("2026-12-26 10:00"))  # Saturday anyway ("2026-12-26")
    assert is_within(business, utc("2026-12-24 10:00"))  # Christmas Eve: 09:00-12:00 ...
    assert not is_within(business, utc("2026-12-24 11:30"))  # ... closed at 12:30 local


def test_a_range_through_the_spring_gap_and_the_autumn_repeat(tmp_path: Path) -> None:
    """01:00-04:00 local on the change days: the skipped hour does not exist (2 h long), the
    repeated hour counts both times (4 h long)."""
    extra = '[schedules.night]\ntimezone = "Europe/Berlin"\ndaily = ["01:00-04:00"]\n'
    night = schedule(tmp_path, extra=extra)["night"]
    # spring, 2026-03-29: 01:00 CET = 00:00 UTC; 04:00 CEST = 02:00 UTC
    assert not is_within(night, utc("2026-03-28 23:59"))
    assert is_within(night, utc("2026-03-29 00:00"))
    assert is_within(night, utc("2026-03-29 01:30"))  # 03:30 CEST, after the gap
    assert not is_within(night, utc("2026-03-29 02:00"))
    # autumn, 2026-10-25: 01:00 CEST = 23:00 UTC the day before; 04:00 CET = 03:00 UTC
    assert is_within(night, utc("2026-10-24 23:00"))
    assert is_within(night, utc("2026-10-25 00:30"))  # 02:30 CEST, first time
    assert is_within(night, utc("2026-10-25 01:30"))  # 02:30 CET, second time
    assert not is_within(night, utc("2026-10-25 03:00"))


# --------------------------------------------------------------------------- America/New_York


@pytest.mark.parametrize(
    ("instant", "within"),
    [
        # Friday 2026-03-06, EST (UTC-5): 09:00 local is 14:00 UTC
        pytest.param("2026-03-06 13:59", False, id="fri-0859-est"),
        pytest.param("2026-03-06 14:00", True, id="fri-0900-est"),
        # Sunday 2026-03-08: clocks go 02:00 -> 03:00; Monday 09:00 EDT (UTC-4) is 13:00 UTC
        pytest.param("2026-03-09 12:59", False, id="mon-0859-edt"),
        pytest.param("2026-03-09 13:00", True, id="mon-0900-edt"),
        pytest.param("2026-03-09 20:59", True, id="mon-1659-edt"),
        pytest.param("2026-03-09 21:00", False, id="mon-1700-edt"),
        # Sunday 2026-11-01 back to EST; Monday 2026-11-02 09:00 EST is 14:00 UTC again
        pytest.param("2026-10-30 13:00", True, id="fri-0900-edt"),
        pytest.param("2026-11-02 13:30", False, id="mon-0830-est"),
        pytest.param("2026-11-02 14:00", True, id="mon-0900-est"),
    ],
)
def test_business_hours_follow_new_york_wall_clock_across_dst(
    tmp_path: Path, instant: str, within: bool
) -> None:
    business = schedule(tmp_path, "America/New_York")["business_hours"]
    assert is_within(business, utc(instant)) is within


def test_an_overnight_range_belongs_to_the_day_it_starts(tmp_path: Path) -> None:
    extra = (
        '[schedules.on_call]\ntimezone = "America/New_York"\nweekdays = ["22:00-06:00"]\n'
        "holidays = [2026-11-26]\n"
    )
    on_call = schedule(tmp_path, "America/New_York", extra)["on_call"]
    assert is_within(on_call, utc("2026-11-03 04:00"))  # Mon 23:00 EST
    assert is_within(on_call, utc("2026-11-03 10:00"))  # Tue 05:00, Monday's range
    assert not is_within(on_call, utc("2026-11-03 11:00"))  # Tue 06:00
    assert not is_within(on_call, utc("2026-11-27 04:00"))  # Thanksgiving 23:00: holiday
    assert not is_within(on_call, utc("2026-11-27 10:00"))  # its morning too
    assert is_within(on_call, utc("2026-11-28 04:00"))  # Friday 23:00


# --------------------------------------------------------------------------- parsing, errors


def test_hours_and_durations_parse() -> None:
    assert parse_hours("9:00-17:30") == parse_hours("09:00 - 17:30")
    assert parse_hours("00:00-24:00").covers(23 * 60 + 59)
    assert parse_duration("24h") == 86400
    assert parse_duration("1h30m") == 5400
    assert parse_duration(90) == 90


@pytest.mark.parametrize(
    ("snippet", "line", "words"),
    [
        pytest.param(
            'timezone = "Europe/Berlinn"', 8, "unknown time zone 'Europe/Berlinn'", id="zone"
        ),
        pytest.param('monday = ["9-17"]', 9, "is not HH:MM-HH:MM", id="format"),
        pytest.param('monday = ["09:00-25:00"]', 9, "outside 00:00-24:00", id="hour"),
        pytest.param('monday = ["09:00-09:00"]', 9, "is empty", id="empty"),
        pytest.param("holidays = [2026-13-01]", None, "TOML syntax error", id="toml-date"),
        pytest.param('holidays = ["christmas"]', 9, "is not a date", id="date"),
        pytest.param('mondays = ["09:00-17:00"]', 9, "did you mean 'monday'", id="key"),
    ],
)
def test_bad_schedules_are_reported_with_file_and_line(
    tmp_path: Path, snippet: str, line: int | None, words: str
) -> None:
    if not snippet.startswith("timezone"):
        snippet = 'timezone = "Europe/Berlin"\n' + snippet
    path = write_config(tmp_path, "[schedules.business]\n" + snippet + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    text = str(caught.value)
    assert words in text
    if line is not None:
        assert f"{path}:{line}:" in text, text
