"""Deciding jobs: pending jobs in acceptance order, the decision, the incident mirror."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from gateway.store.records import Incident, JobDecision, PendingJob
from gateway.store.sqlite.connection import Connection
from gateway.store.sqlite.rows import (
    INCIDENT_COLUMNS,
    INCIDENT_COLUMNS_OF_I,
    INCIDENT_FIELDS,
    INCIDENT_UPSERT,
)

_SAVE_INCIDENT = (
    f"INSERT INTO incidents ({', '.join(INCIDENT_FIELDS)})"
    f" VALUES ({','.join('?' * len(INCIDENT_FIELDS))}){INCIDENT_UPSERT}"
)


def _incident_row(incident: Incident) -> tuple[Any, ...]:
    return tuple(getattr(incident, f) for f in INCIDENT_FIELDS)


class DecisionQueries(Connection):
    def pending_jobs(self, limit: int = 100, max_bytes: int = 16 * 1024 * 1024) -> list[PendingJob]:
        """The oldest pending jobs, at most `limit` and about `max_bytes` of mail (always at
        least one), so a backlog of big messages never loads gigabytes at once."""
        rows = self.conn.execute(
            "SELECT id, message, service, raw, mail_from, source, received_at FROM ("
            "  SELECT j.id, j.message, j.service, m.raw, m.mail_from, m.source, m.received_at,"
            "   SUM(m.size) OVER (ORDER BY j.id) - m.size AS before"
            "  FROM jobs j JOIN messages m ON m.id = j.message"
            "  WHERE j.state = 'pending' ORDER BY j.id LIMIT ?"
            ") WHERE before < ? ORDER BY id",
            (limit, max_bytes),
        ).fetchall()
        return [PendingJob(r[0], r[1], r[2], r[3] or b"", r[4], r[5], r[6]) for r in rows]

    def finish_job(self, decision: JobDecision) -> bool:
        """Record the decision; False if the job was already decided (never decide twice)."""
        return decision.job in self.finish_jobs([decision])

    def finish_jobs(self, decisions: Sequence[JobDecision]) -> set[int]:
        now = time.time()
        recorded: set[int] = set()
        for decision in decisions:  # a statement each costs microseconds in process
            cursor = self.conn.execute(
                "UPDATE jobs SET state='done', outcome=?, reason=?, rule=?, action=?,"
                " incident_key=?, summary=?, severity=?, details=?, trace=?, decided_at=?"
                " WHERE id=? AND state='pending'",
                decision.stored(now),
            )
            if cursor.rowcount == 1:
                recorded.add(decision.job)
        return recorded

    def incident(self, service: str, key: str) -> Incident | None:
        row = self.conn.execute(
            f"SELECT {INCIDENT_COLUMNS} FROM incidents WHERE service=? AND incident_key=?",
            (service, key),
        ).fetchone()
        return Incident(*row) if row else None

    def lock_incidents(self, slots: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Incident]:
        """The write transaction holds the whole database already: only the read."""
        return self.incidents_of(slots)

    def incidents_of(self, slots: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Incident]:
        found: dict[tuple[str, str], Incident] = {}
        for start in range(0, len(slots), 400):  # two variables each, far below SQLite's limit
            chunk = slots[start : start + 400]
            pairs = ",".join(["(?,?)"] * len(chunk))
            rows = self.conn.execute(  # CROSS JOIN: a primary-key search per pair, never a scan
                f"WITH wanted (service, incident_key) AS (VALUES {pairs})"
                f" SELECT {INCIDENT_COLUMNS_OF_I} FROM wanted CROSS JOIN incidents i"
                " ON i.service = wanted.service AND i.incident_key = wanted.incident_key",
                [value for slot in chunk for value in slot],
            ).fetchall()
            for row in rows:
                incident = Incident(*row)
                found[(incident.service, incident.incident_key)] = incident
        return found

    def save_incident(self, incident: Incident) -> None:
        self.save_incidents([incident])

    def save_incidents(self, incidents: Sequence[Incident]) -> None:
        """Write the mirror; the coalesced-repeat columns are kept, and reset when the
        incident opens again (a new episode)."""
        self.conn.executemany(_SAVE_INCIDENT, [_incident_row(i) for i in incidents])

    def note_coalesced(
        self, service: str, key: str, at: float, details: dict[str, Any], count: int = 1
    ) -> None:
        """Count absorbed repeat triggers on the (open) incident."""
        self.conn.execute(
            "UPDATE incidents SET coalesced = coalesced + ?, coalesced_at = ?, latest_details = ?"
            " WHERE service = ? AND incident_key = ?",
            (count, at, json.dumps(details, ensure_ascii=False), service, key),
        )
