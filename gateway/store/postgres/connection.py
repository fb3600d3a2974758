"""PostgreSQL connections: a pool per process and URL, migrations, transactions, errors.

Why the synchronous API with `psycopg_pool.ConnectionPool`, not psycopg's async one: the store
protocols are synchronous and every call already runs on a store thread (`StoreThread`, the
spool writer's thread, the worker's decision thread, each IMAP poller's thread), so the asyncio
loops never wait on the database either way. Async psycopg would need an event loop inside each
of those threads (or a rewrite of every consumer to await the store) and would buy nothing: the
parallelism is already one thread per consumer. The pool is what matters: store objects borrow
a connection per call or transaction (N store objects share a few connections; one broken by a
database restart fails its call once, as a StoreError, and is replaced), and it is created per
process (a forked worker never shares its parent's sockets). Connections are in autocommit: a
single statement is one round trip, `transaction()` is BEGIN .. COMMIT.

Every commit runs with `synchronous_commit = on` except the lease bookkeeping that asks
for `transaction(durable=False)` (claims, renewals: losing one re-offers an item whose result
could not be recorded anyway). The store-wide `durable=False` hint (the worker's decisions and
delivery results, which SQLite commits with synchronous=NORMAL) is ignored here: NORMAL loses
commits only in a power cut, but an asynchronous PostgreSQL commit is lost by a mere server
crash or failover, and a lost decision or result means a page sent twice. Connection failures become `StoreError`,
which callers already answer as a transient store failure (SMTP 451, no IMAP flag, exit 75).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
import psycopg.types.string
import psycopg_pool
from psycopg.rows import dict_row

from gateway.errors import StoreError, StoreMissing, StoreUnavailable
from gateway.store.postgres.rows import DB_NOW
from gateway.store.postgres.schema import MIGRATIONS

MIGRATION_LOCK = 0x6761_7465_7761_7901  # advisory lock id: one node migrates at a time
CLOCK_TOLERANCE = 0.25  # seconds of measured skew treated as none (round trip, NTP jitter)
CLOCK_CHECK_SECONDS = 60.0  # how long a measured clock shift is trusted
CONNECT_TIMEOUT = 5  # seconds: an unreachable server is a quick 451, not a 30 s hang

log = logging.getLogger(__name__)
_pools: dict[tuple[str, int], psycopg_pool.ConnectionPool] = {}
_pools_lock = threading.Lock()


class Unreachable(StoreUnavailable):
    """The server cannot be reached, the connection broke, or the server broke a deadlock
    (psycopg's OperationalError): not a refused statement."""


def shared_pool(url: str, timeout: float) -> psycopg_pool.ConnectionPool:
    """This process's pool for `url` (created on first use, closed at exit)."""
    key = (url, os.getpid())
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = psycopg_pool.ConnectionPool(
                url,
                min_size=1,
                max_size=16,
                open=True,
                timeout=timeout,
                reconnect_timeout=3600.0,
                kwargs={
                    "autocommit": True,  # transactions are explicit (`Connection.transaction`)
                    "connect_timeout": CONNECT_TIMEOUT,
                    "options": "-c synchronous_commit=on",
                    "application_name": "email-pager-gateway",
                },
                name="gateway-store",
                configure=_configure,
            )
            _pools[key] = pool
        return pool


class NulSafeStrDumper(psycopg.types.string.StrDumperUnknown):
    """PostgreSQL text cannot hold NUL, which hostile mail puts in headers (SQLite stores it):
    it becomes U+FFFD, as undecodable bytes do, so such a mail is stored, never refused."""

    def dump(self, obj: str) -> bytes:
        return obj.replace("\x00", "\ufffd").encode(self._encoding)


def _configure(conn: psycopg.Connection[Any]) -> None:
    conn.adapters.register_dumper(str, NulSafeStrDumper)


def close_pool(url: str) -> None:
    """Close this process's pool for `url` (tests: a database per test)."""
    with _pools_lock:
        pool = _pools.pop((url, os.getpid()), None)
    if pool is not None:
        pool.close(timeout=1.0)


@atexit.register
def _close_pools() -> None:
    with _pools_lock:
        for (_, pid), pool in list(_pools.items()):
            if pid == os.getpid():
                with contextlib.suppress(Exception):
                    pool.close(timeout=1.0)
        _pools.clear()


def schema_version(conn: psycopg.Connection[Any]) -> int | None:
    """The applied version, or None when the database has no gateway schema yet."""
    row = conn.execute("SELECT to_regclass('gateway_schema')").fetchone()
    if row is None or row[0] is None:
        return None
    found = conn.execute("SELECT version FROM gateway_schema").fetchone()
    return int(found[0]) if found else 0


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Apply the migrations the database lacks, one node at a time; the version reached.
    StoreError if the schema is newer than this gateway knows (it must not write to it)."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
    version = schema_version(conn)
    if version is None:
        conn.execute("CREATE TABLE gateway_schema (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO gateway_schema (version) VALUES (0)")
        version = 0
    refuse_newer(version)
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.execute(script)  # type: ignore[arg-type]  # our own constant text, no parameters
        conn.execute("UPDATE gateway_schema SET version = %s", (number,))
    return len(MIGRATIONS)


def refuse_newer(version: int) -> None:
    if version > len(MIGRATIONS):
        raise StoreError(
            f"database schema version {version} is newer than this gateway's ({len(MIGRATIONS)}):"
            " a newer gateway migrated it; upgrade this one instead of running it against it"
        )


def describe(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://..."
    user = f"{info['user']}@" if info.get("user") else ""
    port = f":{info['port']}" if info.get("port") else ""
    return f"postgresql://{user}{info.get('host', '')}{port}/{info.get('dbname', '')}"


class Connection:
    """A PostgreSQL-backed store object, for use by one thread; connections come from the pool."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 30.0,
        durable: bool = True,
        read_only: bool = False,
    ) -> None:
        self.url = url
        self.where = describe(url)
        del durable  # see the module docstring: only per-transaction bookkeeping may skip it
        self._held: psycopg.Connection[Any] | None = None
        self._notified: set[str] = set()  # channels the open transaction has notified
        self._read_only = read_only
        self.clock: Callable[[], float] = time.time  # this node's clock (tests skew it)
        self._shift: tuple[float, float] | None = None  # (shift, when measured: monotonic)
        self.pool = shared_pool(url, min(timeout, 10.0))
        self._migrated = read_only  # a reader never migrates
        if read_only:
            self._check_readable()
            return
        try:
            with self.transaction():
                pass  # migrates
        except Unreachable as exc:
            # a store object outlives outages: the first transaction that gets through
            # migrates (and refuses a newer schema); until then its calls fail as StoreError
            log.warning("%s; the schema is checked once it answers", exc)

    def _check_readable(self) -> None:
        with self.transaction():
            assert self._held is not None
            version = schema_version(self._held)
        if version is None:
            raise StoreMissing(f"no gateway schema in {self.where}")
        if version != len(MIGRATIONS):
            raise StoreError(
                f"database {self.where} has schema version {version}, this gateway reads"
                f" {len(MIGRATIONS)}: `gateway migrate` (or a writing command) migrates it"
            )

    def clock_shift(self) -> float:
        """Seconds to add to this node's clock to get the database's: measured (and trusted
        for a minute), zero when within `CLOCK_TOLERANCE`. Leases and due times are compared
        on the database's clock only, so a node with a wrong clock cannot take a live lease."""
        now = time.monotonic()
        if self._shift is None or now - self._shift[1] > CLOCK_CHECK_SECONDS:
            before = self.clock()
            row = self._row(f"SELECT {DB_NOW}")
            after = self.clock()
            assert row is not None
            shift = float(row[0]) - (before + after) / 2
            self._shift = (0.0 if abs(shift) < CLOCK_TOLERANCE else shift, now)
        return self._shift[0]

    def _clock_args(self, **values: Any) -> dict[str, Any]:
        """Named parameters for `on_db_clock` SQL: `shift`, and `now` on this node's clock."""
        return {"shift": self.clock_shift(), "now": self.clock(), **values}

    def close(self) -> None:
        """Nothing to give back: connections return to the shared pool after every call."""

    @property
    def schema_version(self) -> int:
        with self._connection() as conn:
            return schema_version(conn) or 0

    @contextlib.contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[None]:
        """One transaction on one pooled connection; nested calls join the outer one.
        Database and connection errors become StoreError (a transient failure)."""
        if self._held is not None:
            yield
            return
        with self._errors(), self.pool.connection() as conn, conn.transaction():
            if self._read_only:  # listings: a write is refused by the server itself
                conn.execute("SET TRANSACTION READ ONLY")
            if not durable:
                conn.execute("SET LOCAL synchronous_commit = off")
            if not self._migrated:
                migrate(conn)
                self._migrated = True
            self._held = conn
            self._notified = set()
            try:
                yield
            finally:
                self._held = None

    @contextlib.contextmanager
    def read_snapshot(self) -> Iterator[None]:
        """One REPEATABLE READ, read-only transaction: every statement inside sees the snapshot
        the first one took (see `ReportStore.read_snapshot`)."""
        if self._held is not None:
            yield
            return
        if not self._migrated:
            with self.transaction():  # migrates: a read-only transaction could not
                pass
        with self._errors(), self.pool.connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            self._held = conn
            try:
                yield
            finally:
                self._held = None

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except psycopg_pool.PoolTimeout as exc:
            raise Unreachable(f"database {self.where} unreachable: {exc}") from exc
        except psycopg.OperationalError as exc:
            raise Unreachable(f"database {self.where} unreachable or failing: {exc}") from exc
        except psycopg.Error as exc:
            raise StoreError(f"database write failed: {exc}") from exc

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested unit inside `transaction()`: an exception undoes only its own writes (and
        its NOTIFYs: the transaction notifies again if it needs to)."""
        notified = set(self._notified)
        try:
            with self._connection() as conn, self._errors(), conn.transaction():
                yield
        except BaseException:
            self._notified = notified
            raise

    @contextlib.contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """The transaction's connection; outside one, a pooled connection in autocommit (one
        statement is one round trip and its own synchronous commit)."""
        if self._held is not None:
            yield self._held
        elif self._read_only or not self._migrated:
            with self.transaction():
                assert self._held is not None
                yield self._held
        else:
            with self._errors(), self.pool.connection() as conn:
                yield conn

    def _exec(self, sql: str, args: Sequence[Any] | dict[str, Any] = ()) -> int:
        """Run one statement; the number of rows it touched."""
        with self._connection() as conn:
            return conn.execute(sql, args).rowcount  # type: ignore[arg-type]

    def _rows(self, sql: str, args: Sequence[Any] | dict[str, Any] = ()) -> list[tuple[Any, ...]]:
        with self._connection() as conn:
            return conn.execute(sql, args).fetchall()  # type: ignore[arg-type]

    def _row(self, sql: str, args: Sequence[Any] | dict[str, Any] = ()) -> tuple[Any, ...] | None:
        with self._connection() as conn:
            return conn.execute(sql, args).fetchone()  # type: ignore[arg-type]

    def _dicts(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._connection() as conn, conn.cursor(row_factory=dict_row) as cursor:
            return cursor.execute(sql, args).fetchall()  # type: ignore[arg-type]

    def _many(self, sql: str, rows: Sequence[Sequence[Any] | dict[str, Any]]) -> None:
        if rows:
            with self._connection() as conn, conn.cursor() as cursor:
                cursor.executemany(sql, rows)  # type: ignore[arg-type]


def verify(url: str) -> str:
    """What `serve` and `gateway check` need of the database, checked once at start."""
    where = describe(url)
    try:
        with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT, autocommit=True) as conn:
            version = schema_version(conn)
            server = conn.info.server_version
    except psycopg.Error as exc:
        raise StoreError(f"cannot reach database {where}: {exc}".strip()) from None
    if version is None:
        return f"database {where}: PostgreSQL {server}, schema will be created"
    refuse_newer(version)
    return f"database {where}: PostgreSQL {server}, schema version {version}"


def migrate_url(url: str) -> tuple[int, int]:
    """`gateway migrate`: (version before, version after)."""
    try:
        with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT) as conn:
            before = schema_version(conn) or 0
            conn.rollback()
            with conn.transaction():
                after = migrate(conn)
    except psycopg.Error as exc:
        raise StoreError(f"cannot migrate database {describe(url)}: {exc}") from None
    return before, after
