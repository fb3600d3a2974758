"""The outbox's storm methods (issue 12): priority claims, a rate limit's choice inside the
claim, coalescing into an unclaimed item, absorbed repeats on the incident, storm state."""

from __future__ import annotations

import time
from dataclasses import replace

from gateway.delivery.pagerduty import RateBudget
from gateway.store import OutboxItem, OutboxResult, Store
from tests.store_support import Backend, incident

OWNER = "host:1"


def add(store: Store, key: str, priority: int = 1, service: str = "s", n: int = 0) -> int:
    with store.transaction():
        return store.add_outbox("pagerduty", service, key, {"n": n}, None, priority)


def test_priority_zero_heads_are_claimed_first_and_per_key_order_holds(store: Store) -> None:
    busy = add(store, "busy")
    busy_next = add(store, "busy", 0)  # a new opening of a busy key waits behind its head
    fresh = add(store, "fresh", 0)
    assert store.outbox_item(fresh).priority == 0  # type: ignore[union-attr]
    now = time.time() + 1
    assert [i.id for i in store.due_outbox(now)] == [fresh, busy]
    assert [i.id for i in store.claim_outbox(now, 1, None, 60.0, owner=OWNER)] == [fresh]
    assert [i.id for i in store.claim_outbox(now, 5, None, 60.0, owner=OWNER)] == [busy]
    store.record_outbox([OutboxResult(busy, "done", response="202")])
    assert [i.id for i in store.claim_outbox(now, 5, None, 60.0, owner=OWNER)] == [busy_next]


def test_a_claim_takes_only_what_admit_chooses(store: Store) -> None:
    first, second, third = add(store, "a"), add(store, "b"), add(store, "c")
    seen: list[list[int]] = []

    def admit(items: list[OutboxItem]) -> list[OutboxItem]:
        seen.append([i.id for i in items])
        return [i for i in items if i.id != second]

    now = time.time() + 1
    claimed = store.claim_outbox(now, 10, "pagerduty", 60.0, owner=OWNER, admit=admit)
    assert [i.id for i in claimed] == [first, third] and seen == [[first, second, third]]
    left = store.outbox_item(second)
    assert left is not None and left.lease_owner == ""  # not claimed: due for the next claim
    claimed = store.claim_outbox(now, 1, "pagerduty", 60.0, owner=OWNER, admit=lambda i: i)
    assert [i.id for i in claimed] == [second]


def test_only_an_unclaimed_pending_item_takes_a_coalesced_payload(store: Store) -> None:
    item = add(store, "k", 0, n=1)
    with store.transaction():
        assert store.coalesce_outbox(item, {"n": 2})
    coalesced = store.outbox_item(item)
    assert coalesced is not None and (coalesced.payload, coalesced.priority) == ({"n": 2}, 1)
    store.claim_outbox(time.time() + 1, 1, None, 60.0, owner=OWNER)
    with store.transaction():
        assert not store.coalesce_outbox(item, {"n": 3})  # in flight: what was sent stays
    store.record_outbox([OutboxResult(item, "done", response="202")])
    with store.transaction():
        assert not store.coalesce_outbox(item, {"n": 4})
    assert store.outbox_item(item).payload == {"n": 2}  # type: ignore[union-attr]


def test_key_outbox_lists_one_keys_items_since_newest_first(store: Store) -> None:
    before = time.time()
    first, second = add(store, "k", n=1), add(store, "k", n=2)
    add(store, "other")
    store.record_outbox([OutboxResult(first, "done", response="202")])
    assert [i.id for i in store.key_outbox("k", before)] == [second, first]
    assert store.key_outbox("k", time.time() + 10) == []


def test_absorbed_repeats_are_kept_on_the_incident_until_it_opens_again(store: Store) -> None:
    opened = incident("Printer on fire")
    with store.transaction():
        store.save_incident(opened)
        store.note_coalesced("helpdesk", "Printer on fire", 1001.0, {"summary": "latest"})
        store.note_coalesced("helpdesk", "Printer on fire", 1002.0, {"summary": "newest"})
        store.save_incident(replace(opened, trigger_count=3, last_seen=1002.0))
    seen = store.incident("helpdesk", "Printer on fire")
    assert seen is not None and seen == replace(opened, trigger_count=3, last_seen=1002.0)
    assert (seen.coalesced, seen.coalesced_at) == (2, 1002.0)
    assert seen.latest_details == '{"summary": "newest"}'
    with store.transaction():
        store.save_incident(replace(seen, state="resolved", resolved_at=1003.0))
    assert store.incident("helpdesk", "Printer on fire").coalesced == 2  # type: ignore[union-attr]
    with store.transaction():
        store.save_incident(replace(opened, times_opened=2, opened_at=1004.0))
    again = store.incident("helpdesk", "Printer on fire")
    assert again is not None
    assert (again.coalesced, again.coalesced_at, again.latest_details) == (0, None, "")


def test_save_incidents_writes_a_batch_and_keeps_repeats_counted_at_once(store: Store) -> None:
    """A batch writes its incidents in one call and its repeats as one count per incident;
    an incident opening again in it starts its count afresh, as one by one."""
    printer, disk = incident("Printer on fire"), incident("Disk full")
    with store.transaction():
        store.save_incidents([printer, disk])
        store.note_coalesced("helpdesk", "Printer on fire", 1001.0, {"n": 1})
        store.note_coalesced("helpdesk", "Disk full", 1002.0, {"n": 3}, count=3)
    with store.transaction():
        store.save_incidents(
            [
                replace(printer, trigger_count=2, last_seen=1005.0),  # the same episode
                replace(disk, times_opened=2, opened_at=1006.0),  # opened again
                incident("Fan noise"),
            ]
        )
    seen = {i.incident_key: i for i in store.incidents()}
    assert seen["Printer on fire"] == replace(printer, trigger_count=2, last_seen=1005.0)
    assert (seen["Printer on fire"].coalesced, seen["Printer on fire"].coalesced_at) == (1, 1001.0)
    assert seen["Disk full"].times_opened == 2
    assert (seen["Disk full"].coalesced, seen["Disk full"].latest_details) == (0, "")
    assert seen["Fan noise"] == incident("Fan noise")
    with store.transaction():
        store.note_coalesced("helpdesk", "Printer on fire", 1007.0, {"n": 5}, count=4)
    again = store.incident("helpdesk", "Printer on fire")
    assert again is not None and (again.coalesced, again.coalesced_at) == (5, 1007.0)
    assert again.latest_details == '{"n": 5}'
    with store.transaction():
        store.save_incidents([])


def test_storm_state_per_service(store: Store) -> None:
    created = time.time()
    head = add(store, "a", service="helpdesk")
    add(store, "a", service="helpdesk")  # behind its head: queued, not throttled
    add(store, "b", service="helpdesk")
    claimed = add(store, "c", service="billing")
    store.claim_outbox(time.time() + 1, 10, None, 60.0, owner=OWNER, admit=_only(claimed))
    with store.transaction():
        store.save_incident(incident("x"))
        store.note_coalesced("helpdesk", "x", 1.0, {})
    states = {s.service: s for s in store.storm_state(time.time() + 1)}
    helpdesk, billing = states["helpdesk"], states["billing"]
    assert (helpdesk.queued, helpdesk.throttled, helpdesk.coalesced) == (3, 2, 1)
    assert (billing.queued, billing.throttled, billing.coalesced) == (1, 0, 0)
    assert helpdesk.oldest_pending is not None and helpdesk.oldest_pending >= created
    assert helpdesk.oldest_age(helpdesk.oldest_pending + 5) == 5
    store.record_outbox([OutboxResult(head, "done", response="202")])


def _only(item: int):
    return lambda items: [i for i in items if i.id == item]


def test_a_send_slot_is_taken_once_per_interval_and_per_key(store: Store) -> None:
    with store.transaction():
        assert store.take_send_slot("k1", 0.2)
        assert not store.take_send_slot("k1", 0.2)  # taken until 0.2 s from now
        assert store.take_send_slot("k2", 0.2)  # another key has its own pace
    deadline = time.monotonic() + 10
    while True:  # free again once the interval has passed (on the store's clock)
        with store.transaction():
            if store.take_send_slot("k1", 0.2):
                break
        assert time.monotonic() < deadline


def test_a_rolled_back_claim_gives_its_send_slot_back(store: Store) -> None:
    class Abandoned(Exception):
        pass

    try:
        with store.transaction():
            assert store.take_send_slot("k", 60.0)
            raise Abandoned
    except Abandoned:
        pass
    with store.transaction():
        assert store.take_send_slot("k", 60.0)


def test_two_workers_of_one_store_share_each_keys_pace(backend: Backend) -> None:
    """Two nodes (or `serve` and `outbox flush`): each has its own budget in memory, the slot
    in the store is one; the second worker cannot send in the first one's slot."""
    node_a, node_b = backend.open(), backend.open()
    budget_a = RateBudget(6, lambda _service: "R" * 32)  # one event per 10 s
    budget_b = RateBudget(6, lambda _service: "R" * 32)
    item = OutboxItem(1, "pagerduty", "s", "k", {}, "pending", 0, 0.0, 0.0, "", "")
    with node_a.transaction():
        assert budget_a.admit([item], slots=node_a) == [item]
    with node_b.transaction():
        assert budget_b.admit([item], slots=node_b) == []
    assert budget_b.held_back == 1
