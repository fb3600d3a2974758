"""The local incident mirror: how a trigger / acknowledge / resolve changes one (service, key).

Pure functions, so the semantics are testable without a database: a trigger for an open key is a
duplicate (counted; the processor coalesces it into the trigger already in the outbox, which
PagerDuty would dedup anyway); an acknowledge or resolve with no open incident is recorded and
harmless.
"""

from __future__ import annotations

from dataclasses import replace

from gateway.outcomes import Outcome
from gateway.store import Incident


def apply_action(
    existing: Incident | None,
    *,
    service: str,
    key: str,
    action: str,
    now: float,
    summary: str = "",
    message: int | None = None,
    case_message_id: str = "",
    routing_key: str = "",
    case_fields: str = "{}",
) -> tuple[Incident | None, str]:
    """Return the incident after `action` and the outcome name; None if nothing to record.

    A trigger that opens the incident records `routing_key` (its later events must use the
    same one) and the trigger mail's `case_fields` (JSON, for the helpdesk's notifications)."""
    if action == "trigger":
        opened = _trigger(existing, service, key, now, summary, message, case_message_id)
        if opened[1] == Outcome.TRIGGERED:
            incident = replace(opened[0], routing_key=routing_key, case_fields=case_fields)
            return incident, opened[1]
        return opened
    if existing is None or not existing.is_open:
        outcome = (
            Outcome.ACK_NO_INCIDENT if action == "acknowledge" else Outcome.RESOLVE_NO_INCIDENT
        )
        return existing, outcome
    if action == "acknowledge":
        changed = replace(
            existing,
            state="acknowledged",
            acknowledge_count=existing.acknowledge_count + 1,
            last_seen=now,
            last_message=message,
            changed_by="mail",
        )
        return changed, Outcome.ACKNOWLEDGED
    if action == "resolve":
        changed = replace(
            existing,
            state="resolved",
            resolve_count=existing.resolve_count + 1,
            last_seen=now,
            resolved_at=now,
            last_message=message,
            changed_by="mail",
        )
        return changed, Outcome.RESOLVED
    raise ValueError(f"unknown incident action {action!r}")


def _trigger(
    existing: Incident | None,
    service: str,
    key: str,
    now: float,
    summary: str,
    message: int | None,
    case_message_id: str,
) -> tuple[Incident, str]:
    if existing is not None and existing.is_open:
        changed = replace(
            existing,
            trigger_count=existing.trigger_count + 1,
            last_seen=now,
            last_message=message,
        )
        return changed, Outcome.DUPLICATE
    opened = Incident(
        service=service,
        incident_key=key,
        state="triggered",
        summary=summary,
        trigger_count=1,
        acknowledge_count=0,
        resolve_count=0,
        times_opened=(existing.times_opened if existing else 0) + 1,
        first_seen=existing.first_seen if existing else now,
        last_seen=now,
        opened_at=now,
        resolved_at=None,
        last_message=message,
        case_message_id=case_message_id,
        changed_by="mail",
    )
    return opened, Outcome.TRIGGERED


def pinned_routing_key(event: dict, incident: Incident | None, current: str) -> dict:
    """The event carrying the routing key its incident records, fixed when it is decided.

    PagerDuty drops an acknowledge or resolve sent with another key than the trigger's, so
    every event of an incident (its trigger too) goes out with the one key the incident records,
    even if the service's key is rotated while the event waits in the outbox (the sender uses a
    payload's own `routing_key` over the service's). An incident that records none (opened
    before keys were recorded) uses the service's current key."""
    key = (incident.routing_key if incident is not None else "") or current
    return {**event, "routing_key": key} if key else event
