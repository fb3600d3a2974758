"""Named schedules (business hours, deploy windows) and the one question asked of them:
is this instant within the schedule?

Hours are wall-clock times in the schedule's IANA zone, so "09:00-17:00" stays nine to five
across a daylight-saving change: on the change day the instant is converted with `zoneinfo`
and compared as local time. A range whose end is not after its start runs past midnight into
the next day ("22:00-06:00"); it belongs to the day it starts on, so a holiday or dated
exception of that day governs all of it. Pure functions over frozen values: the rules, the
processor's maintenance windows and the tests all judge time the same way, at an instant
they are given (never the wall clock read here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
DAY_GROUPS = {"daily": WEEKDAYS, "weekdays": WEEKDAYS[:5], "weekend": WEEKDAYS[5:]}  # broad first
_RANGE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
_END_OF_DAY = 24 * 60


@dataclass(frozen=True)
class Hours:
    """One opening range in minutes after local midnight; `end <= start` runs past midnight."""

    start: int
    end: int

    @property
    def overnight(self) -> bool:
        return self.end <= self.start

    def covers(self, minute: int) -> bool:
        """Whether a minute of the range's own day falls in it."""
        return self.start <= minute < (_END_OF_DAY if self.overnight else self.end)

    def spills_into(self, minute: int) -> bool:
        """Whether a minute of the next day falls in the part after midnight."""
        return self.overnight and minute < self.end


@dataclass(frozen=True)
class Schedule:
    """Weekly hours per weekday (Monday first), dated exceptions (a holiday has no hours)."""

    name: str
    timezone: str
    weekly: tuple[tuple[Hours, ...], ...] = ((),) * 7
    exceptions: dict[date, tuple[Hours, ...]] = field(default_factory=dict, compare=False)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def hours_on(self, day: date) -> tuple[Hours, ...]:
        """The day's ranges: its dated exception if it has one, else its weekday's."""
        if day in self.exceptions:
            return self.exceptions[day]
        return self.weekly[day.weekday()]


def parse_hours(text: str) -> Hours:
    """'09:00-17:00' -> Hours; ValueError with the reason, for the config's file:line error."""
    found = _RANGE.match(text)
    if not found:
        raise ValueError(f"{text!r} is not HH:MM-HH:MM (e.g. '09:00-17:00')")
    sh, sm, eh, em = (int(g) for g in found.groups())
    if sh > 23 or sm > 59 or em > 59 or eh > 24 or (eh == 24 and em):
        raise ValueError(f"{text!r} has a time outside 00:00-24:00")
    start, end = sh * 60 + sm, eh * 60 + em
    if start == end % _END_OF_DAY and end != _END_OF_DAY:
        raise ValueError(f"{text!r} is empty: start and end are the same time")
    return Hours(start, end)


def check_zone(name: str) -> str | None:
    """None if `name` is an IANA zone zoneinfo knows, else what is wrong."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return f"unknown time zone {name!r}; use an IANA name like 'Europe/Berlin' or 'UTC'"
    return None


def local_time(schedule: Schedule, at: float) -> datetime:
    """The instant as wall-clock time in the schedule's zone."""
    return datetime.fromtimestamp(at, schedule.zone)


def is_within(schedule: Schedule, at: float) -> bool:
    """Whether the instant (Unix time) falls in the schedule's hours."""
    local = local_time(schedule, at)
    minute = local.hour * 60 + local.minute
    today = local.date()
    if any(hours.covers(minute) for hours in schedule.hours_on(today)):
        return True
    yesterday = today - timedelta(days=1)
    return any(hours.spills_into(minute) for hours in schedule.hours_on(yesterday))


def to_instant(value: datetime | date, timezone: str | None) -> float | None:
    """A config datetime -> Unix time; a local one needs `timezone` (None if it is missing)."""
    if not isinstance(value, datetime):
        value = datetime.combine(value, time())
    if value.tzinfo is None:
        if timezone is None:
            return None
        value = value.replace(tzinfo=ZoneInfo(timezone))
    return value.timestamp()


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([dhms])")
_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(value: str | int | float) -> float:
    """'24h', '1h30m', '90s', '2d' or a number of seconds -> seconds; ValueError if not."""
    if isinstance(value, bool):
        raise ValueError("a duration is '24h', '90m', '1h30m' or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip().lower()
        parts = _DURATION.findall(text)
        if not parts or _DURATION.sub("", text).strip():
            raise ValueError(f"{value!r} is not a duration like '24h', '90m' or '1h30m'")
        seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in parts)
    if seconds <= 0:
        raise ValueError("a duration must be longer than 0")
    return seconds


@dataclass(frozen=True)
class MaintenanceWindow:
    """A service's planned quiet time: once (start..end) or recurring (a named schedule).

    While it is active, triggers are suppressed (recorded, nothing sent) or downgraded to
    `severity`; acknowledges and resolves always go through."""

    name: str
    service: str
    mode: str = "suppress"  # suppress | downgrade
    severity: str = "warning"  # what a downgraded trigger is sent with
    start: float | None = None
    end: float | None = None
    schedule: Schedule | None = None

    def active_at(self, at: float) -> bool:
        if self.schedule is not None:
            return is_within(self.schedule, at)
        return self.start is not None and self.end is not None and self.start <= at < self.end

    def describe(self) -> str:
        """'once, 2026-12-01 21:00 UTC - 2026-12-02 01:00 UTC' or 'whenever deploys is open'."""
        if self.schedule is not None:
            return f"whenever schedule {self.schedule.name} is open ({self.schedule.timezone})"
        return f"once, {_utc(self.start)} - {_utc(self.end)}"


def _utc(at: float | None) -> str:
    if at is None:
        return "?"
    return datetime.fromtimestamp(at, ZoneInfo("UTC")).strftime("%Y-%m-%d %H:%M UTC")
