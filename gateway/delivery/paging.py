"""What PagerDuty has been told about an incident: the answer to "was I paged for this?".

The local mirror says what the mail asked for (triggered, resolved); only the outbox knows
whether PagerDuty heard it. An incident whose trigger became a dead letter is open here and
unknown there, so every view of an incident (status page, `gateway incidents`) shows this
next to the state. Pure: the caller reads the incident's PagerDuty items from the store.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import StrEnum

from gateway.config import ServiceSettings
from gateway.decide.events import pagerduty_order_key
from gateway.store import Incident, OutboxItem, ReportStore


class DeliveryState(StrEnum):
    DELIVERED = "delivered"  # PagerDuty accepted the newest event of the incident
    PENDING = "pending"  # an event is queued or being retried
    NOT_DELIVERED = "NOT DELIVERED"  # the newest event is a dead letter, or nothing is sent
    UNKNOWN = "unknown"  # no event on record (past retention, or sent by an older setup)


@dataclass(frozen=True)
class Delivery:
    state: DeliveryState
    reason: str  # in words; '' when delivered with nothing to add
    items: tuple[int, ...]  # the incident's outbox items, newest first

    @property
    def ok(self) -> bool:
        return self.state == DeliveryState.DELIVERED

    def __str__(self) -> str:
        return f"{self.state}: {self.reason}" if self.reason else str(self.state)


def local_services(services: Sequence[ServiceSettings]) -> list[str]:
    """Services without a routing_key: their incidents stay here (the embedded default)."""
    return [s.name for s in services if not s.routing_key]


def local_mode_notice(services: Sequence[ServiceSettings]) -> str | None:
    """One plain sentence when PagerDuty delivery is off for some service (None: it is on)."""
    names = local_services(services)
    if not names:
        return None
    return (
        f"PagerDuty delivery is OFF for {', '.join(names)}: no routing_key (local mode), "
        "incidents are kept here and nothing is sent"
    )


def episode_start(incident: Incident) -> float:
    """Events older than this belong to an earlier opening of the same key."""
    return incident.opened_at or incident.first_seen


def delivery_of(store: ReportStore, incident: Incident, local: Collection[str]) -> Delivery:
    """What PagerDuty was told since the incident (last) opened; `local`: the services in
    local mode. Reads the key's newest items only (the head of a queue is among them)."""
    key = pagerduty_order_key(incident.service, incident.incident_key)
    items = store.outbox_of_keys([key], since=episode_start(incident), limit=20)
    return incident_delivery(items, local=incident.service in local)


def incident_delivery(items: Sequence[OutboxItem], *, local: bool) -> Delivery:
    """The delivery state of an incident from its PagerDuty items since it opened, newest
    first; `local`: its service has no routing_key now (local mode)."""
    ids = tuple(item.id for item in items)
    waiting = [item for item in items if item.state == "pending"]
    if waiting:
        return Delivery(DeliveryState.PENDING, _waiting(waiting[-1]), ids)
    if not items:
        if local:
            reason = "local mode (no routing_key): nothing is sent to PagerDuty"
            return Delivery(DeliveryState.NOT_DELIVERED, reason, ids)
        reason = "no PagerDuty event on record (decided without a routing_key, or past retention)"
        return Delivery(DeliveryState.UNKNOWN, reason, ids)
    newest = items[0]
    if newest.state == "dead":
        reason = f"{_event(newest)} is a dead letter: {newest.last_error or newest.response}"
        return Delivery(DeliveryState.NOT_DELIVERED, reason, ids)
    dead = [item.id for item in items if item.state == "dead"]
    note = f"an earlier event is a dead letter (#{dead[0]})" if dead else ""
    return Delivery(DeliveryState.DELIVERED, note, ids)


def _waiting(first: OutboxItem) -> str:
    """The item at the head of the key's queue: why it has not gone out yet."""
    if not first.attempts:
        return f"{_event(first)} is queued, not tried yet"
    return f"{_event(first)}: {first.attempts} attempt(s) failed, last: {first.last_error}"


def _event(item: OutboxItem) -> str:
    return f"the {item.payload.get('event_action', 'event')} (#{item.id})"
