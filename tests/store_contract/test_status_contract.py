"""What the status page and /healthz read: per-minute counts and latencies, a message with its
jobs, an incident's jobs and outbox items, and every delivery attempt with its answer."""

from __future__ import annotations

import time

import pytest

from gateway.store import REDELIVERED, JobDecision, OutboxResult, Store
from tests.store_support import mail


def decide(store: Store, job: int, outcome: str, key: str = "k", service: str = "helpdesk") -> None:
    with store.transaction():
        store.finish_job(JobDecision(job, outcome=outcome, reason="test", incident_key=key))


def pending_ids(store: Store) -> list[int]:
    return [j.id for j in store.pending_jobs()]


def test_oldest_pending_job_is_the_acceptance_time_of_the_oldest_undecided_job(
    store: Store,
) -> None:
    assert store.oldest_pending_job() is None
    before = time.time()
    store.accept([mail("a")])
    store.accept([mail("b")])
    first, _second = pending_ids(store)
    oldest = store.oldest_pending_job()
    assert oldest is not None and before <= oldest <= time.time()
    decide(store, first, "triggered")
    assert store.oldest_pending_job() >= oldest  # type: ignore[operator]
    decide(store, _second, "unmatched")
    assert store.oldest_pending_job() is None


def test_dead_letter_stats_count_dead_items_and_the_newest_death(store: Store) -> None:
    assert store.dead_letter_stats() == (0, None)
    with store.transaction():
        first = store.add_outbox("pagerduty", "helpdesk", "a", {}, None)
        second = store.add_outbox("pagerduty", "helpdesk", "b", {}, None)
        store.add_outbox("pagerduty", "helpdesk", "c", {}, None)
    before = time.time()
    store.record_outbox([OutboxResult(first, "dead", error="HTTP 400")])
    store.record_outbox([OutboxResult(second, "dead", error="HTTP 400")])
    count, newest = store.dead_letter_stats()
    assert count == 2 and newest is not None and before <= newest <= time.time()
    store.requeue_outbox(first)
    assert store.dead_letter_stats()[0] == 1


def test_mail_minutes_count_each_job_by_outcome_and_each_redelivery(store: Store) -> None:
    since = time.time() - 1
    store.accept([mail("a"), mail("b"), mail("c"), mail("d", ("helpdesk", "other"))])
    store.accept([mail("a")])  # a redelivered copy: no job
    jobs = pending_ids(store)
    decide(store, jobs[0], "triggered")
    decide(store, jobs[1], "triggered")
    decide(store, jobs[2], "unmatched")
    counts: dict[str, int] = {}
    for row in store.mail_minutes(since):
        assert row.minute % 60 == 0 and since - 60 < row.minute <= time.time()
        counts[row.outcome] = counts.get(row.outcome, 0) + row.count
    assert counts == {"triggered": 2, "unmatched": 1, "pending": 2, REDELIVERED: 1}
    assert store.mail_minutes(time.time() + 60) == []


def test_delivery_minutes_give_count_and_nearest_rank_percentiles(store: Store) -> None:
    since = time.time() - 1
    store.accept([mail(str(n)) for n in range(4)])
    jobs = pending_ids(store)
    items = []
    with store.transaction():
        for job in jobs:
            store.finish_job(
                JobDecision(job, outcome="triggered", reason="test", incident_key=str(job))
            )
            items.append(store.add_outbox("pagerduty", "helpdesk", str(job), {}, job))
        mail_item = store.add_outbox("mail", "helpdesk", "m", {}, jobs[0])
    store.record_outbox([OutboxResult(i, "done", response="202") for i in items[:3]])
    store.record_outbox([OutboxResult(items[3], "dead", error="HTTP 400")])  # not delivered
    store.record_outbox([OutboxResult(mail_item, "done")])  # not PagerDuty
    rows = store.delivery_minutes(since)
    assert sum(r.deliveries for r in rows) == 3
    for row in rows:
        assert 0 <= row.p50 <= row.p99 < 60
    assert store.delivery_minutes(time.time() + 60) == []


def test_message_names_its_envelope_and_jobs(store: Store) -> None:
    [first] = store.accept(
        [mail("a", ("helpdesk", "other"), mail_from="s@x", rcpt_tos=("desk@gw",), peer="1.2.3.4")]
    )
    [copy] = store.accept([mail("a", ("helpdesk", "other"))])
    record = store.message(first.id)
    assert record is not None
    assert (record.id, record.mail_from, record.rcpt_tos, record.peer) == (
        first.id, "s@x", ("desk@gw",), "1.2.3.4",
    )  # fmt: skip
    assert len(record.jobs) == 2 and record.duplicate_of is None
    duplicate = store.message(copy.id)
    assert duplicate is not None and duplicate.jobs == () and duplicate.duplicate_of == first.id
    assert store.message(copy.id + 100) is None


def test_incident_jobs_are_the_newest_with_that_key(store: Store) -> None:
    store.accept([mail("a", raw=b"Subject: one\r\n\r\n"), mail("b"), mail("c")])
    jobs = pending_ids(store)
    decide(store, jobs[0], "triggered", key="printer")
    decide(store, jobs[1], "triggered", key="disk")
    decide(store, jobs[2], "resolved", key="printer")
    history = store.incident_jobs("helpdesk", "printer")
    assert [h.job.id for h in history] == [jobs[2], jobs[0]]
    assert history[1].head.startswith(b"Subject: one")
    assert all(h.decided_at is not None for h in history)
    assert [h.job.id for h in store.incident_jobs("helpdesk", "printer", limit=1)] == [jobs[2]]
    assert store.incident_jobs("other", "printer") == []


def test_outbox_of_keys_of_job_and_by_id(store: Store) -> None:
    store.accept([mail("a")])
    [job] = pending_ids(store)
    with store.transaction():
        old = store.add_outbox("pagerduty", "helpdesk", "pd:k", {"n": 1}, job)
    since = time.time()
    time.sleep(0.01)
    with store.transaction():
        dead = store.add_outbox("pagerduty", "helpdesk", "pd:k", {"n": 2}, job)
        other = store.add_outbox("mail", "helpdesk", "mail:k", {"n": 3}, None)
    store.record_outbox([OutboxResult(old, "done"), OutboxResult(dead, "dead", error="400")])
    assert [i.id for i in store.outbox_of_keys(["pd:k"])] == [dead, old]  # newest first
    assert [i.id for i in store.outbox_of_keys(["pd:k"], since=since)] == [dead]
    assert [i.id for i in store.outbox_of_keys(["pd:k", "mail:k"], limit=2)] == [other, dead]
    assert store.outbox_of_keys([]) == []
    assert [i.id for i in store.outbox_of_job(job)] == [old, dead]
    entry = store.outbox_entry(dead)
    assert entry is not None and (entry.item.state, entry.item.last_error) == ("dead", "400")
    assert (entry.job, entry.message) == (job, store.jobs()[0].message)
    unqueued = store.outbox_entry(other)
    assert unqueued is not None and (unqueued.job, unqueued.message) == (None, None)
    assert store.outbox_entry(other + 100) is None


def test_every_attempt_and_requeue_is_kept_with_its_answer(store: Store) -> None:
    with store.transaction():
        item = store.add_outbox("pagerduty", "helpdesk", "k", {}, None)
        untouched = store.add_outbox("pagerduty", "helpdesk", "j", {}, None)
    store.record_outbox([OutboxResult(item, "pending", error="HTTP 503", next_attempt_at=0.0)])
    store.record_outbox([OutboxResult(item, "dead", error="HTTP 400", response='{"x": 1}')])
    store.requeue_outbox(item)
    store.record_outbox([OutboxResult(item, "done", response='{"status": "success"}')])
    attempts = store.outbox_attempts([item, untouched])
    assert [(a.item, a.attempt, a.state, a.error) for a in attempts] == [
        (item, 1, "pending", "HTTP 503"),
        (item, 2, "dead", "HTTP 400"),
        (item, 2, "requeued", ""),
        (item, 3, "done", ""),
    ]
    assert attempts[1].response == '{"x": 1}' and attempts[3].response == '{"status": "success"}'
    assert [a.at for a in attempts] == sorted(a.at for a in attempts)
    assert store.outbox_attempts([]) == []


@pytest.mark.parametrize(
    ("outcomes", "service", "expected"),
    [
        pytest.param(None, None, ["c", "b", "a"], id="all"),
        pytest.param(["unmatched"], None, ["b"], id="outcome"),
        pytest.param(["pending"], None, ["c"], id="pending"),
        pytest.param(None, "other", ["c"], id="service"),
        pytest.param(["triggered"], "other", [], id="both"),
    ],
)
def test_recent_jobs_filter_by_outcome_and_service(
    store: Store, outcomes: list[str] | None, service: str | None, expected: list[str]
) -> None:
    store.accept([mail("a", raw=b"a"), mail("b", raw=b"b"), mail("c", ("other",), raw=b"c")])
    jobs = pending_ids(store)
    decide(store, jobs[0], "triggered")
    decide(store, jobs[1], "unmatched")
    rows = store.recent_jobs(10, outcomes=outcomes, service=service)
    assert [head.decode() for _, head in rows] == expected


def test_attempts_go_with_their_item_when_retention_deletes_it(store: Store) -> None:
    with store.transaction():
        item = store.add_outbox("pagerduty", "helpdesk", "k", {}, None)
    store.record_outbox([OutboxResult(item, "done", response="202")])
    assert len(store.outbox_attempts([item])) == 1
    while any(store.purge(time.time() + 1).values()):
        pass
    assert store.outbox_entry(item) is None and store.outbox_attempts([item]) == []
