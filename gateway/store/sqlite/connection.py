"""One SQLite connection: opening (WAL, synchronous, checkpoints), migrations, transactions.

Every part of `SQLiteStore` builds on this class: it owns `conn` (the sqlite3 connection, in
autocommit mode so transactions are explicit) and `db` (sqlite-utils, for savepoints and
dict-shaped queries). One object per thread: SQLite connections must not be shared.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import sqlite_utils

from gateway.errors import StoreError
from gateway.store.sqlite.schema import MIGRATIONS

AUTOCHECKPOINT_PAGES = 20_000  # about 80 MB of WAL


class Connection:
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
            if eager:  # opening waited like everyone (another process may hold the lock)
                conn.execute("PRAGMA busy_timeout=0")
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
                for statement in _statements(script):
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


def _statements(script: str) -> Iterator[str]:
    """The statements of a migration, whole: a trigger's body has `;` of its own."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            yield statement
            statement = ""
    if statement.strip():
        yield statement
