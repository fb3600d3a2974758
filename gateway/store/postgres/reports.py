"""Listings, health and metrics on PostgreSQL (see `gateway.store.sqlite.reports`)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from gateway.store.filters import incident_filter, job_filter
from gateway.store.filters import where as sql_where
from gateway.store.postgres.imap import ImapQueries
from gateway.store.postgres.rows import (
    INCIDENT_COLUMNS,
    JOB_RECORD_COLUMNS,
    OUTBOX_COLUMNS,
    outbox_item,
)
from gateway.store.records import (
    REDELIVERED,
    Incident,
    JobHistory,
    JobRecord,
    ListedJob,
    MessageRecord,
    MinuteCount,
    MinuteLatency,
    OutboxAttempt,
    OutboxEntry,
    OutboxItem,
)

# As SQLite's COUNTER_QUERIES; {m} {j} {o} {w}: "TRUE" for live totals, retention's selection.
COUNTER_QUERIES = (
    ("accepted", "SELECT COUNT(*) FROM messages m WHERE {m}"),
    ("duplicates", "SELECT COUNT(*) FROM messages m WHERE m.duplicate_of IS NOT NULL AND {m}"),
    (
        "decisions",
        "SELECT j.service, j.outcome, COUNT(*) FROM jobs j WHERE j.state = 'done' AND {j}"
        " GROUP BY 1, 2",
    ),
    (
        "rule_matches",
        "SELECT j.service, j.rule, COUNT(*) FROM jobs j WHERE j.state = 'done'"
        " AND j.rule IS NOT NULL AND j.outcome <> 'quarantined' AND {j} GROUP BY 1, 2",
    ),
    (
        "outbox_done",
        "SELECT o.kind, COUNT(*) FROM outbox o WHERE o.state = 'done' AND {o} GROUP BY 1",
    ),
    (
        "outbox_retries",
        "SELECT o.kind, SUM(CASE WHEN o.state = 'pending' THEN o.attempts"
        " ELSE GREATEST(o.attempts - 1, 0) END)::bigint FROM outbox o WHERE {o} GROUP BY 1",
    ),
    ("webhooks_received", "SELECT COUNT(*) FROM pagerduty_events w WHERE {w}"),
    (
        "webhooks_decided",
        "SELECT w.outcome, COUNT(*) FROM pagerduty_events w WHERE w.state = 'done' AND {w}"
        " GROUP BY 1",
    ),
)
Row = tuple[str, tuple[str, ...], float]


class ReportQueries(ImapQueries):
    def heartbeat(self, name: str = "healthz") -> float:
        now = time.time()
        self._exec(
            "INSERT INTO heartbeat (name, at) VALUES (%s, %s)"
            " ON CONFLICT (name) DO UPDATE SET at = excluded.at",
            (name, now),
        )
        return now

    def metric_totals(self) -> list[Row]:
        totals: dict[tuple[str, tuple[str, ...]], float] = {}
        with self.transaction():
            for metric, sql in COUNTER_QUERIES:
                for row in self._rows(sql.format(m="TRUE", j="TRUE", o="TRUE", w="TRUE")):
                    key = (metric, tuple(str(v) for v in row[:-1]))
                    totals[key] = totals.get(key, 0) + (row[-1] or 0)
            for metric, labels, value in self._rows(
                "SELECT metric, labels, value FROM metric_offsets"
            ):
                key = (metric, tuple(json.loads(labels)))
                totals[key] = totals.get(key, 0) + value
        return [(metric, labels, value) for (metric, labels), value in sorted(totals.items())]

    def metric_gauges(self) -> list[Row]:
        with self.transaction():
            # jobs first: see the SQLite backend (READ COMMITTED reads a snapshot per statement)
            pending_jobs = self._row("SELECT COUNT(*) FROM jobs WHERE state = 'pending'")
            assert pending_jobs is not None
            gauges: list[Row] = [("jobs_pending", (), pending_jobs[0])]
            for kind, pending, oldest, dead in self._rows(
                "SELECT kind, COUNT(*) FILTER (WHERE state = 'pending'),"
                " MIN(created_at) FILTER (WHERE state = 'pending'),"
                " COUNT(*) FILTER (WHERE state = 'dead') FROM outbox GROUP BY kind"
            ):
                gauges += [("outbox_depth", (kind,), pending), ("outbox_dead", (kind,), dead)]
                if oldest is not None:
                    gauges.append(("outbox_oldest_created", (kind,), oldest))
            for service, count in self._rows(
                "SELECT service, COUNT(*) FROM incidents"
                " WHERE state IN ('triggered','acknowledged') GROUP BY service"
            ):
                gauges.append(("incidents_open", (service,), count))
            return gauges + self._imap_gauges()

    def decided_latencies(self, after_job: int, limit: int = 5000) -> list[tuple[int, float]]:
        rows = self._rows(
            "SELECT j.id, j.decided_at - m.received_at FROM jobs j JOIN messages m"
            " ON m.id = j.message WHERE j.id > %s AND j.state = 'done' ORDER BY j.id LIMIT %s",
            (after_job, limit),
        )
        return [(r[0], r[1]) for r in rows]

    def last_decided_job(self) -> int:
        row = self._row("SELECT MAX(id) FROM jobs WHERE state = 'done'")
        return int(row[0] or 0) if row else 0

    def recent_jobs(
        self,
        limit: int = 50,
        head_bytes: int = 16384,
        *,
        outcomes: Sequence[str] | None = None,
        service: str | None = None,
    ) -> list[tuple[JobRecord, bytes]]:
        where, args = job_filter(outcomes, service, "%s")
        rows = self._rows(
            f"SELECT {JOB_RECORD_COLUMNS}, substr(m.raw, 1, %s)"
            f" FROM jobs j JOIN messages m ON m.id = j.message {sql_where(where)}"
            " ORDER BY j.id DESC LIMIT %s",
            (head_bytes, *args, limit),
        )
        return [(JobRecord(*r[:12]), bytes(r[12] or b"")) for r in rows]

    def jobs(self, *, outcomes: Sequence[str] | None = None, limit: int = 100) -> list[JobRecord]:
        where, args = ("WHERE j.outcome = ANY(%s)", [list(outcomes)]) if outcomes else ("", [])
        rows = self._rows(
            f"SELECT {JOB_RECORD_COLUMNS} FROM jobs j JOIN messages m ON m.id = j.message"
            f" {where} ORDER BY j.id DESC LIMIT %s",
            (*args, limit),
        )
        return [JobRecord(*r) for r in rows]

    def list_jobs(
        self,
        *,
        outcomes: Sequence[str] | None = None,
        service: str | None = None,
        before_job: int | None = None,
        limit: int = 100,
        head_bytes: int = 16384,
    ) -> list[ListedJob]:
        where, args = job_filter(outcomes, service, "%s")
        if before_job is not None:
            where, args = [*where, "j.id < %s"], [*args, before_job]
        rows = self._rows(
            f"SELECT {JOB_RECORD_COLUMNS}, m.mail_from, substr(m.raw, 1, %s)"
            f" FROM jobs j JOIN messages m ON m.id = j.message {sql_where(where)}"
            " ORDER BY j.id DESC LIMIT %s",
            (head_bytes, *args, limit),
        )
        return [ListedJob(JobRecord(*r[:12]), r[12], bytes(r[13] or b"")) for r in rows]

    def count_jobs(
        self, *, outcomes: Sequence[str] | None = None, service: str | None = None
    ) -> int:
        where, args = job_filter(outcomes, service, "%s")
        row = self._row(f"SELECT COUNT(*) FROM jobs j {sql_where(where)}", args)
        return int(row[0]) if row else 0

    def known_services(self) -> list[str]:
        rows = self._rows("SELECT service FROM jobs UNION SELECT service FROM incidents ORDER BY 1")
        return [service for (service,) in rows]

    def job_detail(self, job: int) -> dict[str, Any] | None:
        rows = self._dicts("SELECT * FROM jobs WHERE id = %s", [job])
        if not rows:
            return None
        detail = rows[0]
        detail["details"] = json.loads(detail["details"] or "{}")
        detail["trace"] = json.loads(detail["trace"] or "[]")
        return detail

    def raw_message(self, message: int) -> bytes | None:
        row = self._row("SELECT raw FROM messages WHERE id = %s", (message,))
        return bytes(row[0]) if row and row[0] is not None else None

    def incidents(
        self, *, open_only: bool = False, limit: int = 1000, service: str | None = None
    ) -> list[Incident]:
        where, args = incident_filter(open_only, service, "%s")
        rows = self._rows(
            f"SELECT {INCIDENT_COLUMNS} FROM incidents {sql_where(where)}"
            " ORDER BY last_seen DESC LIMIT %s",
            (*args, limit),
        )
        return [Incident(*r) for r in rows]

    def count_incidents(self, *, open_only: bool = False, service: str | None = None) -> int:
        where, args = incident_filter(open_only, service, "%s")
        row = self._row(f"SELECT COUNT(*) FROM incidents {sql_where(where)}", args)
        return int(row[0]) if row else 0

    def replay_candidates(self, since: float, limit: int = 100_000) -> list[dict[str, Any]]:
        rows = self._dicts(
            "SELECT j.id AS job, j.message, j.service, j.outcome, j.rule, j.action,"
            " j.incident_key, m.raw, m.mail_from, m.received_at FROM jobs j"
            " JOIN messages m ON m.id = j.message WHERE m.received_at >= %s"
            " AND j.state = 'done' AND m.raw IS NOT NULL ORDER BY j.id LIMIT %s",
            [since, limit],
        )
        for row in rows:
            row["raw"] = bytes(row["raw"])
        return rows

    # -- health and the status page --------------------------------------------------------

    def oldest_pending_job(self) -> float | None:
        row = self._row(
            "SELECT m.received_at FROM jobs j JOIN messages m ON m.id = j.message"
            " WHERE j.state = 'pending' ORDER BY j.id LIMIT 1"
        )
        return row[0] if row else None

    def dead_letter_stats(self) -> tuple[int, float | None]:
        row = self._row("SELECT COUNT(*), MAX(updated_at) FROM outbox WHERE state = 'dead'")
        assert row is not None
        return int(row[0]), row[1]

    def mail_minutes(self, since: float) -> list[MinuteCount]:
        rows = self._rows(
            "SELECT floor(m.received_at / 60) * 60, COALESCE(j.outcome, 'pending'),"
            " COUNT(*) FROM messages m JOIN jobs j ON j.message = m.id"
            " WHERE m.received_at >= %s GROUP BY 1, 2"
            " UNION ALL SELECT floor(received_at / 60) * 60, %s, COUNT(*) FROM messages"
            " WHERE received_at >= %s AND duplicate_of IS NOT NULL GROUP BY 1 ORDER BY 1, 2",
            (since, REDELIVERED, since),
        )
        return [MinuteCount(float(minute), outcome, count) for minute, outcome, count in rows]

    def delivery_minutes(self, since: float) -> list[MinuteLatency]:
        rows = self._rows(
            "WITH l AS (SELECT floor(m.received_at / 60) * 60 AS minute,"
            "   o.updated_at - m.received_at AS s FROM messages m"
            "   JOIN jobs j ON j.message = m.id JOIN outbox o ON o.job = j.id"
            "   WHERE m.received_at >= %s AND o.kind = 'pagerduty' AND o.state = 'done'),"
            " r AS (SELECT minute, s, ROW_NUMBER() OVER (PARTITION BY minute ORDER BY s) AS rn,"
            "   COUNT(*) OVER (PARTITION BY minute) AS n FROM l)"
            " SELECT minute, n, MAX(CASE WHEN rn = (n * 50 + 99) / 100 THEN s END),"
            " MAX(CASE WHEN rn = (n * 99 + 99) / 100 THEN s END) FROM r GROUP BY minute, n"
            " ORDER BY minute",
            (since,),
        )
        return [MinuteLatency(float(m), n, max(0.0, p50), max(0.0, p99)) for m, n, p50, p99 in rows]

    def message(self, message: int) -> MessageRecord | None:
        with self.transaction():
            row = self._row(
                "SELECT id, received_at, source, peer, mail_from, rcpt_tos, message_id, size,"
                " duplicate_of, node FROM messages WHERE id = %s",
                (message,),
            )
            if row is None:
                return None
            jobs = self._rows("SELECT id FROM jobs WHERE message = %s ORDER BY id", (message,))
        rcpt = tuple(json.loads(row[5] or "[]"))
        return MessageRecord(*row[:5], rcpt, *row[6:9], jobs=tuple(j for (j,) in jobs), node=row[9])

    def incident_jobs(
        self, service: str, key: str, limit: int = 200, head_bytes: int = 16384
    ) -> list[JobHistory]:
        rows = self._rows(
            f"SELECT {JOB_RECORD_COLUMNS}, j.decided_at, substr(m.raw, 1, %s)"
            " FROM jobs j JOIN messages m ON m.id = j.message"
            " WHERE j.service = %s AND j.incident_key = %s ORDER BY j.id DESC LIMIT %s",
            (head_bytes, service, key, limit),
        )
        return [JobHistory(JobRecord(*r[:12]), r[12], bytes(r[13] or b"")) for r in rows]

    def outbox_of_keys(
        self, order_keys: Sequence[str], since: float = 0.0, limit: int = 200
    ) -> list[OutboxItem]:
        if not order_keys:
            return []
        rows = self._rows(
            f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE order_key = ANY(%s) AND created_at >= %s"
            " ORDER BY id DESC LIMIT %s",
            (list(order_keys), since, limit),
        )
        return [outbox_item(r) for r in rows]

    def outbox_of_job(self, job: int) -> list[OutboxItem]:
        rows = self._rows(f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE job = %s ORDER BY id", (job,))
        return [outbox_item(r) for r in rows]

    def outbox_entry(self, item: int) -> OutboxEntry | None:
        columns = ", ".join(f"o.{c.strip()}" for c in OUTBOX_COLUMNS.split(","))
        row = self._row(
            f"SELECT {columns}, o.job, j.message FROM outbox o"
            " LEFT JOIN jobs j ON j.id = o.job WHERE o.id = %s",
            (item,),
        )
        return OutboxEntry(outbox_item(row[:-2]), row[-2], row[-1]) if row else None

    def outbox_attempts(self, items: Sequence[int]) -> list[OutboxAttempt]:
        if not items:
            return []
        rows = self._rows(
            "SELECT item, at, attempt, state, error, response FROM outbox_attempts"
            " WHERE item = ANY(%s) ORDER BY id",
            (list(items),),
        )
        return [OutboxAttempt(*r) for r in rows]
