"""One SQLite connection: opening (WAL, synchronous, checkpoints), migrations, transactions.

Every part of `SQLiteStore` builds on this class: it owns `conn` (the sqlite3 connection, in
autocommit mode so transactions are explicit) and `db` (sqlite-utils, for savepoints and
dict-shaped queries). One object per thread: SQLite connections must not be shared.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlite_utils

from gateway.errors import StoreError, StoreMissing
from gateway.store.sqlite.integrity import check_file, ensure_database, not_a_database
from gateway.store.sqlite.schema import MIGRATIONS

AUTOCHECKPOINT_PAGES = 20_000  # about 80 MB of WAL
_HINT = " (run as the gateway's user: see the README's read-only recipe)"


def migrate(conn: sqlite3.Connection) -> None:
    """Apply the migrations the database lacks (the caller holds the transaction)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise StoreError(
            f"database schema version {version} is newer than this gateway's ({len(MIGRATIONS)}):"
            " a newer gateway migrated it; upgrade this one instead of running it against it"
        )
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        for statement in _statements(script):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {number}")


def migrate_file(path: Path) -> tuple[int, int]:
    """`gateway migrate`: (version before, version after); creates a missing database."""
    before = 0
    if check_file(path):
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            before = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read database {path}: {exc}") from None
        finally:
            conn.close()
    store = Connection(path)
    try:
        return before, store.schema_version
    finally:
        store.close()


class GuardedCursor(sqlite3.Cursor):
    """Reports a damaged page met while reading rows as StoreError (see GuardedConnection)."""

    def fetchone(self) -> Any:
        try:
            return super().fetchone()
        except sqlite3.DatabaseError as exc:
            _raise_if_corrupt(exc)
            raise

    def fetchall(self) -> list[Any]:
        try:
            return super().fetchall()
        except sqlite3.DatabaseError as exc:
            _raise_if_corrupt(exc)
            raise

    def __next__(self) -> Any:
        try:
            return super().__next__()
        except sqlite3.DatabaseError as exc:
            _raise_if_corrupt(exc)
            raise


class GuardedConnection(sqlite3.Connection):
    """A sqlite3 connection whose corruption errors ("database disk image is malformed",
    "file is not a database") are StoreError, so every caller answers them as a store failure
    (SMTP 451, exit 75 with one line) instead of a traceback. Busy, I/O and constraint errors
    keep their sqlite3 types: the store's own code handles those."""

    def cursor(self, factory: Any = GuardedCursor) -> Any:  # execute() creates its cursor here
        return super().cursor(factory)

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        try:
            return super().execute(sql, parameters)
        except sqlite3.DatabaseError as exc:
            _raise_if_corrupt(exc)
            raise

    def executemany(self, sql: str, parameters: Any, /) -> Any:
        try:
            return super().executemany(sql, parameters)
        except sqlite3.DatabaseError as exc:
            _raise_if_corrupt(exc)
            raise


def _raise_if_corrupt(exc: sqlite3.DatabaseError) -> None:
    """Corruption is exactly DatabaseError (SQLITE_CORRUPT, SQLITE_NOTADB); its subclasses
    (busy, I/O, constraint) are left to the caller."""
    if type(exc) is sqlite3.DatabaseError:
        raise StoreError(f"database damaged: {exc}; run `gateway check`") from exc


class Connection:
    """A connection to the gateway's database, for use by one thread."""

    def __init__(
        self,
        path: Path,
        *,
        timeout: float = 30.0,
        eager: bool = False,
        durable: bool = True,
        read_only: bool = False,
    ) -> None:
        """`eager`: poll for the write lock every 0.2 ms instead of SQLite's busy handler,
        which sleeps 1, 2, 5, 10 ... ms between tries; for the spool writer, whose commit an
        SMTP client is waiting on while the worker process holds the lock for a moment.
        `read_only`: see `_open_read_only`."""
        self._lock_timeout = timeout
        self._eager = eager
        self._sync = "FULL" if durable else "NORMAL"
        if read_only:
            self._open_read_only(path, timeout)
            return
        ensure_database(path, migrate)  # never silently start over on a damaged file
        try:
            # check_same_thread=False: a Store may be created in one thread and then used only by
            # the worker thread that owns it (e.g. a single-thread executor).
            conn = sqlite3.connect(
                str(path),
                timeout=timeout,
                isolation_level=None,
                check_same_thread=False,
                factory=GuardedConnection,
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
        except StoreError as exc:  # corruption, as GuardedConnection reports it
            if "file is not a database" in str(exc):
                raise not_a_database(path) from exc
            raise
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from exc
        self.path = path
        self.conn = conn
        self.db = sqlite_utils.Database(conn)
        self._migrate()

    def _open_read_only(self, path: Path, timeout: float) -> None:
        """Open for reading only (SQLite `mode=ro`): no file, directory or migration is created,
        so it works for another user with read access or on a read-only state directory.

        A WAL reader needs to create the `-shm` file when it is missing: if it cannot (the
        service is stopped and the directory is read-only), and no `-wal` file holds
        unmerged commits, the file alone is the whole database and is read `immutable`."""
        try:
            path.stat()
        except FileNotFoundError:
            raise StoreMissing(f"no database at {path}") from None
        except OSError as exc:
            raise StoreError(f"cannot read database {path}: {exc.strerror}{_HINT}") from None
        if not os.access(path, os.R_OK):
            raise StoreError(f"cannot read database {path}: permission denied{_HINT}")
        check_file(path)  # an empty or non-file database is refused here too
        try:
            try:
                conn = _read_only_connection(path, timeout, immutable=False)
            except sqlite3.OperationalError:
                if Path(f"{path}-wal").exists():
                    raise
                conn = _read_only_connection(path, timeout, immutable=True)
        except StoreError as exc:  # corruption, as GuardedConnection reports it
            if "file is not a database" in str(exc):
                raise not_a_database(path) from exc
            raise
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read database {path}: {exc}") from exc
        self.path = path
        self.conn = conn
        self.db = sqlite_utils.Database(conn)
        version, current = self.schema_version, len(MIGRATIONS)
        if version != current:
            conn.close()
            raise StoreError(
                f"database {path} has schema version {version}, this gateway reads {current}:"
                " a writing command (`gateway serve`, `ingest`) migrates it"
            )

    def close(self) -> None:
        self.conn.close()

    def _migrate(self) -> None:
        with self.transaction():
            migrate(self.conn)

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
    def read_snapshot(self) -> Iterator[None]:
        """A deferred read transaction: in WAL mode its reads all see the database as of the
        first one, and it never takes the write lock (see `ReportStore.read_snapshot`)."""
        if self.conn.in_transaction:
            yield
            return
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            if self.conn.in_transaction:
                self.conn.execute("COMMIT")

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested unit inside `transaction()`: on an exception only its own writes are undone,
        so one bad job cannot spoil the rest of a batch.

        One fixed name (SQLite releases the innermost savepoint of a name), so the statements
        come from the connection's statement cache: sqlite-utils' `atomic()` names each one
        randomly, which cost an `os.urandom` and two statement compilations per job."""
        if not self.conn.in_transaction:
            with self.transaction():
                yield
            return
        self.conn.execute("SAVEPOINT unit")
        try:
            yield
        except BaseException:
            # an error such as a RAISE(ROLLBACK) trigger may have ended the whole transaction
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK TO SAVEPOINT unit")
                self.conn.execute("RELEASE SAVEPOINT unit")
            raise
        self.conn.execute("RELEASE SAVEPOINT unit")

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


def _read_only_connection(path: Path, timeout: float, *, immutable: bool) -> sqlite3.Connection:
    """A `mode=ro` connection, checked with a first read (SQLite opens lazily). Temporary
    tables stay writable (`gateway purge --dry-run` counts through them)."""
    uri = f"{path.resolve().as_uri()}?mode=ro" + ("&immutable=1" if immutable else "")
    conn = sqlite3.connect(
        uri,
        uri=True,
        timeout=timeout,
        isolation_level=None,
        check_same_thread=False,
        factory=GuardedConnection,
    )
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except sqlite3.Error:
        conn.close()
        raise
    return conn


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
