"""An operator closes a stuck incident by hand (`gateway incidents resolve SERVICE KEY`).

A helpdesk that never sends its "resolved" mail leaves the local mirror open for good. The
operator resolves it locally; with `send`, the resolve event also goes to PagerDuty through
the outbox, behind whatever its key still has queued (per-key order holds), for the service
the incident belongs to (the sender adds that service's routing key). An incident already
resolved locally can still be resolved at PagerDuty that way, e.g. after a trigger that was
re-queued out of order. The decision, the incident change, the outbox item and an event-log
entry commit together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from gateway.config import ServiceSettings
from gateway.decide.events import build_event, pagerduty_order_key
from gateway.decide.incidents import apply_action, pinned_routing_key
from gateway.errors import GatewayError
from gateway.store import DecisionStore, Incident


class ResolveRefused(GatewayError):
    """The incident cannot be resolved as asked (none such, nothing to send it with)."""


@dataclass(frozen=True)
class ManualResolve:
    """What `resolve_incident` did: the incident after it, and the outbox item, if queued."""

    incident: Incident
    was_open: bool
    queued: int | None = None


def resolve_incident(
    store: DecisionStore,
    service: str,
    key: str,
    *,
    send: bool = False,
    settings: ServiceSettings | None = None,
    now: float | None = None,
) -> ManualResolve:
    """Resolve (service, key) locally and, with `send`, queue the resolve event; ResolveRefused
    if there is no such incident, or `send` without the service's routing key."""
    if send and (settings is None or not settings.routing_key):
        raise ResolveRefused(
            f"service {service!r} has no routing_key (local mode): nothing would be sent;"
            " leave out --send to resolve it locally"
        )
    now = time.time() if now is None else now
    with store.transaction():
        existing = store.incident(service, key)
        if existing is None:
            raise ResolveRefused(f"no incident {key!r} in service {service!r}")
        resolved = _resolved(existing, now)
        if resolved != existing:
            store.save_incident(resolved)
        queued = _queue_resolve(store, resolved, settings) if send else None
        detail = "resolved by an operator (gateway incidents resolve)"
        detail += f"; resolve event queued as outbox #{queued}" if queued else ""
        store.log_event("manual_resolve", service=service, incident_key=key, detail=detail)
    return ManualResolve(resolved, existing.is_open, queued)


def _resolved(existing: Incident, now: float) -> Incident:
    """The incident closed now, still pointing at the last mail it saw."""
    changed, _ = apply_action(
        existing, service=existing.service, key=existing.incident_key, action="resolve", now=now
    )
    if changed is None or changed is existing:
        return existing  # already resolved
    return replace(changed, last_message=existing.last_message)


def _queue_resolve(
    store: DecisionStore, incident: Incident, settings: ServiceSettings | None
) -> int:
    """The resolve, with the routing key that opened the incident (not a rotated one)."""
    service, key = incident.service, incident.incident_key
    current = settings.routing_key if settings is not None else None
    event = pinned_routing_key(
        build_event(action="resolve", dedup_key=key), incident, current or ""
    )
    return store.add_outbox("pagerduty", service, pagerduty_order_key(service, key), event, None)
