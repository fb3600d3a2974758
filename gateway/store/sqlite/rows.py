"""Column lists and row decoding shared by the SQLite queries: columns are named after the
record fields, so a record and its row cannot drift apart."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from gateway.store.records import Incident, OutboxItem

INCIDENT_FIELDS = tuple(Incident.__dataclass_fields__)
INCIDENT_COLUMNS = ", ".join(INCIDENT_FIELDS)
OUTBOX_FIELDS = tuple(OutboxItem.__dataclass_fields__)
OUTBOX_COLUMNS = ", ".join(OUTBOX_FIELDS)
JOB_RECORD_COLUMNS = (
    "j.id, j.message, j.service, j.state, j.outcome, j.rule, j.action,"
    " j.incident_key, j.summary, j.reason, m.received_at, m.source"
)


def outbox_item(row: Sequence[Any]) -> OutboxItem:
    values = dict(zip(OUTBOX_FIELDS, row, strict=True))
    values["payload"] = json.loads(values["payload"])
    return OutboxItem(**values)
