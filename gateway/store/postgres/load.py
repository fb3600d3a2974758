"""Loading a whole store into an empty PostgreSQL database (`gateway store copy`).

One transaction: either everything arrives (pending jobs and outbox items, incidents,
history, IMAP positions, counters) or nothing does. Ids are kept, so `queued as N` and the
status page's links stay valid; the identity sequences then continue after them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from gateway.errors import StoreError
from gateway.store.postgres import PostgresStore
from gateway.store.postgres.schema import MIGRATIONS

IDENTITY_TABLES = ("messages", "jobs", "outbox", "outbox_attempts", "events", "pagerduty_events")
Rows = tuple[str, tuple[str, ...], Iterator[list[tuple[Any, ...]]]]


def load_tables(url: str, version: int, tables: Iterable[Rows]) -> dict[str, int]:
    """Copy `tables` into the empty store at `url`; rows per table."""
    if version != len(MIGRATIONS):
        raise StoreError(
            f"the source has schema version {version}, PostgreSQL here has {len(MIGRATIONS)}:"
            " copy with the gateway version that wrote the source"
        )
    store = PostgresStore(url)
    counts: dict[str, int] = {}
    with store.transaction(), store._connection() as conn:
        if _has_rows(store):
            raise StoreError(f"{store.where} already holds data: copy only into an empty store")
        for table, columns, batches in tables:
            counts[table] = 0
            with conn.cursor().copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for batch in batches:
                    for row in batch:
                        copy.write_row(row)
                    counts[table] += len(batch)
        for table in IDENTITY_TABLES:
            conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                f" COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
            )
    return counts


def _has_rows(store: PostgresStore) -> bool:
    row = store._row(
        "SELECT EXISTS (SELECT 1 FROM messages) OR EXISTS (SELECT 1 FROM outbox)"
        " OR EXISTS (SELECT 1 FROM incidents)"
    )
    return bool(row and row[0])
