"""WHERE clauses that both backends build alike; `mark` is the driver's placeholder (`?` for
SQLite, `%s` for psycopg), the only difference between them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def where(conditions: Sequence[str]) -> str:
    return f"WHERE {' AND '.join(conditions)}" if conditions else ""


def job_filter(
    outcomes: Sequence[str] | None, service: str | None, mark: str
) -> tuple[list[str], list[Any]]:
    """Conditions (and arguments) on jobs `j`: these outcomes ('pending': not decided yet),
    one service."""
    conditions: list[str] = []
    args: list[Any] = []
    if outcomes:
        decided = [o for o in outcomes if o != "pending"]
        either = [f"j.outcome IN ({', '.join([mark] * len(decided))})"] if decided else []
        if "pending" in outcomes:
            either.append("j.state = 'pending'")
        conditions.append(f"({' OR '.join(either)})")
        args += decided
    if service is not None:
        conditions.append(f"j.service = {mark}")
        args.append(service)
    return conditions, args


def incident_filter(open_only: bool, service: str | None, mark: str) -> tuple[list[str], list[Any]]:
    """Conditions (and arguments) on incidents: open ones only, one service."""
    conditions = ["state IN ('triggered','acknowledged')"] if open_only else []
    if service is None:
        return conditions, []
    return [*conditions, f"service = {mark}"], [service]


def event_filter(incident_key: str | None, outcome: str | None, mark: str) -> tuple[str, list[str]]:
    """WHERE on webhook deliveries for a key and an outcome ('pending': not decided yet)."""
    clauses, args = [], []
    if incident_key:
        clauses.append(f"incident_key = {mark}")
        args.append(incident_key)
    if outcome == "pending":
        clauses.append("state = 'pending'")
    elif outcome:
        clauses.append(f"state = 'done' AND outcome = {mark}")
        args.append(outcome)
    return where(clauses), args
