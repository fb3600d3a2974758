"""Deciding jobs on PostgreSQL: whichever node decides, each job is decided once.

Nodes decide one at a time (the worker's "decide" turn keeps acceptance order), but a
`gateway ingest` may decide beside them: `finish_job` claims the job with `FOR UPDATE SKIP
LOCKED` as it records the decision (False: another decider holds or decided it, and the
processor undoes that job's savepoint), and `incident` locks the incident's key until the commit, so two deciders never both build on
the same incident: the second reads the first one's result and decides its job again (the
processor's IncidentMoved).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from gateway.store.postgres.connection import Connection
from gateway.store.postgres.rows import (
    INCIDENT_COLUMNS,
    INCIDENT_FIELDS,
    INCIDENT_UPSERT,
    json_rows,
)
from gateway.store.records import Incident, JobDecision, PendingJob

# the columns of `JobDecision.stored`, as `finish_jobs` names them
_DECIDED = (
    "outcome",
    "reason",
    "rule",
    "action",
    "incident_key",
    "summary",
    "severity",
    "details",
    "trace",
    "decided_at",
    "id",
)


_SAVE_INCIDENTS = (  # the table's own row type reads the JSON: each column keeps its type
    f"INSERT INTO incidents ({', '.join(INCIDENT_FIELDS)}) SELECT {', '.join(INCIDENT_FIELDS)}"
    f" FROM json_populate_recordset(NULL::incidents, %s::json){INCIDENT_UPSERT}"
)


class DecisionQueries(Connection):
    def pending_jobs(self, limit: int = 100, max_bytes: int = 16 * 1024 * 1024) -> list[PendingJob]:
        rows = self._rows(
            "WITH claimable AS (SELECT id FROM jobs WHERE state = 'pending' ORDER BY id"
            "  LIMIT %s)"
            " SELECT id, message, service, raw, mail_from, source, received_at FROM ("
            "  SELECT j.id, j.message, j.service, m.raw, m.mail_from, m.source, m.received_at,"
            "   SUM(m.size) OVER (ORDER BY j.id) - m.size AS ahead"
            "  FROM claimable c JOIN jobs j ON j.id = c.id JOIN messages m ON m.id = j.message"
            " ) w WHERE ahead < %s ORDER BY id",
            (limit, max_bytes),
        )
        return [PendingJob(r[0], r[1], r[2], bytes(r[3] or b""), r[4], r[5], r[6]) for r in rows]

    def finish_job(self, decision: JobDecision) -> bool:
        """Record the decision; False if the job was decided already or another decider holds
        it right now (claimed with SKIP LOCKED: this one never waits for it, and undoes its
        own savepoint; if the other rolls back, the job is still pending and comes again)."""
        return decision.job in self.finish_jobs([decision])

    def finish_jobs(self, decisions: Sequence[JobDecision]) -> set[int]:
        """One statement for the batch: the jobs still pending and free are claimed (SKIP
        LOCKED, as `finish_job`) and take their decisions."""
        if not decisions:
            return set()
        now = time.time()
        rows = self._rows(  # the batch as one JSON text: psycopg dumps arrays item by item
            "WITH d AS (SELECT * FROM json_to_recordset(%s::json) AS d(outcome text, reason text,"
            "  rule text, action text, incident_key text, summary text, severity text,"
            "  details text, trace text, decided_at float8, id bigint))"
            " UPDATE jobs SET state='done', outcome=d.outcome, reason=d.reason, rule=d.rule,"
            " action=d.action, incident_key=d.incident_key, summary=d.summary,"
            " severity=d.severity, details=d.details, trace=d.trace, decided_at=d.decided_at"
            " FROM d WHERE jobs.id = d.id AND jobs.id IN (SELECT id FROM jobs"
            "  WHERE id IN (SELECT id FROM d) AND state = 'pending' FOR UPDATE SKIP LOCKED)"
            " RETURNING jobs.id",
            (json_rows(_DECIDED, (d.stored(now) for d in decisions)),),
        )
        return {row[0] for row in rows}

    def incident(self, service: str, key: str) -> Incident | None:
        """Inside a transaction the key stays locked until the commit (even while the incident
        does not exist yet), so the mirror changes atomically with one decision at a time."""
        locking = self._held is not None  # a plain read (status page) waits for nobody
        read = f"SELECT {INCIDENT_COLUMNS} FROM incidents WHERE service=%s AND incident_key=%s"
        with self._connection() as conn:
            if not locking:
                row = conn.execute(read, (service, key)).fetchone()
            else:  # two statements: the read's snapshot follows the lock (pipelined, the
                # pair cost more CPU and time on loopback: 42 and 70 us against 29 and 54)
                conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext(%s), hashtext(%s))", (service, key)
                )
                row = conn.execute(read, (service, key)).fetchone()
        return Incident(*row) if row else None

    def lock_incidents(self, slots: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Incident]:
        """Every key's lock in the order of the locks themselves (two keys whose hashes
        collide share a lock, and still come in one order), then the read: its own statement,
        so its snapshot sees what the last holder of each lock committed."""
        pairs = sorted(set(slots))
        if not pairs:
            return {}
        self._exec(
            "SELECT count(pg_advisory_xact_lock(a, b)) FROM (SELECT DISTINCT hashtext(s) AS a,"
            "  hashtext(k) AS b FROM json_to_recordset(%s::json) AS w(s text, k text)"
            "  ORDER BY a, b) AS ordered",
            (json_rows(("s", "k"), pairs),),
        )
        return self.incidents_of(pairs)

    def incidents_of(self, slots: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Incident]:
        if not slots:
            return {}
        rows = self._rows(
            f"SELECT {INCIDENT_COLUMNS} FROM incidents WHERE (service, incident_key) IN"
            " (SELECT s, k FROM json_to_recordset(%s::json) AS w(s text, k text))",
            (json_rows(("s", "k"), slots),),
        )
        incidents = [Incident(*row) for row in rows]
        return {(incident.service, incident.incident_key): incident for incident in incidents}

    def save_incident(self, incident: Incident) -> None:
        self.save_incidents([incident])

    def save_incidents(self, incidents: Sequence[Incident]) -> None:
        """Write the mirror, the batch as one JSON text; the coalesced-repeat columns are
        kept, and reset when the incident opens again (a new episode)."""
        if incidents:
            rows = (tuple(getattr(i, f) for f in INCIDENT_FIELDS) for i in incidents)
            self._exec(_SAVE_INCIDENTS, (json_rows(INCIDENT_FIELDS, rows),))

    def note_coalesced(
        self, service: str, key: str, at: float, details: dict[str, Any], count: int = 1
    ) -> None:
        """Count absorbed repeat triggers on the (open) incident."""
        self._exec(
            "UPDATE incidents SET coalesced = coalesced + %s, coalesced_at = %s,"
            " latest_details = %s WHERE service = %s AND incident_key = %s",
            (count, at, json.dumps(details, ensure_ascii=False), service, key),
        )
