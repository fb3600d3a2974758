"""PostgreSQL only: wake-ups across nodes (LISTEN/NOTIFY) and one purging node at a time."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest

from gateway.node import set_node
from gateway.store import JobDecision, OutboxResult, exclusive_turn, listen_for_work, open_store
from gateway.store.postgres.connection import close_pool
from gateway.store.postgres.retention import PURGE_LOCK
from tests.conftest import wait_until
from tests.store_support import mail, other_node_listening


@pytest.fixture
def url(postgres_url: str) -> Iterator[str]:
    yield postgres_url
    close_pool(postgres_url)


def test_another_nodes_commits_wake_this_nodes_workers(url: str) -> None:
    store = open_store(url)  # "node B": its commits must reach "node A"'s listener
    with other_node_listening(url) as (jobs, outbox):
        store.accept([mail("wake")])
        wait_until(jobs.is_set, message="no wake-up for new jobs")
        assert not outbox.is_set()
        store.add_outbox("pagerduty", "helpdesk", "k", {"n": 1}, None)
        wait_until(outbox.is_set, message="no wake-up for the outbox")
        store.close()


def test_the_deciding_node_sees_whether_other_nodes_deliver(url: str) -> None:
    """What `Turn.others_delivering` answers: a worker of another node listening counts, this
    node's own does not, one that stopped no longer does; nor does one whose attempt of an
    item failed within the last minute (the item waits for its retry)."""
    turn = exclusive_turn(url, "decide")
    assert turn is not None and turn.acquire()
    store = open_store(url)
    try:
        assert not turn.others_delivering("a")
        with other_node_listening(url, node="b"):
            assert not turn.others_delivering("b")  # this node's own worker
            assert turn.others_delivering("a")
        wait_until(lambda: not turn.others_delivering("a"), message="a stopped worker counts")
        with other_node_listening(url, node="b"):
            assert turn.others_delivering("a")
            item = store.add_outbox("pagerduty", "helpdesk", "k", {"n": 1}, None)
            assert store.claim_outbox(time.time(), 1, "pagerduty", 30, owner="b:1")
            set_node("b")
            try:
                failed = OutboxResult(item, "pending", error="timeout", next_attempt_at=time.time())
                store.record_outbox([failed], owner="b:1")
            finally:
                set_node("")
            assert not turn.others_delivering("a")  # b's attempts fail: a sends new items too
            with other_node_listening(url, node="c"):  # b asking: its own failures do not count
                assert turn.others_delivering("b")
    finally:
        store.close()
        turn.release()


def test_sqlite_needs_no_listener(tmp_path) -> None:
    assert listen_for_work(tmp_path / "gateway.sqlite3", lambda: None, lambda: None) is None


def test_retention_runs_on_one_node_at_a_time(url: str) -> None:
    store = open_store(url)
    store.accept([mail("old")])
    store.finish_job(JobDecision(store.pending_jobs()[0].id, outcome="discarded", reason="test"))
    with psycopg.connect(url, autocommit=True) as other_node:
        other_node.execute("SELECT pg_advisory_lock(%s)", (PURGE_LOCK,))
        assert store.purge(cutoff=9e9) == dict.fromkeys(
            ("messages", "jobs", "outbox", "events", "incidents"), 0
        )
        other_node.execute("SELECT pg_advisory_unlock(%s)", (PURGE_LOCK,))
    assert store.purge(cutoff=9e9)["messages"] == 1


@pytest.mark.parametrize("skew", [30.0, -30.0], ids=["fast", "slow"])
def test_a_node_with_a_skewed_clock_neither_takes_a_live_lease_nor_keeps_a_dead_one(
    url: str, skew: float
) -> None:
    """Leases are compared on the database's clock: node B's clock is `skew` seconds off."""
    a, b = open_store(url), open_store(url)
    b.clock = lambda: time.time() + skew  # type: ignore[attr-defined]
    item = a.add_outbox("pagerduty", "helpdesk", "k", {"n": 1}, None)
    [claimed] = a.claim_outbox(time.time(), 1, None, 10.0, owner="a:1")
    assert b.claim_outbox(b.clock(), 1, None, 10.0, owner="b:1") == []  # type: ignore[attr-defined]
    a.record_outbox([OutboxResult(claimed.id, "pending", error="503", next_attempt_at=time.time())])
    [taken] = b.claim_outbox(b.clock(), 1, None, 10.0, owner="b:1")  # type: ignore[attr-defined]
    assert taken.id == item  # due now on the database's clock, whatever B's clock says
    assert a.claim_outbox(time.time() + 5, 1, None, 10.0, owner="a:1") == []  # B's lease runs
    assert [i.id for i in a.claim_outbox(time.time() + 11, 1, None, 10.0, owner="a:1")] == [item]
