"""Every row of a SQLite store, table by table, for `gateway store copy`."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway.errors import StoreError
from gateway.store.sqlite.connection import Connection

# In an order that satisfies every reference (a duplicate refers to an older message).
TABLES = (
    "messages",
    "jobs",
    "incidents",
    "outbox",
    "outbox_attempts",
    "events",
    "imap_state",
    "imap_failures",
    "metric_offsets",
    "mail_heartbeats",
    "pagerduty_events",
)
BATCH = 500

Rows = tuple[str, tuple[str, ...], Iterator[list[tuple[Any, ...]]]]


def export_tables(path: Path) -> tuple[int, Iterator[Rows]]:
    """(schema version, per table: its name, columns and batches of rows in id order). The
    store is migrated first, so its version is this gateway's."""
    version = Connection(path).schema_version  # migrates (and refuses a newer schema)
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    return version, _tables(conn)


def _tables(conn: sqlite3.Connection) -> Iterator[Rows]:
    try:
        conn.execute("BEGIN")  # one snapshot of every table
        for table in TABLES:
            cursor = conn.execute(f"SELECT * FROM {table} ORDER BY rowid")
            columns = tuple(d[0] for d in cursor.description)
            yield table, columns, _batches(cursor)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the SQLite store: {exc}") from exc
    finally:
        conn.close()


def _batches(cursor: sqlite3.Cursor) -> Iterator[list[tuple[Any, ...]]]:
    while rows := cursor.fetchmany(BATCH):
        yield rows
