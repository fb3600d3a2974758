"""Column lists and row decoding shared by the SQLite queries: columns are named after the
record fields, so a record and its row cannot drift apart."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from gateway.store.records import Incident, OutboxItem

INCIDENT_COLUMNS = ", ".join(Incident.__dataclass_fields__)
INCIDENT_COLUMNS_OF_I = ", ".join(f"i.{field}" for field in Incident.__dataclass_fields__)
# what `save_incident` writes: the mirror; the coalesced-repeat columns have their own writer
INCIDENT_FIELDS = tuple(f for f, d in Incident.__dataclass_fields__.items() if d.compare)
_NEW_EPISODE = "incidents.times_opened <> excluded.times_opened"
# after `INSERT INTO incidents (INCIDENT_FIELDS) ...`, on both backends: the mirror's columns
# replaced, the coalesced-repeat columns kept, and reset when the incident opens again
INCIDENT_UPSERT = (
    " ON CONFLICT (service, incident_key) DO UPDATE SET"
    f" {', '.join(f'{f} = excluded.{f}' for f in INCIDENT_FIELDS[2:])},"
    f" coalesced = CASE WHEN {_NEW_EPISODE} THEN 0 ELSE incidents.coalesced END,"
    f" coalesced_at = CASE WHEN {_NEW_EPISODE} THEN NULL ELSE incidents.coalesced_at END,"
    f" latest_details = CASE WHEN {_NEW_EPISODE} THEN '' ELSE incidents.latest_details END"
)
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
