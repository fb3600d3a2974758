"""PostgreSQL only: what main's newer store methods promise when two nodes act at the same time.

Each test holds one node's transaction open at the moment that matters and lets the other node
act meanwhile, so the interleaving is forced, not hoped for: a rate-limited claim skips rows
another node is claiming (never waits on them, never takes them too), a payload is coalesced
only into an item no node has claimed, and a webhook redelivery received by two nodes at once
is stored once (the UNIQUE constraint decides, not a read-then-write).
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from gateway.config import PagerDutySettings, ServiceSettings
from gateway.decide.processor import Processor, load_services
from gateway.intake.spool import incoming
from gateway.outcomes import Outcome
from gateway.store import JobDecision, OutboxItem, Store, open_store
from gateway.store.postgres.connection import close_pool
from tests.conftest import RULES_DIR, desk_mail, wait_until
from tests.store_support import incident, mail, other_node_listening

OWNER_A, OWNER_B = "node-a:1", "node-b:1"


@pytest.fixture
def url(postgres_url: str) -> Iterator[str]:
    yield postgres_url
    close_pool(postgres_url)


@pytest.fixture
def nodes(url: str) -> Iterator[tuple[Store, Store]]:
    a, b = open_store(url), open_store(url)
    yield a, b
    a.close()
    b.close()


def add(store: Store, key: str, priority: int = 1) -> int:
    return store.add_outbox("pagerduty", "helpdesk", key, {"key": key}, None, priority)


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    return thread, result


def waiting_on_a_lock(url: str) -> bool:
    """Some other session of this database waits for a row or advisory lock."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock'"
        ).fetchone()
    return bool(row and row[0])


def test_a_rate_limited_claim_skips_what_another_node_is_claiming(
    nodes: tuple[Store, Store],
) -> None:
    a, b = nodes
    first, second, third = add(a, "k1"), add(a, "k2"), add(a, "k3")
    now = time.time() + 1
    during: list[list[int]] = []

    def admit_first(items: list[OutboxItem]) -> list[OutboxItem]:
        # node A holds its candidates locked right now: node B must neither wait nor take them
        during.append([i.id for i in b.claim_outbox(now, 10, None, 60.0, owner=OWNER_B,
                                                      admit=lambda c: c)])  # fmt: skip
        return [i for i in items if i.id == first]

    claimed = a.claim_outbox(now, 10, None, 60.0, owner=OWNER_A, admit=admit_first)
    assert [i.id for i in claimed] == [first] and during == [[]]
    # what A locked but did not admit is free again once A's claim committed
    again = b.claim_outbox(now, 10, None, 60.0, owner=OWNER_B, admit=lambda c: c)
    assert sorted(i.id for i in again) == [second, third]
    assert a.outbox_item(first).lease_owner == OWNER_A  # type: ignore[union-attr]


def test_a_send_slot_another_node_is_taking_counts_as_taken_without_waiting(
    nodes: tuple[Store, Store],
) -> None:
    """Two claims taking slots of two keys in opposite orders must not deadlock: a claim never
    waits for another's slot, it leaves that key for its next round."""
    a, b = nodes
    with a.transaction():
        assert a.take_send_slot("k1", 0.0)  # A's claim is taking k1's slot (a free one)
        thread, result = in_thread(lambda: b.take_send_slot("k1", 0.0))
        thread.join(10)
        assert result == [False]  # answered at once, while A's transaction is still open
        assert b.take_send_slot("k2", 0.0)  # another key is B's to take meanwhile
    with b.transaction():
        assert b.take_send_slot("k1", 0.0)  # A committed: the next slot is free (interval 0)


def test_a_payload_is_not_coalesced_into_an_item_another_node_is_claiming(
    url: str, nodes: tuple[Store, Store]
) -> None:
    a, b = nodes
    item = add(a, "k", priority=0)
    with a.transaction():
        assert [i.id for i in a.claim_outbox(time.time() + 1, 1, None, 60.0, owner=OWNER_A)] == [
            item
        ]
        thread, result = in_thread(lambda: b.coalesce_outbox(item, {"key": "repeat"}))
        wait_until(lambda: waiting_on_a_lock(url), message="B never waited for A's claim")
    thread.join(10)
    assert result == [False]  # A's claim committed first: what is on the wire stays recorded
    found = a.outbox_item(item)
    assert found is not None and found.payload == {"key": "k"} and found.priority == 0


def test_a_webhook_delivery_received_by_two_nodes_at_once_is_stored_once(
    url: str, nodes: tuple[Store, Store]
) -> None:
    a, b = nodes
    body = '{"event": {"id": "E1"}}'
    with a.transaction():
        stored = a.add_pagerduty_event(body=body, received_at=1.0, event_id="E1")
        thread, result = in_thread(
            lambda: b.add_pagerduty_event(body=body, received_at=1.0, event_id="E1")
        )
        wait_until(lambda: waiting_on_a_lock(url), message="B never waited for A's insert")
    thread.join(10)
    assert stored is not None and result == [None]  # a redelivery, not a failure
    assert a.count_pagerduty_events() == 1


def test_schema_versions_are_numbered_alike_on_both_backends() -> None:
    from gateway.store.postgres.schema import MIGRATIONS as POSTGRES
    from gateway.store.sqlite.schema import MIGRATIONS as SQLITE

    assert len(POSTGRES) == len(SQLITE)


def test_a_webhook_delivery_on_one_node_wakes_every_nodes_decider(
    url: str, nodes: tuple[Store, Store]
) -> None:
    a, _ = nodes
    with other_node_listening(url) as (jobs, _outbox):
        a.add_pagerduty_event(body="{}", received_at=1.0, event_id="E2")
        wait_until(jobs.is_set, message="no wake-up for a webhook delivery")
        assert a.add_pagerduty_event(body="{}", received_at=1.0, event_id="E2") is None


def test_a_job_another_node_is_deciding_is_skipped_not_waited_for(
    nodes: tuple[Store, Store],
) -> None:
    a, b = nodes
    [accepted] = a.accept([mail("decide-once")])
    job = a.pending_jobs()[0].id
    with a.transaction():
        assert a.finish_job(JobDecision(job, outcome="triggered", reason="node a"))
        thread, result = in_thread(
            lambda: b.finish_job(JobDecision(job, outcome="ignored", reason="node b"))
        )
        thread.join(10)  # inside A's open transaction: B must answer without waiting for it
        assert not thread.is_alive() and result == [False]
    assert accepted.duplicate_of is None and b.pending_jobs() == []
    assert not b.finish_job(
        JobDecision(job, outcome="ignored", reason="node b")
    )  # decided: still False
    [record] = a.jobs()
    assert (record.id, record.outcome) == (job, "triggered")


def test_the_incidents_a_batch_locked_are_read_by_another_node_only_after_its_commit(
    url: str, nodes: tuple[Store, Store]
) -> None:
    """A decider's batch locks all its incidents at once: another node's decider reading one
    of them under its lock waits, then sees what the batch wrote, not the state before it."""
    a, b = nodes

    def read_under_lock() -> object:
        with b.transaction():
            return b.incident("helpdesk", "Disk")

    with a.transaction():
        assert a.lock_incidents([("helpdesk", "Printer"), ("helpdesk", "Disk")]) == {}
        thread, result = in_thread(read_under_lock)
        wait_until(lambda: waiting_on_a_lock(url), message="B read without waiting for A")
        a.save_incident(incident("Disk"))
        assert thread.is_alive()
    thread.join(10)
    assert result == [incident("Disk")]


class SharedSpool:
    """A real store whose pending jobs are only some rounds of the spool (round r = jobs
    6r+1 .. 6r+6, one mail per key; r % 3 in `share`)."""

    def __init__(self, store: Store, share: tuple[int, ...]) -> None:
        self.store = store
        self.share = share

    def pending_jobs(self, limit: int = 100, max_bytes: int = 1 << 24) -> list[Any]:
        jobs = self.store.pending_jobs(1000, max_bytes)
        return [job for job in jobs if ((job.id - 1) // 6) % 3 in self.share][:limit]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_two_deciders_at_once_decide_each_job_once_and_each_key_in_one_order(
    url: str, nodes: tuple[Store, Store]
) -> None:
    """Two processors (a node's worker and a `gateway ingest`, say) decide one spool at the
    same time, 120 mails over 6 keys, batches of 7, each a share of the mails that overlaps
    the other's: they decide the same keys in turns, and take some of the same jobs.
    Each job is decided once; neither decider fails nor quarantines a mail (their locks never
    meet in a deadlock: before, the job-by-job redo of a batch took its keys in job order and
    met the other decider, which quarantined a mail every second run or so); and each key's
    history is one order: its outcomes add up to its mails, and its PagerDuty events, in the
    order they were queued, replay its life without a contradiction (two deciders building
    on one incident would queue a second opening trigger, or resolve it twice)."""
    a, b = nodes
    statuses = ["New", "New", "Resolved", "New", "Resolved"]
    mails = [(f"Case {n % 6}", statuses[(n // 6) % 5]) for n in range(120)]
    a.accept(
        [
            incoming(desk_mail(subject, status), source="cli", services=("helpdesk",))
            for subject, status in mails
        ]
    )
    settings = ServiceSettings("helpdesk", ("desk@*",), (RULES_DIR / "helpdesk.toml",), "R" * 32)
    failures: list[BaseException] = []
    decided: list[Any] = []

    def decide(store: Store, share: tuple[int, ...]) -> None:
        mine = SharedSpool(store, share)
        processor = Processor(mine, load_services((settings,)), PagerDutySettings())  # type: ignore[arg-type]
        deadline = time.monotonic() + 60
        try:
            while mine.pending_jobs(1) and time.monotonic() < deadline:
                decided.extend(processor.process_pending(7))
        except BaseException as exc:
            failures.append(exc)

    # A takes rounds 0 and 1 of every three (a round: one mail per key), B rounds 1 and 2
    shares = ((a, (0, 1)), (b, (1, 2)))
    threads = [threading.Thread(target=decide, args=share) for share in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert failures == []
    assert [d.reason for d in decided if d.outcome == Outcome.QUARANTINED] == []
    assert a.pending_jobs() == []
    assert sorted(d.job for d in decided) == sorted(job.id for job in a.jobs(limit=1000))
    outcome_of = {d.job: d.outcome for d in decided}
    with psycopg.connect(url) as conn:  # an item's job is not part of `OutboxItem`
        queued = conn.execute("SELECT order_key, job FROM outbox ORDER BY id").fetchall()
    incidents = {i.incident_key: i for i in a.incidents()}
    for n in range(6):
        key = f"Case {n}"
        outcomes = collections.Counter(d.outcome for d in decided if d.incident_key == key)
        news = sum(1 for subject, status in mails if subject == key and status == "New")
        assert outcomes[Outcome.TRIGGERED] + outcomes[Outcome.DUPLICATE] == news
        assert incidents[key].times_opened == outcomes[Outcome.TRIGGERED]
        # the events in the order they were queued replay the incident's life without a
        # contradiction (a repeat adds nothing to send; a resolve with nothing open is sent)
        is_open = False
        for order_key, job in queued:
            if order_key.endswith(key):
                outcome = outcome_of[job]
                assert (outcome, is_open) in (
                    (Outcome.TRIGGERED, False),
                    (Outcome.RESOLVED, True),
                    (Outcome.RESOLVE_NO_INCIDENT, False),
                ), (key, job, outcome)
                is_open = outcome == Outcome.TRIGGERED or (is_open and outcome != Outcome.RESOLVED)
        assert incidents[key].state == ("triggered" if is_open else "resolved")


def test_an_outbox_insert_after_an_undone_savepoint_still_wakes_the_other_nodes(
    url: str, nodes: tuple[Store, Store]
) -> None:
    """A transaction notifies the outbox channel once; a savepoint that notified and was undone
    took its NOTIFY with it, so the next insert of the transaction notifies again."""
    a, _ = nodes
    with other_node_listening(url) as (_jobs, outbox):
        with a.transaction():
            with contextlib.suppress(LookupError), a.savepoint():
                add(a, "undone")
                raise LookupError("this job's writes are undone")
            add(a, "kept")
        wait_until(outbox.is_set, message="the kept item woke no node")
        assert [item.order_key for item in a.outbox()] == ["kept"]
