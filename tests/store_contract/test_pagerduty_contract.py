"""Webhooks v3 deliveries: stored once (redeliveries by webhook id or event id act once),
decided once, and the incident look-ups by key and by PagerDuty id."""

from __future__ import annotations

from gateway.store import Store
from tests.store_support import incident


def add(store: Store, webhook_id: str | None, event_id: str | None, key: str = "k") -> int | None:
    return store.add_pagerduty_event(
        body='{"event": {}}',
        received_at=1000.0,
        webhook_id=webhook_id,
        event_id=event_id,
        event_type="incident.acknowledged",
        incident_key=key,
        pd_incident="PABC",
    )


def test_a_redelivery_by_webhook_id_or_event_id_is_stored_once(store: Store) -> None:
    first = add(store, "w1", "e1")
    assert first is not None
    assert add(store, "w1", "e2") is None
    assert add(store, "w2", "e1") is None
    assert add(store, None, "e3") is not None
    assert add(store, "w4", None) is not None
    assert len(store.pending_pagerduty_events()) == 3
    assert store.pending_pagerduty_events()[0].id == first


def test_an_event_is_decided_once(store: Store) -> None:
    event = add(store, "w1", "e1")
    assert event is not None
    assert store.finish_pagerduty_event(event, outcome="mirrored", service="helpdesk")
    assert not store.finish_pagerduty_event(event, outcome="again")
    assert store.pending_pagerduty_events() == []
    (listed,) = store.pagerduty_events(incident_key="k")
    assert (listed.state, listed.outcome, listed.service) == ("done", "mirrored", "helpdesk")
    assert listed.event_type == "incident.acknowledged" and listed.pd_incident == "PABC"
    assert store.pagerduty_events(incident_key="other") == []


def test_incidents_are_found_by_key_and_by_pagerduty_id(store: Store) -> None:
    store.save_incident(incident("VPN down", at=1000.0, pd_id="PX1", routing_key="R" * 32))
    store.save_incident(incident("VPN down", at=2000.0, service="other"))
    found = store.incidents_with_key("VPN down")
    assert [i.service for i in found] == ["other", "helpdesk"]
    by_id = store.incident_by_pagerduty_id("PX1")
    assert by_id is not None and by_id.routing_key == "R" * 32
    assert store.incident_by_pagerduty_id("") is None
    assert store.incident_by_pagerduty_id("nope") is None


def test_a_note_is_filed_under_the_key_it_was_found_by(store: Store) -> None:
    event = add(store, "w1", "e1", key="")
    assert event is not None
    store.finish_pagerduty_event(event, outcome="mirrored", incident_key="VPN down")
    assert [e.id for e in store.pagerduty_events(incident_key="VPN down")] == [event]


def test_retention_purges_decided_webhooks_and_keeps_pending_ones(store: Store) -> None:
    decided, pending = add(store, "w1", "e1"), add(store, "w2", "e2")
    assert decided is not None and pending is not None
    store.finish_pagerduty_event(decided, outcome="unknown_key")
    assert store.purge_plan(2000.0)["events"] == 1
    assert store.purge(2000.0)["events"] == 1
    assert [e.id for e in store.pagerduty_events()] == [pending]
    assert store.purge(2000.0)["events"] == 0


def test_deliveries_are_listed_and_counted_by_outcome(store: Store) -> None:
    mirrored, unknown, pending = (
        add(store, "w1", "e1"),
        add(store, "w2", "e2"),
        add(store, "w3", "e3"),
    )
    assert mirrored is not None and unknown is not None and pending is not None
    store.finish_pagerduty_event(mirrored, outcome="mirrored", service="helpdesk")
    store.finish_pagerduty_event(unknown, outcome="unknown_key")
    assert [e.id for e in store.pagerduty_events()] == [pending, unknown, mirrored]
    assert [e.id for e in store.pagerduty_events(outcome="unknown_key")] == [unknown]
    assert [e.id for e in store.pagerduty_events(outcome="pending")] == [pending]
    assert [e.id for e in store.pagerduty_events(limit=2)] == [pending, unknown]
    assert store.count_pagerduty_events() == 3
    assert store.count_pagerduty_events(outcome="pending") == 1
    assert store.count_pagerduty_events(outcome="mirrored") == 1
    assert store.count_pagerduty_events(outcome="discarded") == 0


def test_webhook_stats_are_the_pending_count_and_the_oldest_arrival(store: Store) -> None:
    assert store.webhook_stats() == (0, None)
    first = add(store, "w1", "e1")
    store.add_pagerduty_event(body="{}", received_at=1500.0, webhook_id="w2", event_id="e2")
    assert store.webhook_stats() == (2, 1000.0)
    assert first is not None
    store.finish_pagerduty_event(first, outcome="mirrored")
    assert store.webhook_stats() == (1, 1500.0)


def webhook_totals(store: Store) -> dict[tuple[str, tuple[str, ...]], float]:
    return {
        (metric, labels): value
        for metric, labels, value in store.metric_totals()
        if metric.startswith("webhooks_")
    }


def test_webhook_counters_count_received_and_decided_and_survive_retention(store: Store) -> None:
    decided, pending = add(store, "w1", "e1"), add(store, "w2", "e2")
    assert decided is not None and pending is not None
    store.finish_pagerduty_event(decided, outcome="unknown_key")
    expected = {
        ("webhooks_received", ()): 2,
        ("webhooks_decided", ("unknown_key",)): 1,
    }
    assert webhook_totals(store) == expected
    assert store.purge(2000.0)["events"] == 1
    assert webhook_totals(store) == expected  # counters never go down
