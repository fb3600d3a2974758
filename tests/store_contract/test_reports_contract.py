"""What operators read: listings, health, metrics and replay."""

from __future__ import annotations

import time

from gateway.config import WebSettings
from gateway.store import JobDecision, OutboxResult, Store
from gateway.web import pages
from gateway.web.metrics import GatewayMetrics
from tests.store_support import Backend, incident, mail


def decide(store: Store, outcome: str, rule: str | None = None, service: str = "helpdesk") -> int:
    """Decide the oldest pending job of `service`; returns its id."""
    job = next(j for j in store.pending_jobs() if j.service == service)
    with store.transaction():
        store.finish_job(
            JobDecision(job.id, outcome=outcome, reason="test", rule=rule, incident_key="k")
        )
    return job.id


def test_heartbeat_commits_and_returns_its_time(store: Store) -> None:
    before = time.time()
    first = store.heartbeat()
    assert before <= first <= store.heartbeat() <= time.time()


def test_outbox_stats(store: Store) -> None:
    assert store.outbox_stats() == (0, None)
    with store.transaction():
        first = store.add_outbox("pagerduty", "s", "a", {}, None)
        store.add_outbox("mail", "s", "b", {}, None)
    [item] = [i for i in store.outbox() if i.id == first]
    assert store.outbox_stats() == (2, item.created_at)
    store.record_outbox([OutboxResult(first, "dead", response="400")])
    assert store.outbox_stats()[0] == 1


def test_jobs_listing_newest_first_and_by_outcome(store: Store) -> None:
    accepted = store.accept([mail("a"), mail("b"), mail("c")])
    decide(store, "triggered", "new case")
    decide(store, "unmatched")
    jobs = store.jobs()
    assert [j.message for j in jobs] == [a.id for a in reversed(accepted)]
    assert [j.outcome for j in jobs] == [None, "unmatched", "triggered"]
    assert [j.state for j in jobs] == ["pending", "done", "done"]
    assert (jobs[2].rule, jobs[2].incident_key, jobs[2].source) == ("new case", "k", "test")
    assert [j.outcome for j in store.jobs(outcomes=["unmatched", "quarantined"])] == ["unmatched"]
    assert len(store.jobs(limit=1)) == 1


def test_recent_jobs_carry_the_head_of_their_mail(store: Store) -> None:
    store.accept([mail("a", raw=b"Subject: first\r\n\r\n" + b"x" * 100), mail("b", raw=b"S")])
    (newest, head), (oldest, old_head) = store.recent_jobs(10, head_bytes=16)
    assert (head, old_head) == (b"S", b"Subject: first\r\n")
    assert newest.id > oldest.id
    assert len(store.recent_jobs(1)) == 1


def test_raw_message(store: Store) -> None:
    [accepted] = store.accept([mail("a", raw=b"the bytes")])
    assert store.raw_message(accepted.id) == b"the bytes"
    assert store.raw_message(accepted.id + 1000) is None


def test_metric_totals_count_acceptance_decisions_and_deliveries(store: Store) -> None:
    store.accept([mail("a"), mail("a"), mail("b"), mail("c"), mail("d", ("other",))])
    first = decide(store, "triggered", "new case")
    decide(store, "triggered", "new case")
    decide(store, "quarantined", "broken")
    with store.transaction():
        done = store.add_outbox("pagerduty", "helpdesk", "k", {}, first)
        retried = store.add_outbox("pagerduty", "helpdesk", "j", {}, first)
        mail_item = store.add_outbox("mail", "helpdesk", "m", {}, first)
    store.record_outbox([OutboxResult(retried, "pending", error="503", next_attempt_at=0.0)])
    store.record_outbox([OutboxResult(retried, "pending", error="503", next_attempt_at=0.0)])
    store.record_outbox([OutboxResult(done, "pending", error="503", next_attempt_at=0.0)])
    store.record_outbox([OutboxResult(done, "done", response="202")])
    store.record_outbox([OutboxResult(mail_item, "dead", response="550")])
    totals = {(metric, labels): value for metric, labels, value in store.metric_totals()}
    assert totals[("accepted", ())] == 5
    assert totals[("duplicates", ())] == 1
    assert totals[("decisions", ("helpdesk", "triggered"))] == 2
    assert totals[("decisions", ("helpdesk", "quarantined"))] == 1
    assert ("decisions", ("other", "pending")) not in totals  # undecided jobs are not decisions
    assert totals[("rule_matches", ("helpdesk", "new case"))] == 2
    assert ("rule_matches", ("helpdesk", "broken")) not in totals  # quarantined: no match
    assert totals[("outbox_done", ("pagerduty",))] == 1
    assert totals[("outbox_retries", ("pagerduty",))] == 3  # 2 of the pending one, 1 of `done`
    assert totals[("outbox_retries", ("mail",))] == 0


def test_metric_gauges(store: Store) -> None:
    store.accept([mail("a"), mail("b")])
    with store.transaction():
        pending = store.add_outbox("pagerduty", "helpdesk", "k", {}, None)
        dead = store.add_outbox("pagerduty", "helpdesk", "j", {}, None)
    store.record_outbox([OutboxResult(dead, "dead", response="400")])
    store.save_incident(incident("open"))
    store.save_incident(incident("acked", "acknowledged"))
    store.save_incident(incident("closed", "resolved"))
    store.save_incident(incident("elsewhere", service="other"))
    gauges = {(metric, labels): value for metric, labels, value in store.metric_gauges()}
    [item] = [i for i in store.outbox() if i.id == pending]
    assert gauges[("outbox_depth", ("pagerduty",))] == 1
    assert gauges[("outbox_dead", ("pagerduty",))] == 1
    assert gauges[("outbox_oldest_created", ("pagerduty",))] == item.created_at
    assert gauges[("jobs_pending", ())] == 2
    assert gauges[("incidents_open", ("helpdesk",))] == 2
    assert gauges[("incidents_open", ("other",))] == 1


def test_decided_latencies_after_a_job(store: Store) -> None:
    assert store.last_decided_job() == 0
    store.accept([mail("a"), mail("b"), mail("c")])
    first = decide(store, "triggered")
    second = decide(store, "unmatched")
    assert store.last_decided_job() == second
    latencies = store.decided_latencies(0)
    assert [job for job, _ in latencies] == [first, second]
    assert all(0 <= seconds < 60 for _, seconds in latencies)
    assert [job for job, _ in store.decided_latencies(first)] == [second]
    assert [job for job, _ in store.decided_latencies(0, limit=1)] == [first]


def test_replay_candidates_are_decided_jobs_with_their_mail(store: Store) -> None:
    since = time.time() - 1
    store.accept([mail("a", raw=b"first", mail_from="s@x"), mail("b"), mail("a")])
    job = decide(store, "triggered", "new case")
    [row] = store.replay_candidates(since)  # the pending job and the duplicate are not
    assert (row["job"], row["outcome"], row["rule"], row["incident_key"]) == (
        job, "triggered", "new case", "k",
    )  # fmt: skip
    assert (row["raw"], row["mail_from"], row["service"]) == (b"first", "s@x", "helpdesk")
    assert row["message"] and row["received_at"] >= since
    assert store.replay_candidates(time.time() + 10) == []


def test_a_read_snapshot_sees_one_state_while_another_connection_delivers(
    backend: Backend,
) -> None:
    """/metrics read an item as still pending and then as delivered in one scrape (depth 1,
    sent 3 of 3): its reads now share one snapshot, and see the change after it."""
    reader, worker = backend.open(), backend.open()
    with worker.transaction():
        item = worker.add_outbox("pagerduty", "helpdesk", "k", {}, None)
    with reader.read_snapshot():
        depth = _depth(reader)
        worker.record_outbox([OutboxResult(item, "done", response="202")])
        sent = _sent(reader)
    assert (depth, sent) == (1, 0)  # one state: pending, not yet delivered
    assert (_depth(reader), _sent(reader)) == (0, 1)  # and the next snapshot sees it delivered


def _depth(store: Store) -> float:
    gauges = store.metric_gauges()
    return next(
        (v for m, labels, v in gauges if m == "outbox_depth" and labels == ("pagerduty",)), 0
    )


def _sent(store: Store) -> float:
    totals = store.metric_totals()
    return next(
        (v for m, labels, v in totals if m == "outbox_done" and labels == ("pagerduty",)), 0
    )


def test_metrics_and_the_status_page_read_inside_one_snapshot(store: Store) -> None:
    """Every read /metrics and the status page make is allowed in the snapshot (PostgreSQL's
    is read only: a write among them would be refused) and sees the queued item."""
    store.accept([mail("a")])
    with store.transaction():
        store.add_outbox("pagerduty", "helpdesk", "k", {}, None)
    snapshot = GatewayMetrics().read(store)
    assert ("outbox_depth", ("pagerduty",), 1) in snapshot.gauges
    page = pages.index_data(store, pages.IndexQuery(), pages.PageContext(WebSettings()))
    assert [item.order_key for item in page["pending"]] == ["k"]
    assert len(page["jobs"]) == 1
