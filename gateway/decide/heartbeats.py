"""Heartbeats (dead man's switch): mail that must keep arriving, such as a nightly backup report.

A `[[heartbeat]]` names a service and the rule whose match counts as the mail arriving. When
none has arrived for `interval + grace` (counted from the last one, or from when the gateway
first watched for it), the processor triggers `heartbeat:<name>` on that service; the next
matching mail resolves it. The state lives in the store, so a restart neither forgets a
missing heartbeat nor triggers it twice, and a deadline that passed while the gateway was down
is noticed as soon as it runs again.

Pure functions here; `Processor.check_heartbeats` and the processor's phase 2 do the writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path

from gateway.config_time import HeartbeatSettings
from gateway.errors import Problem, RuleError
from gateway.rules import Ruleset
from gateway.rules.loader import load_conditions
from gateway.rules.model import Condition
from gateway.schedules import Schedule
from gateway.store import HeartbeatState


def deadline(beat: HeartbeatSettings, state: HeartbeatState) -> float:
    """When the heartbeat counts as missing: interval + grace after the last sighting."""
    since = state.last_seen if state.last_seen is not None else state.watched_since
    return since + beat.deadline_seconds


def is_overdue(beat: HeartbeatSettings, state: HeartbeatState, now: float) -> bool:
    """Missing now, and not already reported as missing."""
    return state.missing_since is None and now >= deadline(beat, state)


def missing_summary(name: str, last_seen: float | None) -> str:
    seen = "never seen" if last_seen is None else f"last seen {_utc(last_seen)}"
    return f"Heartbeat {name}: expected mail did not arrive ({seen})"


def missing_details(beat: HeartbeatSettings, state: HeartbeatState) -> dict[str, str]:
    return {
        "heartbeat": beat.name,
        "rule": beat.rule,
        "expected_every": _hours(beat.interval_seconds),
        "grace": _hours(beat.grace_seconds),
        "last_seen": _utc(state.last_seen) if state.last_seen is not None else "never",
        "watched_since": _utc(state.watched_since),
    }


def matching(
    beats: Iterable[HeartbeatSettings], service: str, rule: str | None
) -> list[HeartbeatSettings]:
    """The heartbeats a mail decided by `rule` for `service` counts for."""
    if not rule:
        return []
    return [b for b in beats if b.service == service and b.rule == rule]


def compile_conditions(
    beats: Iterable[HeartbeatSettings], file: str, text: str, schedules: Mapping[str, Schedule]
) -> dict[str, tuple[Condition, ...]]:
    """Each heartbeat's own `conditions`, checked like a rule's; RuleError names config.toml's
    lines (found in `text`)."""
    compiled: dict[str, tuple[Condition, ...]] = {}
    problems: list[Problem] = []
    for beat in beats:
        if not beat.conditions:
            continue
        try:
            compiled[beat.name] = load_conditions(
                file,
                text,
                "heartbeat",
                beat.index,
                list(beat.conditions),
                label=f"heartbeat {beat.name!r}",
                schedules=schedules,
            )
        except RuleError as exc:
            problems.extend(exc.problems)
    if problems:
        raise RuleError(problems)
    return compiled


def rule_problems(
    beats: Iterable[HeartbeatSettings], rulesets: Mapping[str, Ruleset], config: Path
) -> list[Problem]:
    """A heartbeat whose rule is not among its service's rules could never be seen."""
    problems = []
    for beat in beats:
        ruleset = rulesets.get(beat.service)
        if not beat.rule or ruleset is None or any(r.name == beat.rule for r in ruleset.rules):
            continue
        known = ", ".join(repr(r.name) for r in ruleset.rules) or "none"
        problems.append(
            Problem(
                str(config),
                f"unknown rule {beat.rule!r} for service {beat.service!r} (its rules: {known})",
                beat.line,
                f"heartbeat {beat.name!r}.rule",
            )
        )
    return problems


def _utc(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _hours(seconds: float) -> str:
    if seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"
