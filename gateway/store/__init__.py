"""The only module that speaks SQL: spool, jobs and decisions, incidents, outbox, event log.

SQLite (WAL, ``synchronous=FULL``) is the embedded backend. Other modules use the methods of
`Store` and the record types below, never SQL, so a PostgreSQL backend can implement the same
interface (outbox claimed with ``FOR UPDATE SKIP LOCKED``, dedup by unique constraints).

One `Store` object per thread: SQLite connections must not be shared across threads. Writes that
must be atomic together run inside ``with store.transaction():``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from gateway.errors import StoreError
from gateway.store.records import (
    _INCIDENT_COLUMNS,
    _INCIDENT_FIELDS,
    _OUTBOX_COLUMNS,
    OPEN_STATES,
    Accepted,
    Incident,
    IncomingMail,
    JobRecord,
    OutboxItem,
    OutboxResult,
    PendingJob,
    _outbox_item,
)
from gateway.store.reports import ReportQueries
from gateway.store.schema import MIGRATIONS

log = logging.getLogger(__name__)
T = TypeVar("T")
AUTOCHECKPOINT_PAGES = 20_000  # about 80 MB of WAL


class Store(ReportQueries):
    """A connection to the gateway's database, for use by one thread."""

    def __init__(
        self, path: Path, *, timeout: float = 30.0, eager: bool = False, durable: bool = True
    ) -> None:
        """`eager`: poll for the write lock every 0.2 ms instead of SQLite's busy handler,
        which sleeps 1, 2, 5, 10 ... ms between tries; for the spool writer, whose commit an
        SMTP client is waiting on while the worker process holds the lock for a moment."""
        self._lock_timeout = timeout
        self._eager = eager
        self._sync = "FULL" if durable else "NORMAL"
        if eager:
            timeout = 0.0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # check_same_thread=False: a Store may be created in one thread and then used only by
            # the worker thread that owns it (e.g. a single-thread executor).
            conn = sqlite3.connect(
                str(path), timeout=timeout, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._sync}")
            # A commit that crosses the checkpoint threshold copies the WAL into the database
            # and fsyncs it, stalling that writer (an SMTP 250) for 100+ ms: `serve` checkpoints
            # in the background instead (Checkpointer); this higher threshold is the safety net.
            conn.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
            conn.execute("PRAGMA foreign_keys=ON")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from exc
        self.path = path
        self.conn = conn
        self.db = sqlite_utils.Database(conn)
        self._migrate()

    def close(self) -> None:
        self.conn.close()

    def _migrate(self) -> None:
        with self.transaction():
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in filter(str.strip, script.split(";")):
                    self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version = {number}")

    @property
    def schema_version(self) -> int:
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    @contextlib.contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[None]:
        """BEGIN IMMEDIATE .. COMMIT; sqlite errors become StoreError (a transient failure).

        `durable=False` skips the fsync for bookkeeping whose loss in a power cut is harmless
        (leases); the next durable commit on this connection syncs it anyway.
        """
        if self.conn.in_transaction:
            yield
            return
        if not durable and self._sync == "FULL":
            self.conn.execute("PRAGMA synchronous=NORMAL")
            try:
                with self.transaction():
                    yield
            finally:
                self.conn.execute("PRAGMA synchronous=FULL")
            return
        self._begin()
        try:
            yield
            self.conn.execute("COMMIT")
        except BaseException as exc:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"database write failed: {exc}") from exc
            raise

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested unit inside `transaction()`: on an exception only its own writes are undone,
        so one bad job cannot spoil the rest of a batch."""
        with self.db.atomic():
            yield

    def _begin(self) -> None:
        deadline = time.monotonic() + self._lock_timeout
        while True:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                busy = "locked" in str(exc) or "busy" in str(exc)
                if not (self._eager and busy and time.monotonic() < deadline):
                    raise StoreError(f"database busy or unwritable: {exc}") from exc
            except sqlite3.Error as exc:
                raise StoreError(f"database busy or unwritable: {exc}") from exc
            time.sleep(0.0002)

    # -- acceptance (the spool) ------------------------------------------------------------

    def accept(self, mails: Sequence[IncomingMail]) -> list[Accepted]:
        """Durably store a batch of mails in one FULL-synchronous commit (group commit)."""
        now = time.time()
        results: list[Accepted] = []
        with self.transaction():
            for mail in mails:
                results.append(self._accept_one(mail, now))
        return results

    def _accept_one(self, mail: IncomingMail, now: float) -> Accepted:
        cursor = self.conn.execute(
            "INSERT INTO messages (received_at, source, peer, mail_from, rcpt_tos, message_id,"
            " fingerprint, size, raw, duplicate_of) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                now,
                mail.source,
                mail.peer,
                mail.mail_from,
                json.dumps(list(mail.rcpt_tos)),
                mail.message_id,
                mail.fingerprint,
                len(mail.raw),
                mail.raw,
                None,
            ),
        )
        message = cursor.lastrowid
        assert message is not None
        new_jobs = 0
        for service in mail.services:
            inserted = self.conn.execute(
                "INSERT OR IGNORE INTO jobs (message, service, fingerprint) VALUES (?,?,?)",
                (message, service, mail.fingerprint),
            )
            new_jobs += inserted.rowcount
        original = self._original(mail) if new_jobs == 0 else None
        if original is not None:
            # Every service already has this mail: keep the record, drop the copy of the bytes.
            self.conn.execute(
                "UPDATE messages SET raw = NULL, duplicate_of = ? WHERE id = ?", (original, message)
            )
            self._event("duplicate", "", message, None, f"duplicate of message {original}", now)
            return Accepted(message, original)
        return Accepted(message, None)

    def _original(self, mail: IncomingMail) -> int | None:
        """The message that first brought this mail to (the first of) its services."""
        for service in mail.services:
            row = self.conn.execute(
                "SELECT message FROM jobs WHERE service = ? AND fingerprint = ?",
                (service, mail.fingerprint),
            ).fetchone()
            if row:
                return row[0]
        return None

    # -- processing ------------------------------------------------------------------------

    def pending_jobs(self, limit: int = 100, max_bytes: int = 16 * 1024 * 1024) -> list[PendingJob]:
        """The oldest pending jobs, at most `limit` and about `max_bytes` of mail (always at
        least one), so a backlog of big messages never loads gigabytes at once."""
        rows = self.conn.execute(
            "SELECT id, message, service, raw, mail_from, source, received_at FROM ("
            "  SELECT j.id, j.message, j.service, m.raw, m.mail_from, m.source, m.received_at,"
            "   SUM(m.size) OVER (ORDER BY j.id) - m.size AS before"
            "  FROM jobs j JOIN messages m ON m.id = j.message"
            "  WHERE j.state = 'pending' ORDER BY j.id LIMIT ?"
            ") WHERE before < ? ORDER BY id",
            (limit, max_bytes),
        ).fetchall()
        return [PendingJob(r[0], r[1], r[2], r[3] or b"", r[4], r[5], r[6]) for r in rows]

    def finish_job(
        self,
        job: int,
        *,
        outcome: str,
        reason: str,
        rule: str | None = None,
        action: str | None = None,
        incident_key: str | None = None,
        summary: str | None = None,
        severity: str | None = None,
        details: dict[str, Any] | None = None,
        trace: list[dict[str, Any]] | None = None,
    ) -> bool:
        """Record the decision; False if the job was already decided (never decide twice)."""
        cursor = self.conn.execute(
            "UPDATE jobs SET state='done', outcome=?, reason=?, rule=?, action=?, incident_key=?,"
            " summary=?, severity=?, details=?, trace=?, decided_at=? WHERE id=? AND state='pending'",
            (
                outcome,
                reason,
                rule,
                action,
                incident_key,
                summary,
                severity,
                json.dumps(details or {}),
                json.dumps(trace or []),
                time.time(),
                job,
            ),
        )
        return cursor.rowcount == 1

    def job_is_pending(self, job: int) -> bool:
        row = self.conn.execute("SELECT state FROM jobs WHERE id = ?", (job,)).fetchone()
        return row is not None and row[0] == "pending"

    def incident(self, service: str, key: str) -> Incident | None:
        row = self.conn.execute(
            f"SELECT {_INCIDENT_COLUMNS} FROM incidents WHERE service=? AND incident_key=?",
            (service, key),
        ).fetchone()
        return Incident(*row) if row else None

    def save_incident(self, incident: Incident) -> None:
        placeholders = ",".join("?" * len(_INCIDENT_FIELDS))
        self.conn.execute(
            f"INSERT OR REPLACE INTO incidents ({_INCIDENT_COLUMNS}) VALUES ({placeholders})",
            tuple(getattr(incident, f) for f in _INCIDENT_FIELDS),
        )

    def incidents(self, *, open_only: bool = False, limit: int = 1000) -> list[Incident]:
        where = "WHERE state IN ('triggered','acknowledged')" if open_only else ""
        rows = self.conn.execute(
            f"SELECT {_INCIDENT_COLUMNS} FROM incidents {where} ORDER BY last_seen DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [Incident(*r) for r in rows]

    def log_event(
        self,
        kind: str,
        *,
        service: str = "",
        message: int | None = None,
        incident_key: str | None = None,
        detail: str = "",
    ) -> None:
        self._event(kind, service, message, incident_key, detail, time.time())

    def _event(
        self, kind: str, service: str, message: int | None, key: str | None, detail: str, at: float
    ) -> None:
        self.conn.execute(
            "INSERT INTO events (at, kind, service, message, incident_key, detail) VALUES (?,?,?,?,?,?)",
            (at, kind, service, message, key, detail),
        )

    def events(self, *, message: int | None = None, limit: int = 200) -> list[dict[str, Any]]:
        where, args = ("WHERE message = ?", [message]) if message is not None else ("", [])
        return list(
            self.db.query(f"SELECT * FROM events {where} ORDER BY id DESC LIMIT ?", [*args, limit])
        )

    # -- outbox ----------------------------------------------------------------------------

    def add_outbox(
        self, kind: str, service: str, order_key: str, payload: dict[str, Any], job: int | None
    ) -> int:
        now = time.time()
        cursor = self.conn.execute(
            "INSERT INTO outbox (kind, service, order_key, payload, job, created_at,"
            " next_attempt_at, updated_at) VALUES (?,?,?,?,?,?,?,?)",
            (kind, service, order_key, json.dumps(payload), job, now, now, now),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def due_outbox(
        self,
        now: float,
        limit: int = 100,
        kind: str | None = None,
        exclude: Sequence[int] = (),
    ) -> list[OutboxItem]:
        """The oldest pending item of each order key, if it is due: per-key order is kept.

        `exclude`d items (already tried by this caller) also hold back the rest of their key.
        """
        kind_filter = "AND kind = ?" if kind else ""
        skip = f"AND id NOT IN ({','.join('?' * len(exclude))})" if exclude else ""
        args: list[Any] = [kind] if kind else []
        rows = self.conn.execute(
            f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE id IN ("
            f"  SELECT MIN(id) FROM outbox WHERE state = 'pending' {kind_filter} GROUP BY order_key"
            f") AND next_attempt_at <= ? {skip} ORDER BY next_attempt_at, id LIMIT ?",
            (*args, now, *exclude, limit),
        ).fetchall()
        return [_outbox_item(r) for r in rows]

    def claim_outbox(
        self,
        now: float,
        limit: int,
        kind: str | None,
        lease_seconds: float,
        exclude: Sequence[int] = (),
    ) -> list[OutboxItem]:
        """Take due items for `lease_seconds` so no other worker (process or host) sends them
        too; a worker that dies mid-attempt loses the lease and the item becomes due again."""
        with self.transaction(durable=False):
            items = self.due_outbox(now, limit, kind, exclude)
            self.conn.executemany(
                "UPDATE outbox SET next_attempt_at = ? WHERE id = ?",
                [(now + lease_seconds, item.id) for item in items],
            )
        return items

    def next_outbox_due(self, kind: str | None = None) -> float | None:
        """When the earliest pending item becomes due, so workers can sleep until then."""
        kind_filter = "AND kind = ?" if kind else ""
        row = self.conn.execute(
            f"SELECT MIN(next_attempt_at) FROM outbox WHERE state = 'pending' {kind_filter}",
            (kind,) if kind else (),
        ).fetchone()
        return row[0]

    def record_outbox(self, results: Sequence[OutboxResult]) -> None:
        """Apply delivery attempts' results in one commit (one fsync for a whole batch)."""
        now = time.time()
        with self.transaction():
            for r in results:
                self.conn.execute(
                    "UPDATE outbox SET state = ?, attempts = attempts + 1, response = ?,"
                    " last_error = ?, next_attempt_at = COALESCE(?, next_attempt_at),"
                    " updated_at = ? WHERE id = ? AND state = 'pending'",
                    (r.state, r.response, r.error, r.next_attempt_at, now, r.id),
                )

    def outbox(
        self, states: Sequence[str] = ("pending", "dead"), limit: int = 1000
    ) -> list[OutboxItem]:
        marks = ",".join("?" * len(states))
        rows = self.conn.execute(
            f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE state IN ({marks}) ORDER BY id LIMIT ?",
            (*states, limit),
        ).fetchall()
        return [_outbox_item(r) for r in rows]

    def requeue_outbox(self, item: int | None = None) -> int:
        """Put dead letters (one, or all with None) back in the queue; returns how many."""
        now = time.time()
        where, args = ("AND id = ?", (item,)) if item is not None else ("", ())
        with self.transaction():
            cursor = self.conn.execute(
                "UPDATE outbox SET state = 'pending', next_attempt_at = ?, updated_at = ?,"
                f" created_at = ? WHERE state = 'dead' {where}",
                (now, now, now, *args),
            )
        return cursor.rowcount

    def outbox_stats(self) -> tuple[int, float | None]:
        """(pending count, created_at of the oldest pending item)."""
        row = self.conn.execute(
            "SELECT COUNT(*), MIN(created_at) FROM outbox WHERE state = 'pending'"
        ).fetchone()
        return row[0], row[1]

    # -- IMAP positions --------------------------------------------------------------------

    def imap_position(self, account: str, folder: str) -> tuple[int, int] | None:
        """(UIDVALIDITY, last processed UID) of a mailbox folder, or None if never polled."""
        row = self.conn.execute(
            "SELECT uidvalidity, last_uid FROM imap_state WHERE account = ? AND folder = ?",
            (account, folder),
        ).fetchone()
        return (row[0], row[1]) if row else None

    def save_imap_position(
        self, account: str, folder: str, uidvalidity: int, last_uid: int
    ) -> None:
        """Advance the position; called only after the batch was committed and marked/moved."""
        self.conn.execute(
            "INSERT INTO imap_state (account, folder, uidvalidity, last_uid) VALUES (?,?,?,?)"
            " ON CONFLICT (account, folder) DO UPDATE SET uidvalidity = excluded.uidvalidity,"
            " last_uid = excluded.last_uid",
            (account, folder, uidvalidity, last_uid),
        )

    def mark_imap_success(self, account: str, folder: str, at: float | None = None) -> None:
        """Record a completed fetch cycle (for health: when did this mailbox last answer?)."""
        self.conn.execute(
            "UPDATE imap_state SET last_success = ? WHERE account = ? AND folder = ?",
            (time.time() if at is None else at, account, folder),
        )

    # -- listings --------------------------------------------------------------------------

    def jobs(self, *, outcomes: Sequence[str] | None = None, limit: int = 100) -> list[JobRecord]:
        where, args = "", []
        if outcomes:
            where = f"WHERE j.outcome IN ({','.join('?' * len(outcomes))})"
            args = list(outcomes)
        rows = self.conn.execute(
            "SELECT j.id, j.message, j.service, j.state, j.outcome, j.rule, j.action,"
            " j.incident_key, j.summary, j.reason, m.received_at, m.source"
            f" FROM jobs j JOIN messages m ON m.id = j.message {where} ORDER BY j.id DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [JobRecord(*r) for r in rows]

    def job_detail(self, job: int) -> dict[str, Any] | None:
        rows = list(self.db.query("SELECT * FROM jobs WHERE id = ?", [job]))
        if not rows:
            return None
        detail = rows[0]
        detail["details"] = json.loads(detail["details"] or "{}")
        detail["trace"] = json.loads(detail["trace"] or "[]")
        return detail

    def raw_message(self, message: int) -> bytes | None:
        row = self.conn.execute("SELECT raw FROM messages WHERE id = ?", (message,)).fetchone()
        return row[0] if row else None

    def counts(self) -> dict[str, int]:
        """Totals for metrics and health: messages, duplicates, and jobs per outcome."""
        counts = {
            "messages": self.conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0],
            "duplicates": self.conn.execute(
                "SELECT COUNT(*) FROM messages WHERE duplicate_of IS NOT NULL"
            ).fetchone()[0],
        }
        for outcome, n in self.conn.execute(
            "SELECT COALESCE(outcome, 'pending'), COUNT(*) FROM jobs GROUP BY 1"
        ):
            counts[f"jobs.{outcome}"] = n
        return counts


class StoreThread:
    """Runs store calls on one dedicated thread, for asyncio code (the loop never blocks on fsync)."""

    def __init__(self, db_path: Path, name: str = "store", *, durable: bool = True) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        self._store = self._executor.submit(Store, db_path, durable=durable).result()

    async def call(self, fn: Callable[[Store], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, self._store)

    def close(self) -> None:
        self._executor.submit(self._store.close).result()
        self._executor.shutdown()


class Checkpointer:
    """Keeps the WAL short with PASSIVE checkpoints on a thread of its own.

    A passive checkpoint never takes the write lock, so no writer waits for it; the database
    file's fsync happens here instead of inside somebody's commit.
    """

    def __init__(self, db_path: Path, interval: float = 1.0) -> None:
        self._db_path = db_path
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checkpointer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        conn = sqlite3.connect(str(self._db_path), timeout=5.0, isolation_level=None)
        try:
            while not self._stop.wait(self._interval):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:  # busy or I/O trouble: the next round retries
                    log.debug("background checkpoint failed: %s", exc)
        finally:
            conn.close()


__all__ = [
    "OPEN_STATES",
    "Accepted",
    "Checkpointer",
    "Incident",
    "IncomingMail",
    "JobRecord",
    "OutboxItem",
    "OutboxResult",
    "PendingJob",
    "Store",
    "StoreThread",
]
