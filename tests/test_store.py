"""The SQLite store: durable spool, duplicate detection, one decision per job, outbox order."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from gateway.store import IncomingMail, OutboxResult, Store, open_store
from tests.store_support import counts


def mail(
    fingerprint: str, services: tuple[str, ...] = ("helpdesk",), raw: bytes = b"x"
) -> IncomingMail:
    return IncomingMail(raw=raw, source="test", services=services, fingerprint=fingerprint)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = open_store(tmp_path / "db" / "gateway.sqlite3")
    yield s
    s.close()


def test_schema_is_versioned_and_durable(store: Store) -> None:
    assert store.schema_version >= 1
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_reopening_does_not_migrate_twice(tmp_path: Path) -> None:
    path = tmp_path / "g.sqlite3"
    open_store(path).accept([mail("a")])
    again = open_store(path)
    assert counts(again)["messages"] == 1


def test_group_commit_accepts_a_batch(store: Store) -> None:
    results = store.accept([mail(f"f{i}") for i in range(50)])
    assert [r.duplicate_of for r in results] == [None] * 50
    assert len(store.pending_jobs(1000)) == 50


def test_duplicate_is_recorded_not_queued(store: Store) -> None:
    first, second = store.accept([mail("same", raw=b"body"), mail("same", raw=b"body")])
    assert first.duplicate_of is None
    assert second.duplicate_of == first.id
    assert len(store.pending_jobs()) == 1
    assert store.raw_message(second.id) is None  # the copy's bytes are not kept twice
    assert counts(store)["duplicates"] == 1


def test_same_mail_for_a_new_service_is_not_a_duplicate(store: Store) -> None:
    store.accept([mail("fp", ("a",))])
    result = store.accept([mail("fp", ("a", "b"))])[0]
    assert result.duplicate_of is None
    assert sorted(j.service for j in store.pending_jobs()) == ["a", "b"]


def test_a_job_is_decided_once(store: Store) -> None:
    store.accept([mail("one")])
    job = store.pending_jobs()[0]
    with store.transaction():
        assert store.finish_job(job.id, outcome="unmatched", reason="no rule matched")
    with store.transaction():
        assert not store.finish_job(job.id, outcome="triggered", reason="again")
    assert store.jobs()[0].outcome == "unmatched"


def test_failed_transaction_leaves_nothing(store: Store) -> None:
    with pytest.raises(RuntimeError), store.transaction():
        store.accept([mail("x")])
        raise RuntimeError("crash before commit")
    assert counts(store)["messages"] == 0


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


def test_dead_letters_can_be_requeued(store: Store) -> None:
    with store.transaction():
        item = store.add_outbox("pagerduty", "s", "k", {}, None)
    store.record_outbox(
        [OutboxResult(item, "dead", response='{"status":"invalid event"}', error="HTTP 400")]
    )
    assert [o.state for o in store.outbox()] == ["dead"]
    assert store.requeue_outbox(item) == 1
    assert [(o.state, o.attempts) for o in store.outbox()] == [("pending", 1)]


def test_store_errors_are_transient(tmp_path: Path) -> None:
    path = tmp_path / "g.sqlite3"
    store = open_store(path, timeout=0.1)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    from gateway.errors import StoreError

    with pytest.raises(StoreError):
        store.accept([mail("x")])
    blocker.execute("ROLLBACK")
    assert store.accept([mail("x")])[0].duplicate_of is None


def test_spool_writer_survives_a_caller_that_gave_up(tmp_path: Path) -> None:
    """An SMTP client that disconnects mid-commit must not kill the writer thread."""
    import asyncio

    from gateway.intake.spool import SpoolWriter

    writer = SpoolWriter(tmp_path / "g.sqlite3")
    writer.start()

    async def scenario() -> int:
        doomed = [asyncio.ensure_future(writer.accept(mail(f"c{i}"))) for i in range(20)]
        await asyncio.sleep(0)
        for task in doomed:
            task.cancel()
        later = await asyncio.wait_for(writer.accept(mail("after")), timeout=10)
        return later.id

    try:
        assert asyncio.run(scenario()) >= 1
    finally:
        writer.stop()
    assert counts(open_store(tmp_path / "g.sqlite3"))["messages"] == 21  # cancelled ones were kept


def test_pending_jobs_are_bounded_by_size(store: Store) -> None:
    store.accept([mail(f"big{i}", raw=b"x" * 1000) for i in range(10)])
    assert len(store.pending_jobs(100, max_bytes=2500)) == 3  # 0, 1000, 2000 bytes before each
    assert len(store.pending_jobs(100, max_bytes=1)) == 1  # always at least one
    assert len(store.pending_jobs(4)) == 4
