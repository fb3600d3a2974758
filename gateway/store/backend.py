"""Opening the configured backend: the one place that knows which backends exist.

A location is a file path (SQLite, the embedded default), a `sqlite:///path` URL, or a
`postgresql://` (or `postgres://`) URL (PostgreSQL, for several nodes on one database).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from gateway.errors import StoreError
from gateway.store.protocols import Background, Store, Turn

POSTGRES_SCHEMES = ("postgresql", "postgres")


def backend_of(location: str | os.PathLike[str]) -> str:
    """'sqlite' or 'postgresql'; StoreError for a URL of any other kind."""
    if isinstance(location, str) and "://" in location:
        scheme = location.partition("://")[0].lower()
        if scheme in POSTGRES_SCHEMES:
            return "postgresql"
        if scheme == "sqlite":
            return "sqlite"
        raise StoreError(
            f"unsupported store URL {scheme}://...: use postgresql://... or a SQLite file path"
        )
    return "sqlite"


def sqlite_path(location: str | os.PathLike[str]) -> Path:
    """The file of a SQLite location (`sqlite:///abs/path` or a plain path)."""
    if isinstance(location, str) and location.lower().startswith("sqlite://"):
        return Path(location[len("sqlite://") :])
    return Path(location)


def open_store(
    location: str | os.PathLike[str],
    *,
    timeout: float = 30.0,
    eager: bool = False,
    durable: bool = True,
    read_only: bool = False,
) -> Store:
    """A new connection to the store at `location`, for use by one thread.

    A file path opens SQLite (the embedded default); a postgresql:// URL opens PostgreSQL.
    `timeout` bounds the wait for the write lock (PostgreSQL: for a pooled connection);
    `durable=False` trades the flush of each commit for speed where a power cut may lose the
    last commits harmlessly; `eager` polls for the write lock instead of backing off (the
    spool writer, whose commit an SMTP client waits on). A backend may ignore these hints.
    `read_only` never creates, migrates or writes anything, so listings work with read access
    alone (another user, a read-only state directory); it raises `StoreMissing` when there is
    no store yet and `StoreError` when it cannot be read.
    """
    if backend_of(location) == "postgresql":
        from gateway.store.postgres import PostgresStore

        return PostgresStore(str(location), timeout=timeout, durable=durable, read_only=read_only)
    from gateway.store.sqlite import SQLiteStore

    return SQLiteStore(
        sqlite_path(location), timeout=timeout, eager=eager, durable=durable, read_only=read_only
    )


def listen_for_work(
    location: str | os.PathLike[str],
    on_jobs: Callable[[], None],
    on_outbox: Callable[[], None],
    node: str = "",
) -> Background | None:
    """Calls `on_jobs` when any node commits new jobs and `on_outbox` when outbox items become
    due (from a thread of its own); None where one process sees every commit itself (SQLite:
    the spool writer wakes the worker directly). `node`: this worker's node, which the other
    nodes see connected while it listens (`Turn.others_delivering`)."""
    if backend_of(location) != "postgresql":
        return None
    from gateway.store.postgres.wakeups import WakeUps

    return WakeUps(str(location), on_jobs, on_outbox, node)


def exclusive_turn(
    location: str | os.PathLike[str], name: str, *, silence: float | None = None
) -> Turn | None:
    """The turn called `name` among the nodes sharing the store at `location`; None where
    only one node can use the store (SQLite). `silence`: a holder that asks nothing of the
    store for that long (frozen, hung) loses the turn."""
    if backend_of(location) != "postgresql":
        return None
    from gateway.store.postgres.turns import Turn as PostgresTurn

    return PostgresTurn(str(location), name, silence=silence)


def verify_store(location: str | os.PathLike[str]) -> str:
    """StoreError (saying what to do) unless the store is healthy, or absent and creatable;
    else one line on what was found. What `serve` and `gateway check` run once at start.
    SQLite: the directory takes files, the database is writable, its header is SQLite's and
    `PRAGMA quick_check` passes; every connection also refuses an empty or non-SQLite file.
    PostgreSQL: the server answers and its schema is not newer than this gateway's."""
    if backend_of(location) == "postgresql":
        from gateway.store.postgres.connection import verify

        return verify(str(location))
    from gateway.store.sqlite.integrity import verify as verify_sqlite

    return verify_sqlite(sqlite_path(location))


def copy_store(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> dict[str, int]:
    """Copy every row of a SQLite store into an empty PostgreSQL store, in one transaction
    (rows per table). Both end at this gateway's schema version; the source is not changed
    beyond that. Stop the gateway first: mail accepted meanwhile would not be copied."""
    if backend_of(source) != "sqlite" or backend_of(target) != "postgresql":
        raise StoreError("store copy moves a SQLite store (sqlite:///path) into postgresql://...")
    path = sqlite_path(source)
    if not path.is_file():
        raise StoreError(f"no SQLite store at {path}")
    from gateway.store.postgres.load import load_tables
    from gateway.store.sqlite.export import export_tables

    version, tables = export_tables(path)
    return load_tables(str(target), version, tables)


def migrate_store(location: str | os.PathLike[str]) -> tuple[int, int]:
    """Apply the migrations the store lacks: (version before, version now). StoreError if its
    schema is newer than this gateway's."""
    if backend_of(location) == "postgresql":
        from gateway.store.postgres.connection import migrate_url

        return migrate_url(str(location))
    from gateway.store.sqlite.connection import migrate_file

    return migrate_file(sqlite_path(location))
