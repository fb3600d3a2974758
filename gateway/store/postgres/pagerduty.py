"""Webhooks v3 deliveries on PostgreSQL (see `gateway.store.sqlite.pagerduty`).

A redelivery is refused by the UNIQUE webhook_id / event_id constraints themselves
(`ON CONFLICT DO NOTHING`), not by a read-then-write, so two nodes receiving the same delivery
at once store it once. Deciding one is guarded by its row: `finish_pagerduty_event` updates
only a pending row, so a second decider (after the first commits) records nothing.
"""

from __future__ import annotations

from gateway.store.filters import event_filter
from gateway.store.postgres.connection import Connection
from gateway.store.postgres.rows import INCIDENT_COLUMNS
from gateway.store.postgres.wakeups import notify_jobs
from gateway.store.records import Incident, PagerDutyEvent
from gateway.store.sqlite.pagerduty import EVENT_COLUMNS


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
        """Store a delivery durably (its own synchronous commit); None if its webhook id or
        event id was stored before. The commit wakes the deciding node, whichever it is."""
        with self.transaction(), self._connection() as conn:
            row = conn.execute(
                "INSERT INTO pagerduty_events (received_at, webhook_id, event_id, event_type,"
                " incident_key, pd_incident, body) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT DO NOTHING RETURNING id",
                (received_at, webhook_id, event_id, event_type, incident_key, pd_incident, body),
            ).fetchone()
            if row is not None:
                notify_jobs(conn)  # delivered with the commit, like a new job's
        return None if row is None else int(row[0])

    def pending_pagerduty_events(self, limit: int = 100) -> list[PagerDutyEvent]:
        rows = self._rows(
            f"SELECT {EVENT_COLUMNS} FROM pagerduty_events WHERE state = 'pending'"
            " ORDER BY id LIMIT %s",
            (limit,),
        )
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
        touched = self._exec(
            "UPDATE pagerduty_events SET state = 'done', outcome = %(outcome)s,"
            " service = %(service)s, detail = %(detail)s,"
            " incident_key = CASE WHEN %(key)s = '' THEN incident_key ELSE %(key)s END"
            " WHERE id = %(id)s AND state = 'pending'",
            {"outcome": outcome, "service": service, "detail": detail, "key": incident_key,
             "id": event},
        )  # fmt: skip
        return touched == 1

    def incidents_with_key(self, key: str) -> list[Incident]:
        rows = self._rows(
            f"SELECT {INCIDENT_COLUMNS} FROM incidents WHERE incident_key = %s"
            " ORDER BY last_seen DESC",
            (key,),
        )
        return [Incident(*row) for row in rows]

    def incident_by_pagerduty_id(self, pd_id: str) -> Incident | None:
        if not pd_id:
            return None
        row = self._row(
            f"SELECT {INCIDENT_COLUMNS} FROM incidents WHERE pd_id = %s"
            " ORDER BY last_seen DESC LIMIT 1",
            (pd_id,),
        )
        return Incident(*row) if row else None

    def pagerduty_events(
        self, *, incident_key: str | None = None, limit: int = 100, outcome: str | None = None
    ) -> list[PagerDutyEvent]:
        where, args = event_filter(incident_key, outcome, "%s")
        rows = self._rows(
            f"SELECT {EVENT_COLUMNS} FROM pagerduty_events {where} ORDER BY id DESC LIMIT %s",
            (*args, limit),
        )
        return [PagerDutyEvent(*row) for row in rows]

    def count_pagerduty_events(self, *, outcome: str | None = None) -> int:
        where, args = event_filter(None, outcome, "%s")
        row = self._row(f"SELECT COUNT(*) FROM pagerduty_events {where}", args)
        return int(row[0]) if row else 0

    def webhook_stats(self) -> tuple[int, float | None]:
        row = self._row(
            "SELECT COUNT(*), MIN(received_at) FROM pagerduty_events WHERE state = 'pending'"
        )
        assert row is not None
        return int(row[0]), row[1]
