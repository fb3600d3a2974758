"""REST API actions a mail rule asks for (set_priority, set_urgency, add_note, reassign,
add_responders): outbox items of their own kind, queued in the decision's transaction.

The Events API cannot set priority, urgency, notes or assignments; PagerDuty's REST API can,
with a token (`[pagerduty] api_token`). Each action is one item, so each gets the outbox's
retries, dead letters and per-key order (`rest_order_key`: one incident's actions go out in the
order its mails asked for them). The item names the incident by its dedup key and, when the
mirror already knows it from a webhook, by PagerDuty's id; the sender looks the id up
otherwise (`GET /incidents?incident_key=`).
"""

from __future__ import annotations

from typing import Any

from gateway.store import DecisionStore, Incident

KIND = "pagerduty_rest"


def rest_order_key(service: str, dedup_key: str) -> str:
    return f"{KIND}:{service}:{dedup_key}"


def rest_payloads(
    actions: tuple[tuple[str, str], ...], key: str, incident: Incident | None
) -> list[dict[str, Any]]:
    """One outbox payload per action; `pd_id` only while it names this (open) incident."""
    pd_id = incident.pd_id if incident is not None and incident.is_open else ""
    return [
        {"action": action, "value": value, "incident_key": key, "pd_id": pd_id}
        for action, value in actions
    ]


def queue_rest_actions(
    store: DecisionStore,
    actions: tuple[tuple[str, str], ...],
    *,
    service: str,
    key: str,
    incident: Incident | None,
    job: int,
    enabled: bool,
) -> int:
    """Inside the decision's transaction: queue the actions (or record why not); how many."""
    if not actions:
        return 0
    if not enabled:
        names = ", ".join(a for a, _ in actions)
        store.log_event(
            "rest_not_configured",
            service=service,
            incident_key=key,
            detail=f"{names} not done: set [pagerduty] api_token to use the REST API",
        )
        return 0
    for payload in rest_payloads(actions, key, incident):
        store.add_outbox(KIND, service, rest_order_key(service, key), payload, job)
    return len(actions)
