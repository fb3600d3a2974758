"""What only the SQLite backend does: WAL and synchronous settings, its locking, migrations.

The promises every backend keeps are in `tests/store_contract/`.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from gateway.config import PagerDutySettings, ServiceSettings
from gateway.decide.processor import Processor, load_services
from gateway.errors import StoreError
from gateway.intake.spool import incoming
from gateway.store import open_store
from gateway.store.records import OutboxResult
from gateway.store.sqlite import AUTOCHECKPOINT_PAGES, Checkpointer, SQLiteStore
from gateway.store.sqlite.schema import MIGRATIONS
from tests.conftest import RULES_DIR, desk_mail
from tests.store_support import counts, mail


@pytest.fixture
def store(tmp_path: Path) -> SQLiteStore:
    s = open_store(tmp_path / "db" / "gateway.sqlite3")
    assert isinstance(s, SQLiteStore)
    yield s
    s.close()


def test_schema_is_versioned_and_durable(store: SQLiteStore) -> None:
    assert store.schema_version >= 1
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_schema_version_is_the_last_migration(store: SQLiteStore) -> None:
    assert store.schema_version == len(MIGRATIONS)


def test_checkpoints_are_left_to_the_background(store: SQLiteStore) -> None:
    pages = store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
    assert pages == AUTOCHECKPOINT_PAGES


def test_bookkeeping_commits_skip_the_fsync_and_restore_it(store: SQLiteStore) -> None:
    def synchronous() -> int:
        return store.conn.execute("PRAGMA synchronous").fetchone()[0]

    with store.transaction(durable=False):
        assert synchronous() == 1  # NORMAL
    assert synchronous() == 2
    store.claim_outbox(time.time(), 10, None, 60.0)  # leases are such bookkeeping
    assert synchronous() == 2


def test_a_non_durable_store_syncs_normally(tmp_path: Path) -> None:
    store = open_store(tmp_path / "g.sqlite3", durable=False)
    assert isinstance(store, SQLiteStore)
    assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL


def test_store_errors_are_transient(tmp_path: Path) -> None:
    path = tmp_path / "g.sqlite3"
    store = open_store(path, timeout=0.1)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")

    with pytest.raises(StoreError):
        store.accept([mail("x")])
    blocker.execute("ROLLBACK")
    assert store.accept([mail("x")])[0].duplicate_of is None


def test_an_eager_store_waits_for_the_lock_up_to_its_timeout(tmp_path: Path) -> None:
    path = tmp_path / "g.sqlite3"
    store = open_store(path, timeout=0.2, eager=True)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    with pytest.raises(StoreError):
        store.accept([mail("x")])
    assert time.monotonic() - started >= 0.2
    blocker.execute("ROLLBACK")


def test_an_eager_store_opens_while_another_process_holds_the_database(tmp_path: Path) -> None:
    """After a kill -9, the restarted spool writer opens the database while the old worker still
    commits (or recovers the WAL): opening must wait like any connection, not fail at once."""
    path = tmp_path / "g.sqlite3"
    open_store(path).close()
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("PRAGMA locking_mode=EXCLUSIVE")
    blocker.execute("BEGIN IMMEDIATE")
    blocker.execute("CREATE TABLE held (x)")
    release = threading.Timer(0.3, lambda: (blocker.execute("ROLLBACK"), blocker.close()))
    release.start()
    try:
        store = open_store(path, timeout=30.0, eager=True)
    finally:
        release.join()
    assert store.accept([mail("x")])[0].duplicate_of is None
    store.close()


def test_urls_of_other_backends_are_refused(tmp_path: Path) -> None:
    # postgresql:// is a backend since issue 13; any other scheme is still refused
    with pytest.raises(StoreError, match="mysql://"):
        open_store("mysql://gateway@db/gateway")


def test_checkpointer_starts_and_stops(store: SQLiteStore) -> None:
    store.accept([mail(f"m{i}") for i in range(10)])
    checkpointer = Checkpointer(store.path, interval=0.01)
    checkpointer.start()
    time.sleep(0.05)
    checkpointer.stop()


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


def test_an_smtp_commit_is_awaited_without_a_task_per_mail(tmp_path: Path) -> None:
    """The listener shields the acceptance as it is: a future, not a coroutine that needs a
    task (and an extra event-loop iteration) for every mail."""
    import asyncio

    from gateway.intake.spool import SpoolWriter

    writer = SpoolWriter(tmp_path / "g.sqlite3")
    writer.start()

    async def scenario() -> int:
        accepting = writer.accept(mail("one"))
        assert asyncio.isfuture(accepting) and not isinstance(accepting, asyncio.Task)
        assert asyncio.ensure_future(accepting) is accepting
        return (await asyncio.wait_for(accepting, timeout=10)).id

    try:
        assert asyncio.run(scenario()) >= 1
    finally:
        writer.stop()


GROWING_TABLES = ("messages", "jobs", "incidents", "outbox", "events", "pagerduty_events")


def full_scans(store: SQLiteStore, statements: list[str]) -> dict[str, list[str]]:
    """Each statement that reads a growing table from end to end, with the scans its plan
    names (a scan of a constant list, a subquery or through an index is fine)."""
    found: dict[str, list[str]] = {}
    for sql in statements:
        if not sql.lstrip().upper().startswith(("SELECT", "WITH", "UPDATE", "DELETE", "INSERT")):
            continue
        plan = store.conn.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall()
        scans = [
            step[3]
            for step in plan
            if step[3].startswith("SCAN ")
            and step[3].split()[1] in GROWING_TABLES
            and " USING " not in step[3]
        ]
        if scans:
            found[sql] = scans
    return found


def test_deciding_delivering_and_lookups_search_by_index(tmp_path: Path) -> None:
    """The decide and delivery path (and a PagerDuty webhook's or a mail page's lookups) cost
    the same with a year of incidents as with none: no statement scans a growing table."""
    store = open_store(tmp_path / "gateway.sqlite3")
    settings = ServiceSettings("helpdesk", ("desk@*",), (RULES_DIR / "helpdesk.toml",), "R" * 32)
    processor = Processor(store, load_services((settings,)), PagerDutySettings())
    mails = [desk_mail(f"Case {n}") for n in range(40)] + [desk_mail("Case 1", "Resolved")]
    store.accept([incoming(raw, source="cli", services=("helpdesk",)) for raw in mails])
    statements: list[str] = []
    store.conn.set_trace_callback(statements.append)
    processor.process_pending()
    claimed = store.claim_outbox(time.time(), 100, "pagerduty", 30, owner="w")
    assert claimed, "the decisions queued PagerDuty events"
    results = [OutboxResult(item.id, "done", response="{}") for item in claimed[:5]]
    store.record_and_claim_outbox(results, time.time(), 100, "pagerduty", 30, owner="w")
    store.incident_by_pagerduty_id("PABC123")
    store.events(message=1)
    store.conn.set_trace_callback(None)
    assert len(statements) > 40
    assert full_scans(store, statements) == {}
