"""One delivery round in one transaction (issue 12, perf3): `record_and_claim_outbox` records
the finished attempts and claims the next due items with the claim's exact rules (per-key order,
leases, priority, a rate limit's choice), and `next_outbox_due` looks at the heads of keys."""

from __future__ import annotations

import time

import pytest

from gateway.store import OutboxItem, OutboxResult, Store

OWNER = "host:1"
LATER = 3600.0


def add(store: Store, key: str, priority: int = 1, kind: str = "pagerduty") -> int:
    with store.transaction():
        return store.add_outbox(kind, "s", key, {"key": key}, None, priority)


def test_a_round_records_a_head_and_claims_its_keys_next_item(store: Store) -> None:
    head, follower = add(store, "k"), add(store, "k")
    now = time.time() + 1
    [claimed] = store.claim_outbox(now, 10, "pagerduty", 60.0, owner=OWNER)
    assert claimed.id == head
    done = [OutboxResult(head, "done", response="202")]
    items = store.record_and_claim_outbox(done, now, 10, "pagerduty", 60.0, (), OWNER)
    assert [i.id for i in items] == [follower]
    recorded = store.outbox_item(head)
    assert recorded is not None
    assert (recorded.state, recorded.attempts, recorded.response) == ("done", 1, "202")
    assert [(a.item, a.state) for a in store.outbox_attempts([head])] == [(head, "done")]
    assert store.outbox_lease_owners("pagerduty") == [OWNER]  # the follower is leased
    assert store.claim_outbox(now + 59, 10, None, 60.0, owner="host:2") == []
    assert [i.id for i in store.claim_outbox(now + 61, 10, None, 60.0, owner="host:2")] == [
        follower
    ]


def test_a_round_keeps_in_flight_keys_back_and_claims_by_priority(store: Store) -> None:
    busy = add(store, "busy")
    add(store, "busy", 0)  # behind its key's head, which stays in flight
    retried, fresh, other = add(store, "r"), add(store, "fresh", 0), add(store, "o")
    now = time.time() + 1
    assert [i.id for i in store.claim_outbox(now, 2, None, 60.0, owner=OWNER)] == [fresh, busy]
    retry = [OutboxResult(retried, "pending", error="HTTP 503", next_attempt_at=now + LATER)]
    retry += [OutboxResult(fresh, "done", response="202")]
    store.claim_outbox(now, 1, None, 60.0, exclude=[fresh, busy], owner=OWNER)  # takes r
    items = store.record_and_claim_outbox(retry, now, 10, None, 60.0, [busy], OWNER)
    assert [i.id for i in items] == [other]  # not busy's next (in flight), not the retry
    assert store.outbox_item(retried).attempts == 1  # type: ignore[union-attr]


def test_a_round_claims_what_admit_chooses_up_to_the_limit(store: Store) -> None:
    first, second, third = add(store, "a"), add(store, "b"), add(store, "c")
    seen: list[list[int]] = []

    def admit(items: list[OutboxItem]) -> list[OutboxItem]:
        seen.append([i.id for i in items])
        return [i for i in items if i.id != first]

    now = time.time() + 1
    items = store.record_and_claim_outbox([], now, 1, None, 60.0, (), OWNER, admit)
    assert seen == [[first, second, third]]  # admit sees the due heads, in claim order
    assert [i.id for i in items] == [second]  # and the claim takes at most `limit`
    assert store.record_and_claim_outbox([], now, 0, None, 60.0, (second,), OWNER, admit) == []
    assert len(seen) == 1  # no room: nothing asked, nothing claimed


def test_a_round_that_fails_records_nothing_and_claims_nothing(store: Store) -> None:
    head, other = add(store, "k"), add(store, "j")
    now = time.time() + 1
    store.claim_outbox(now, 1, None, 60.0, owner=OWNER)

    def admit(items: list[OutboxItem]) -> list[OutboxItem]:
        raise RuntimeError("the rate limit broke")

    done = [OutboxResult(head, "done", response="202")]
    with pytest.raises(RuntimeError):
        store.record_and_claim_outbox(done, now, 10, None, 60.0, (), OWNER, admit)
    assert [i.id for i in store.outbox(("pending",))] == [head, other]  # head not recorded
    assert store.outbox_attempts([head]) == []
    assert [i.id for i in store.due_outbox(now, exclude=[head])] == [other]  # other unclaimed


def test_next_outbox_due_is_the_earliest_head_not_an_item_behind_one(store: Store) -> None:
    """An item waiting behind its key's head (retrying or in flight) is not due before the
    head is recorded; its own time only woke the worker again and again."""
    head = add(store, "k")
    add(store, "k")  # due now, but behind the head
    later = time.time() + LATER
    store.record_outbox([OutboxResult(head, "pending", error="HTTP 503", next_attempt_at=later)])
    assert store.next_outbox_due("pagerduty") == later
    mail = add(store, "m", kind="mail")
    mail_due = store.outbox_item(mail).next_attempt_at  # type: ignore[union-attr]
    assert store.next_outbox_due() == mail_due
    assert store.next_outbox_due("pagerduty") == later
