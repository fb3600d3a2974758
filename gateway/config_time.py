"""The time-related sections of config.toml: `[schedules.NAME]`, `[[maintenance]]`, `[[heartbeat]]`.

Read by `gateway.config`'s reader (passed in as `reader`), so every mistake gets the same
file:line problem as the rest of the file. Kept apart from config.py because these sections
are self-contained: they only need the service names and each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Protocol

from gateway.schedules import (
    DAY_GROUPS,
    WEEKDAYS,
    Hours,
    MaintenanceWindow,
    Schedule,
    check_zone,
    parse_duration,
    parse_hours,
    to_instant,
)


class _Reader(Protocol):
    """What these readers use of `gateway.config`'s reader (no import: config imports us)."""

    problems: list[Any]

    def problem(self, key: str, message: str) -> None: ...
    def line_of(self, dotted: str) -> int | None: ...
    def in_section(self, name: str, nth: int = 0) -> None: ...
    def table(self, data: dict[str, Any], key: str) -> dict[str, Any]: ...
    def array(self, data: dict[str, Any], key: str) -> list[dict[str, Any]]: ...
    def check_keys(self, where: str, table: dict[str, Any], allowed: set[str]) -> None: ...
    def get(
        self, where: str, table: dict[str, Any], key: str, kind: Any, *args: Any, **kw: Any
    ) -> Any: ...


MAINTENANCE_MODES = ("suppress", "downgrade")
SEVERITIES = ("critical", "error", "warning", "info")
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class HeartbeatSettings:
    """Mail that must keep arriving: missing for `interval + grace` -> an incident
    `heartbeat:<name>` on `service`; the next matching mail resolves it."""

    name: str
    service: str
    rule: str  # the rule (in the service's files) whose match counts as the mail arriving
    interval_seconds: float
    grace_seconds: float = 0.0
    severity: str = "critical"
    line: int | None = field(default=None, compare=False)  # of its `rule =`
    # ... or conditions in the rule syntax (compiled by gateway.decide.heartbeats), any mail
    # of the service meeting them counts, whatever rule decides it
    conditions: tuple[Any, ...] = ()
    match: str = "all"
    index: int = field(default=0, compare=False)  # its place among the [[heartbeat]] tables

    @property
    def incident_key(self) -> str:
        return f"heartbeat:{self.name}"

    @property
    def deadline_seconds(self) -> float:
        return self.interval_seconds + self.grace_seconds


def read_schedules(reader: _Reader, data: dict[str, Any]) -> dict[str, Schedule]:
    schedules: dict[str, Schedule] = {}
    for name, table in reader.table(data, "schedules").items():
        reader.in_section(f"schedules.{name}")
        where = f"schedule {name!r}"
        if not _NAME.match(name):
            reader.problem(where, "a schedule name may use letters, digits, _ and - only")
        elif not isinstance(table, dict):
            reader.problem(where, "must be a table: [schedules.NAME] with timezone and hours")
        else:
            schedule = _schedule(reader, where, name, table)
            if schedule is not None:
                schedules[name] = schedule
    return schedules


def _schedule(reader: _Reader, w: str, name: str, t: dict[str, Any]) -> Schedule | None:
    allowed = {"timezone", "holidays", "exceptions", *WEEKDAYS, *DAY_GROUPS}
    reader.check_keys(w, t, allowed)
    zone = reader.get(w, t, "timezone", str, "UTC", required=True, check=check_zone)
    weekly: list[tuple[Hours, ...]] = [()] * 7
    for group, days in DAY_GROUPS.items():  # groups first: a named day overrides its group
        if group not in t:
            continue
        hours = _hours_list(reader, f"{w}.{group}", t[group])
        for day in days:
            weekly[WEEKDAYS.index(day)] = hours
    for number, day in enumerate(WEEKDAYS):
        if day in t:
            weekly[number] = _hours_list(reader, f"{w}.{day}", t[day])
    exceptions = {day: () for day in _dates(reader, f"{w}.holidays", t.get("holidays", []))}
    exceptions.update(_exceptions(reader, f"{w}.exceptions", t.get("exceptions", {})))
    if zone is None:
        return None
    return Schedule(name, zone, tuple(weekly), exceptions)


def _hours_list(reader: _Reader, where: str, value: Any) -> tuple[Hours, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        reader.problem(where, 'must be a list of "HH:MM-HH:MM" ranges, e.g. ["09:00-17:00"]')
        return ()
    hours = []
    for item in items:
        try:
            hours.append(parse_hours(item))
        except ValueError as exc:
            reader.problem(where, str(exc))
    return tuple(hours)


def _dates(reader: _Reader, where: str, value: Any) -> list[date]:
    if not isinstance(value, list):
        reader.problem(where, "must be a list of dates, e.g. [2026-12-25, 2027-01-01]")
        return []
    days = []
    for item in value:
        day = _date(item)
        if day is None:
            reader.problem(where, f"{item!r} is not a date (write 2026-12-25)")
        else:
            days.append(day)
    return days


def _date(value: Any) -> date | None:
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            return None
    return None


def _exceptions(reader: _Reader, where: str, value: Any) -> dict[date, tuple[Hours, ...]]:
    """`[schedules.X.exceptions]` "2026-12-24" = ["09:00-12:00"]: other hours on that date."""
    if not isinstance(value, dict):
        reader.problem(where, 'must be a table of "YYYY-MM-DD" = ["HH:MM-HH:MM", ...]')
        return {}
    result = {}
    for key, hours in value.items():
        day = _date(key)
        if day is None:
            reader.problem(f"{where}.{key}", f'{key!r} is not a date (write "2026-12-24")')
            continue
        result[day] = _hours_list(reader, f"{where}.{key}", hours)
    return result


# --------------------------------------------------------------------------- maintenance


def read_maintenance(
    reader: _Reader, data: dict[str, Any], services: set[str], schedules: dict[str, Schedule]
) -> tuple[MaintenanceWindow, ...]:
    windows = []
    for index, t in enumerate(reader.array(data, "maintenance"), 1):
        reader.in_section("maintenance", index - 1)
        window = _window(reader, index, t, services, schedules)
        if window is not None:
            windows.append(window)
    return tuple(windows)


def _window(
    reader: _Reader,
    index: int,
    t: dict[str, Any],
    services: set[str],
    schedules: dict[str, Schedule],
) -> MaintenanceWindow | None:
    w = f"maintenance #{index}"
    allowed = {"name", "service", "mode", "severity", "start", "end", "timezone", "schedule"}
    reader.check_keys(w, t, allowed)
    name = reader.get(w, t, "name", str, f"maintenance{index}", required=True)
    w = f"maintenance {name!r}"
    before = len(reader.problems)
    service = _service(reader, w, t, services)
    mode = reader.get(w, t, "mode", str, "suppress", check=_one_of(MAINTENANCE_MODES))
    severity = reader.get(w, t, "severity", str, "warning", check=_one_of(SEVERITIES))
    schedule_name = reader.get(w, t, "schedule", str, None)
    schedule = None
    start = end = None
    if schedule_name is not None:
        schedule = schedules.get(schedule_name)
        if schedule is None:
            reader.problem(f"{w}.schedule", _unknown_schedule(schedule_name, schedules))
        if "start" in t or "end" in t:
            reader.problem(w, "give either schedule (recurring) or start and end (once)")
    else:
        start, end = _span(reader, w, t)
    if len(reader.problems) > before:
        return None
    return MaintenanceWindow(name, service, mode, severity, start, end, schedule)


def _span(reader: _Reader, w: str, t: dict[str, Any]) -> tuple[float | None, float | None]:
    zone = reader.get(w, t, "timezone", str, None, check=check_zone)
    ends = []
    for key in ("start", "end"):
        value = t.get(key)
        if value is None:
            reader.problem(f"{w}.{key}", "is required (or give schedule for a recurring window)")
            ends.append(None)
        elif not isinstance(value, datetime):
            reader.problem(f"{w}.{key}", "must be a TOML date-time, e.g. 2026-12-01T22:00:00")
            ends.append(None)
        else:
            instant = to_instant(value, zone)
            if instant is None:
                reader.problem(f"{w}.{key}", "has no UTC offset: add one (+01:00) or set timezone")
            ends.append(instant)
    start, end = ends
    if start is not None and end is not None and end <= start:
        reader.problem(f"{w}.end", "must be after start")
    return start, end


# --------------------------------------------------------------------------- heartbeats


def read_heartbeats(
    reader: _Reader, data: dict[str, Any], services: set[str]
) -> tuple[HeartbeatSettings, ...]:
    beats: list[HeartbeatSettings] = []
    for index, t in enumerate(reader.array(data, "heartbeat"), 1):
        reader.in_section("heartbeat", index - 1)
        beat = _heartbeat(reader, index, t, services)
        if beat is None:
            continue
        if any(b.name == beat.name for b in beats):
            reader.problem(f"heartbeat {beat.name!r}.name", "duplicate heartbeat name")
        beats.append(beat)
    return tuple(beats)


def _heartbeat(
    reader: _Reader, index: int, t: dict[str, Any], services: set[str]
) -> HeartbeatSettings | None:
    w = f"heartbeat #{index}"
    allowed = {"name", "service", "rule", "conditions", "match", "interval", "grace", "severity"}
    reader.check_keys(w, t, allowed)
    name = reader.get(w, t, "name", str, f"heartbeat{index}", required=True)
    w = f"heartbeat {name!r}"
    before = len(reader.problems)
    if not _NAME.match(name):
        reader.problem(f"{w}.name", "a heartbeat name may use letters, digits, _ and - only")
    service = _service(reader, w, t, services)
    rule = reader.get(w, t, "rule", str, "")
    conditions = reader.get(w, t, "conditions", list, [])
    match = reader.get(w, t, "match", str, "all", check=_one_of(("all", "any")))
    if bool(rule) == bool(conditions):
        reader.problem(w, "give either rule (a rule's name) or conditions (rule syntax)")
    interval = _duration(reader, w, t, "interval", required=True)
    grace = _duration(reader, w, t, "grace", required=False)
    severity = reader.get(w, t, "severity", str, "critical", check=_one_of(SEVERITIES))
    if len(reader.problems) > before:
        return None
    line = reader.line_of(f"{w}.rule")  # where an unknown rule is reported (rules load later)
    return HeartbeatSettings(
        name, service, rule, interval, grace, severity, line, tuple(conditions), match, index - 1
    )


def _duration(reader: _Reader, w: str, t: dict[str, Any], key: str, *, required: bool) -> float:
    if key not in t:
        if required:
            reader.problem(f"{w}.{key}", 'is required, e.g. "24h"')
        return 0.0
    try:
        return parse_duration(t[key])
    except ValueError as exc:
        reader.problem(f"{w}.{key}", str(exc))
        return 0.0


# --------------------------------------------------------------------------- shared


def _service(reader: _Reader, w: str, t: dict[str, Any], services: set[str]) -> str:
    service = reader.get(w, t, "service", str, "", required=True)
    if service and service not in services:
        known = ", ".join(sorted(services))
        reader.problem(f"{w}.service", f"unknown service {service!r} (configured: {known})")
    return service


def _unknown_schedule(name: str, schedules: dict[str, Schedule]) -> str:
    known = ", ".join(sorted(schedules)) or "none; define [schedules.NAME] in config.toml"
    return f"unknown schedule {name!r} (defined: {known})"


def _one_of(choices: tuple[str, ...]) -> Any:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)} (got {v!r})"
