"""Column lists, row decoding and the database clock shared by the PostgreSQL queries."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from gateway.store.sqlite.rows import (  # the same columns, named after the record fields
    INCIDENT_COLUMNS,
    INCIDENT_FIELDS,
    INCIDENT_UPSERT,
    JOB_RECORD_COLUMNS,
    OUTBOX_COLUMNS,
    OUTBOX_FIELDS,
    outbox_item,
)

# The database's clock in epoch seconds: every node reads the same one, so a node whose own
# clock is off by a few seconds cannot take a live lease or keep a dead one.
DB_NOW = "extract(epoch from clock_timestamp())::float8"


def on_db_clock(name: str) -> str:
    """SQL for the caller's time `%(name)s` moved onto the database clock by `%(shift)s`
    (`Connection.clock_shift`), so a caller's `now + 60` means 60 s after the database's now."""
    return f"(%({name})s + %(shift)s)"


__all__ = [
    "DB_NOW",
    "INCIDENT_COLUMNS",
    "INCIDENT_FIELDS",
    "INCIDENT_UPSERT",
    "JOB_RECORD_COLUMNS",
    "OUTBOX_COLUMNS",
    "OUTBOX_FIELDS",
    "json_rows",
    "on_db_clock",
    "outbox_item",
]


def json_rows(names: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Rows as one JSON array of objects, for `json_to_recordset`: psycopg dumps a Python list
    as an array item by item in Python (a regex per item), json.dumps does it in C."""
    return json.dumps([dict(zip(names, row, strict=True)) for row in rows])
