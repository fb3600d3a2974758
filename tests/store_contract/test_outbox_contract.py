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


# -- re-queue rule, claims and their owners (issue 11 items 4, 6 and 22) ---------------------


def settle(store: Store, item: int, state: str) -> None:
    store.record_outbox([OutboxResult(item, state, response="202" if state == "done" else "400")])


def test_a_dead_trigger_is_not_requeued_after_its_resolve_was_delivered(store: Store) -> None:
    trigger, resolve = add(store, "k", 1), add(store, "k", 2)
    settle(store, trigger, "dead")
    settle(store, resolve, "done")
    outcome = store.retry_outbox(trigger)
    assert outcome.requeued == () and outcome.forced == ()
    [refusal] = outcome.refused
    assert (refusal.item, refusal.overridable) == (trigger, True)
    assert f"after #{resolve}" in refusal.reason and "already delivered" in refusal.reason
    assert "--force" in refusal.reason
    assert [o.state for o in store.outbox(("dead",))] == ["dead"]
    assert store.requeue_outbox(trigger) == 0  # the status page's path follows the same rule


def test_force_requeues_it_anyway_and_says_what_it_overrode(store: Store) -> None:
    trigger, resolve = add(store, "k", 1), add(store, "k", 2)
    settle(store, trigger, "dead")
    settle(store, resolve, "done")
    outcome = store.retry_outbox(trigger, force=True)
    assert outcome.requeued == (trigger,) and outcome.refused == ()
    assert [f.item for f in outcome.forced] == [trigger]
    assert [i.id for i in store.due_outbox(time.time() + 1)] == [trigger]


def test_a_dead_letter_goes_ahead_of_its_keys_waiting_items(store: Store) -> None:
    first, second = add(store, "k", 1), add(store, "k", 2)
    settle(store, first, "dead")
    store.record_outbox(
        [OutboxResult(second, "pending", error="HTTP 503", next_attempt_at=time.time() + LATER)]
    )
    assert store.retry_outbox(first).requeued == (first,)
    assert [i.id for i in store.due_outbox(time.time() + 1)] == [first]  # before `second`


def test_a_dead_letter_waits_while_a_later_item_of_its_key_is_in_flight(store: Store) -> None:
    first, second = add(store, "k", 1), add(store, "k", 2)
    settle(store, first, "dead")
    assert [i.id for i in store.claim_outbox(time.time(), 10, None, 60.0, owner="w:1")] == [second]
    [refusal] = store.retry_outbox(first).refused
    assert "being delivered right now" in refusal.reason


def test_retry_says_why_it_does_nothing(store: Store) -> None:
    waiting, delivered = add(store, "a"), add(store, "b")
    settle(store, delivered, "done")
    reasons = {
        item: store.retry_outbox(item).refused[0] for item in (waiting, delivered, delivered + 100)
    }
    assert "still pending (not dead)" in reasons[waiting].reason
    assert "was delivered" in reasons[delivered].reason
    assert reasons[delivered + 100].reason == f"no outbox item #{delivered + 100}"
    assert not any(r.overridable for r in reasons.values())
    assert store.retry_outbox(delivered, force=True).requeued == ()  # force is only for order


def test_retry_keeps_the_created_time(store: Store) -> None:
    item = add(store, "k")
    [before] = store.outbox()
    settle(store, item, "dead")
    store.retry_outbox(item)
    [after] = store.outbox()
    assert after.created_at == before.created_at and after.state == "pending"
    assert after.requeued_at is not None and after.requeued_at >= before.created_at


def test_retry_all_requeues_what_the_rule_allows_and_lists_the_rest(store: Store) -> None:
    blocked, its_resolve = add(store, "k", 1), add(store, "k", 2)
    free = add(store, "j", 3)
    settle(store, blocked, "dead")
    settle(store, its_resolve, "done")
    settle(store, free, "dead")
    outcome = store.retry_outbox()
    assert outcome.requeued == (free,)
    assert [r.item for r in outcome.refused] == [blocked]


def test_a_claim_names_its_worker_and_a_result_clears_it(store: Store) -> None:
    item = add(store, "k")
    now = time.time()
    [claimed] = store.claim_outbox(now, 1, None, 60.0, owner="host:7")
    [seen] = store.outbox()
    assert seen.lease_owner == "host:7" and seen.in_flight(now)
    assert store.outbox_lease_owners() == ["host:7"] and store.outbox_lease_owners("mail") == []
    store.record_outbox([OutboxResult(claimed.id, "pending", error="503", next_attempt_at=now)])
    [seen] = store.outbox()
    assert seen.lease_owner == "" and not seen.in_flight(now) and seen.id == item


def test_only_the_owner_renews_a_lease(store: Store) -> None:
    item = add(store, "k")
    now = time.time()
    store.claim_outbox(now, 1, None, 1.0, owner="host:7")
    assert store.renew_outbox_leases([item], "host:8", now + LATER) == 0
    assert store.claim_outbox(now + 2, 1, None, 1.0, owner="host:8") != []  # ran out
    assert store.renew_outbox_leases([item], "host:7", now + LATER) == 0  # no longer its own
    assert store.renew_outbox_leases([item], "host:8", now + LATER) == 1
    assert store.claim_outbox(now + 100, 1, None, 1.0, owner="host:9") == []


def test_releasing_a_dead_workers_claims_makes_them_due(store: Store) -> None:
    mine, theirs = add(store, "a"), add(store, "b")
    now = time.time()
    store.claim_outbox(now, 1, None, LATER, owner="host:1")
    store.claim_outbox(now, 1, None, LATER, owner="host:2")
    assert store.release_outbox_leases("host:2", now) == 1
    assert [i.id for i in store.due_outbox(now)] == [theirs]
    assert {o.id: o.lease_owner for o in store.outbox()} == {mine: "host:1", theirs: ""}


def test_expedite_makes_waiting_retries_due_but_keeps_claims(store: Store) -> None:
    waiting, claimed, mail = add(store, "a"), add(store, "b"), add(store, "m", kind="mail")
    now = time.time()
    store.record_outbox(
        [
            OutboxResult(waiting, "pending", error="503", next_attempt_at=now + LATER),
            OutboxResult(mail, "pending", error="451", next_attempt_at=now + LATER),
        ]
    )
    store.claim_outbox(now, 1, None, LATER, owner="host:1")
    assert store.expedite_outbox(now, "pagerduty") == 1
    assert [i.id for i in store.due_outbox(now)] == [waiting]
    assert claimed not in [i.id for i in store.due_outbox(now + 1)]
    assert store.expedite_outbox(now) == 1  # the mail too


def test_a_late_result_is_not_applied_once_another_worker_took_the_item_over(
    store: Store,
) -> None:
    """Worker 7's lease ran out while its attempt hung and worker 8 claimed the item: 7's
    result (here a 400) arriving late must not end the item that 8 is delivering."""
    item = add(store, "k")
    now = time.time()
    store.claim_outbox(now, 1, None, 1.0, owner="host:7")
    assert store.claim_outbox(now + 2, 1, None, 60.0, owner="host:8") != []
    store.record_outbox([OutboxResult(item, "dead", error="HTTP 400")], owner="host:7")
    [seen] = store.outbox()
    assert (seen.state, seen.lease_owner, seen.attempts) == ("pending", "host:8", 0)
    claimed = store.record_and_claim_outbox(
        [OutboxResult(item, "done", response="202")], now + 3, 1, None, 60.0, owner="host:8"
    )
    assert claimed == [] and [i.id for i in store.outbox(("done",))] == [item]
    store.record_outbox([OutboxResult(item, "dead", error="HTTP 400")])  # no owner: as before
    assert [i.id for i in store.outbox(("done",))] == [item]  # ended items stay ended
