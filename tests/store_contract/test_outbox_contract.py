"""The outbox: per-key order, leases, results, dead letters and their requeue."""

from __future__ import annotations

import time

from gateway.store import OutboxResult, Store

LATER = 3600.0


def add(store: Store, key: str, n: int = 0, kind: str = "pagerduty") -> int:
    with store.transaction():
        return store.add_outbox(kind, "s", key, {"n": n}, None)


def test_outbox_keeps_per_key_order(store: Store) -> None:
    with store.transaction():
        a1 = store.add_outbox("pagerduty", "s", "k1", {"n": 1}, None)
        store.add_outbox("pagerduty", "s", "k1", {"n": 2}, None)
        b1 = store.add_outbox("pagerduty", "s", "k2", {"n": 3}, None)
    due = store.due_outbox(time.time() + 1)
    assert sorted(i.id for i in due) == [a1, b1]  # only the head of each key
    store.record_outbox(
        [OutboxResult(a1, "pending", error="HTTP 500", next_attempt_at=time.time() + 3600)]
    )
    due = store.due_outbox(time.time() + 1)
    assert [i.id for i in due] == [b1]  # k1's second item waits behind its retrying head
    store.record_outbox([OutboxResult(b1, "done", response="202")])
    store.record_outbox([OutboxResult(a1, "dead", response="bad", error="HTTP 400")])
    assert [i.payload["n"] for i in store.due_outbox(time.time() + 1)] == [2]


def test_an_added_item_is_due_at_once_with_its_payload(store: Store) -> None:
    before = time.time()
    with store.transaction():
        item = store.add_outbox("mail", "helpdesk", "mail:k", {"to": ["a@x"], "n": 1}, None)
    [due] = store.due_outbox(time.time() + 1)
    assert (due.id, due.kind, due.service, due.order_key) == (item, "mail", "helpdesk", "mail:k")
    assert (due.payload, due.state, due.attempts) == ({"to": ["a@x"], "n": 1}, "pending", 0)
    assert before <= due.created_at <= due.next_attempt_at <= time.time()
    assert store.due_outbox(before - 1) == []  # not due before it was added


def test_only_the_head_of_a_key_is_claimable(store: Store) -> None:
    first, second = add(store, "k", 1), add(store, "k", 2)
    now = time.time() + 1
    assert [i.id for i in store.claim_outbox(now, 10, None, 0.0)] == [first]
    store.record_outbox([OutboxResult(first, "done", response="202")])
    assert [i.id for i in store.claim_outbox(now, 10, None, 60.0)] == [second]


def test_a_claimed_item_is_not_claimable_until_its_lease_expires(store: Store) -> None:
    item = add(store, "k")
    now = time.time() + 1
    assert [i.id for i in store.claim_outbox(now, 10, None, 60.0)] == [item]
    assert store.claim_outbox(now, 10, None, 60.0) == []
    assert store.claim_outbox(now + 59, 10, None, 60.0) == []
    assert [i.id for i in store.claim_outbox(now + 61, 10, None, 60.0)] == [item]  # worker died


def test_claim_by_kind_up_to_a_limit(store: Store) -> None:
    pd = [add(store, f"k{i}") for i in range(3)]
    mail = add(store, "m", kind="mail")
    now = time.time() + 1
    assert [i.id for i in store.claim_outbox(now, 2, "pagerduty", 60.0)] == pd[:2]
    assert [i.id for i in store.claim_outbox(now, 10, "mail", 60.0)] == [mail]
    assert [i.id for i in store.claim_outbox(now, 10, None, 60.0)] == pd[2:]


def test_excluded_items_hold_back_their_key(store: Store) -> None:
    first, _second = add(store, "k", 1), add(store, "k", 2)
    other = add(store, "j")
    now = time.time() + 1
    assert [i.id for i in store.claim_outbox(now, 10, None, 0.0, exclude=[first])] == [other]
    assert [i.id for i in store.due_outbox(now, exclude=[first, other])] == []


def test_results_done_retry_and_dead(store: Store) -> None:
    done, retry, dead = add(store, "a"), add(store, "b"), add(store, "c")
    retry_at = time.time() + LATER
    store.record_outbox(
        [
            OutboxResult(done, "done", response="202 Accepted"),
            OutboxResult(retry, "pending", error="HTTP 503", next_attempt_at=retry_at),
            OutboxResult(dead, "dead", response='{"status":"invalid event"}', error="HTTP 400"),
        ]
    )
    [delivered] = store.outbox(("done",))
    assert (delivered.id, delivered.attempts, delivered.response) == (done, 1, "202 Accepted")
    pending, failed = store.outbox()
    assert (pending.id, pending.state, pending.attempts) == (retry, "pending", 1)
    assert (pending.last_error, pending.next_attempt_at) == ("HTTP 503", retry_at)
    assert (failed.id, failed.state, failed.attempts) == (dead, "dead", 1)
    assert (failed.response, failed.last_error) == ('{"status":"invalid event"}', "HTTP 400")
    assert store.due_outbox(time.time() + 1) == []  # the retry waits for its time
    assert [i.id for i in store.due_outbox(retry_at)] == [retry]


def test_a_result_for_a_finished_item_changes_nothing(store: Store) -> None:
    item = add(store, "k")
    store.record_outbox([OutboxResult(item, "done", response="202")])
    store.record_outbox([OutboxResult(item, "dead", response="late", error="HTTP 400")])
    [done] = store.outbox(("done", "dead"))
    assert (done.state, done.attempts, done.response) == ("done", 1, "202")


def test_next_outbox_due(store: Store) -> None:
    assert store.next_outbox_due() is None
    first = add(store, "a")
    add(store, "m", kind="mail")
    later = time.time() + LATER
    store.record_outbox([OutboxResult(first, "pending", error="503", next_attempt_at=later)])
    mail_due = store.next_outbox_due("mail")
    assert mail_due is not None and mail_due < later
    assert store.next_outbox_due("pagerduty") == later
    assert store.next_outbox_due() == mail_due


def test_dead_letters_can_be_requeued(store: Store) -> None:
    with store.transaction():
        item = store.add_outbox("pagerduty", "s", "k", {}, None)
    store.record_outbox(
        [OutboxResult(item, "dead", response='{"status":"invalid event"}', error="HTTP 400")]
    )
    assert [o.state for o in store.outbox()] == ["dead"]
    assert store.requeue_outbox(item) == 1
    assert [(o.state, o.attempts) for o in store.outbox()] == [("pending", 1)]


def test_requeue_all_touches_only_dead_letters(store: Store) -> None:
    dead = [add(store, "a"), add(store, "b")]
    waiting, delivered = add(store, "c"), add(store, "d")
    store.record_outbox([OutboxResult(i, "dead", response="400") for i in dead])
    store.record_outbox([OutboxResult(delivered, "done", response="202")])
    assert store.requeue_outbox(waiting) == 0  # not a dead letter
    assert store.requeue_outbox(delivered) == 0
    assert store.requeue_outbox() == 2
    assert sorted(i.id for i in store.due_outbox(time.time() + 1)) == [*dead, waiting]
    assert store.requeue_outbox() == 0
