"""Webhooks v3 deliveries (stored before the 2xx, decided later) and incident look-ups by
PagerDuty's own identifiers."""

from __future__ import annotations

import sqlite3

from gateway.store.filters import event_filter
from gateway.store.records import Incident, PagerDutyEvent
from gateway.store.sqlite.connection import Connection
from gateway.store.sqlite.rows import INCIDENT_COLUMNS

EVENT_COLUMNS = ", ".join(PagerDutyEvent.__dataclass_fields__)


class PagerDutyQueries(Connection):
    def add_pagerduty_event(
        self,
        *,
        body: str,
        received_at: float,
        webhook_id: str | None = None,
        event_id: str | None = None,
        event_type: str = "",
        incident_key: str = "",
        pd_incident: str = "",
    ) -> int | None:
        """Store a delivery durably; None if its webhook id or event id was stored before."""
        with self.transaction():
            seen = self.conn.execute(
                "SELECT id FROM pagerduty_events WHERE webhook_id = ? OR event_id = ?",
                (webhook_id, event_id),
            ).fetchone()
            if seen is not None:
                return None
            try:
                cursor = self.conn.execute(
                    "INSERT INTO pagerduty_events (received_at, webhook_id, event_id, event_type,"
                    " incident_key, pd_incident, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        received_at,
                        webhook_id,
                        event_id,
                        event_type,
                        incident_key,
                        pd_incident,
                        body,
                    ),
                )
            except sqlite3.IntegrityError:  # a concurrent writer stored it first
                return None
            return int(cursor.lastrowid or 0)

    def pending_pagerduty_events(self, limit: int = 100) -> list[PagerDutyEvent]:
        rows = self.conn.execute(
            f"SELECT {EVENT_COLUMNS} FROM pagerduty_events WHERE state = 'pending'"
            " ORDER BY id LIMIT ?",
            (limit,),
        ).fetchall()
        return [PagerDutyEvent(*row) for row in rows]

    def finish_pagerduty_event(
        self,
        event: int,
        *,
        outcome: str,
        service: str = "",
        detail: str = "",
        incident_key: str = "",
    ) -> bool:
        cursor = self.conn.execute(
            "UPDATE pagerduty_events SET state = 'done', outcome = ?, service = ?, detail = ?,"
            " incident_key = CASE WHEN ? = '' THEN incident_key ELSE ? END"
            " WHERE id = ? AND state = 'pending'",
            (outcome, service, detail, incident_key, incident_key, event),
        )
        return cursor.rowcount == 1

    def incidents_with_key(self, key: str) -> list[Incident]:
        rows = self.conn.execute(
            f"SELECT {INCIDENT_COLUMNS} FROM incidents WHERE incident_key = ?"
            " ORDER BY last_seen DESC",
            (key,),
        ).fetchall()
        return [Incident(*row) for row in rows]

    def incident_by_pagerduty_id(self, pd_id: str) -> Incident | None:
        if not pd_id:
            return None
        row = self.conn.execute(
            f"SELECT {INCIDENT_COLUMNS} FROM incidents WHERE pd_id = ?"
            " ORDER BY last_seen DESC LIMIT 1",
            (pd_id,),
        ).fetchone()
        return Incident(*row) if row else None

    def pagerduty_events(
        self, *, incident_key: str | None = None, limit: int = 100, outcome: str | None = None
    ) -> list[PagerDutyEvent]:
        where, args = event_filter(incident_key, outcome, "?")
        rows = self.conn.execute(
            f"SELECT {EVENT_COLUMNS} FROM pagerduty_events {where} ORDER BY id DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [PagerDutyEvent(*row) for row in rows]

    def count_pagerduty_events(self, *, outcome: str | None = None) -> int:
        where, args = event_filter(None, outcome, "?")
        row = self.conn.execute(f"SELECT COUNT(*) FROM pagerduty_events {where}", args)
        return int(row.fetchone()[0])

    def webhook_stats(self) -> tuple[int, float | None]:
        row = self.conn.execute(
            "SELECT COUNT(*), MIN(received_at) FROM pagerduty_events WHERE state = 'pending'"
        ).fetchone()
        return int(row[0]), row[1]
