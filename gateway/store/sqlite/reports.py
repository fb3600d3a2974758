"""Queries for operations: listings, health and metrics (status page, /metrics, the CLI)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from gateway.store.filters import incident_filter, job_filter
from gateway.store.filters import where as sql_where
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
from gateway.store.sqlite.connection import Connection
from gateway.store.sqlite.imap import imap_gauges
from gateway.store.sqlite.rows import (
    INCIDENT_COLUMNS,
    JOB_RECORD_COLUMNS,
    OUTBOX_COLUMNS,
    outbox_item,
)

# Counter queries: label columns, then the value. {m} {j} {o} {w} restrict messages, jobs,
# outbox rows and webhook deliveries: "1" for the live totals, the purge selection for
# retention's offsets.
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
        " ELSE MAX(o.attempts - 1, 0) END) FROM outbox o WHERE {o} GROUP BY 1",
    ),
    ("webhooks_received", "SELECT COUNT(*) FROM pagerduty_events w WHERE {w}"),
    (
        "webhooks_decided",
        "SELECT w.outcome, COUNT(*) FROM pagerduty_events w WHERE w.state = 'done' AND {w}"
        " GROUP BY 1",
    ),
)


class ReportQueries(Connection):
    def heartbeat(self, name: str = "healthz") -> float:
        """Commit one tiny row: proves the database still takes writes (for /healthz)."""
        now = time.time()
        with self.transaction():
            self.conn.execute(
                "INSERT INTO heartbeat (name, at) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET at = excluded.at",
                (name, now),
            )
        return now

    def metric_totals(self) -> list[tuple[str, tuple[str, ...], float]]:
        """Counters: what the rows count now plus what retention purged before (monotonic)."""
        totals: dict[tuple[str, tuple[str, ...]], float] = {}
        for metric, sql in COUNTER_QUERIES:
            for row in self.conn.execute(sql.format(m="1", j="1", o="1", w="1")):
                key = (metric, tuple(str(v) for v in row[:-1]))
                totals[key] = totals.get(key, 0) + (row[-1] or 0)
        for metric, labels, value in self.conn.execute(
            "SELECT metric, labels, value FROM metric_offsets"
        ):
            key = (metric, tuple(json.loads(labels)))
            totals[key] = totals.get(key, 0) + value
        return [(metric, labels, value) for (metric, labels), value in sorted(totals.items())]

    def metric_gauges(self) -> list[tuple[str, tuple[str, ...], float]]:
        """Current levels: outbox depth/oldest/dead per kind, pending jobs, open incidents."""
        # Jobs before the outbox: a job decided after the first read has its outbox items
        # by the second, so "no job and no item pending" is never read while one is owed
        # (each statement reads its own snapshot, unless the caller holds `read_snapshot`,
        # as /metrics does).
        pending_jobs = self.conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'pending'")
        gauges: list[tuple[str, tuple[str, ...], float]] = [
            ("jobs_pending", (), pending_jobs.fetchone()[0])
        ]
        for kind, pending, oldest, dead in self.conn.execute(
            "SELECT kind, SUM(state = 'pending'), MIN(CASE WHEN state = 'pending'"
            " THEN created_at END), SUM(state = 'dead') FROM outbox GROUP BY kind"
        ):
            gauges += [("outbox_depth", (kind,), pending), ("outbox_dead", (kind,), dead)]
            if oldest is not None:
                gauges.append(("outbox_oldest_created", (kind,), oldest))
        for service, count in self.conn.execute(
            "SELECT service, COUNT(*) FROM incidents WHERE state IN ('triggered','acknowledged')"
            " GROUP BY service"
        ):
            gauges.append(("incidents_open", (service,), count))
        return gauges + imap_gauges(self.conn)

    def decided_latencies(self, after_job: int, limit: int = 5000) -> list[tuple[int, float]]:
        """(job id, seconds from acceptance to decision) of jobs decided after `after_job`."""
        return self.conn.execute(
            "SELECT j.id, j.decided_at - m.received_at FROM jobs j JOIN messages m"
            " ON m.id = j.message WHERE j.id > ? AND j.state = 'done' ORDER BY j.id LIMIT ?",
            (after_job, limit),
        ).fetchall()

    def last_decided_job(self) -> int:
        row = self.conn.execute("SELECT MAX(id) FROM jobs WHERE state = 'done'").fetchone()
        return row[0] or 0

    def recent_jobs(
        self,
        limit: int = 50,
        head_bytes: int = 16384,
        *,
        outcomes: Sequence[str] | None = None,
        service: str | None = None,
    ) -> list[tuple[JobRecord, bytes]]:
        """Newest jobs with the first bytes of their mail (enough for the Subject header),
        optionally only those with one of `outcomes` ('pending': undecided) or of `service`."""
        where, args = job_filter(outcomes, service, "?")
        rows = self.conn.execute(
            f"SELECT {JOB_RECORD_COLUMNS}, substr(m.raw, 1, ?)"
            f" FROM jobs j JOIN messages m ON m.id = j.message {sql_where(where)}"
            " ORDER BY j.id DESC LIMIT ?",
            (head_bytes, *args, limit),
        ).fetchall()
        return [(JobRecord(*r[:12]), bytes(r[12] or b"")) for r in rows]

    def jobs(self, *, outcomes: Sequence[str] | None = None, limit: int = 100) -> list[JobRecord]:
        where, args = "", []
        if outcomes:
            where = f"WHERE j.outcome IN ({','.join('?' * len(outcomes))})"
            args = list(outcomes)
        rows = self.conn.execute(
            f"SELECT {JOB_RECORD_COLUMNS}"
            f" FROM jobs j JOIN messages m ON m.id = j.message {where} ORDER BY j.id DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
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
        where, args = job_filter(outcomes, service, "?")
        if before_job is not None:
            where, args = [*where, "j.id < ?"], [*args, before_job]
        rows = self.conn.execute(
            f"SELECT {JOB_RECORD_COLUMNS}, m.mail_from, substr(m.raw, 1, ?)"
            f" FROM jobs j JOIN messages m ON m.id = j.message {sql_where(where)}"
            " ORDER BY j.id DESC LIMIT ?",
            (head_bytes, *args, limit),
        ).fetchall()
        return [ListedJob(JobRecord(*r[:12]), r[12], bytes(r[13] or b"")) for r in rows]

    def count_jobs(
        self, *, outcomes: Sequence[str] | None = None, service: str | None = None
    ) -> int:
        where, args = job_filter(outcomes, service, "?")
        return self.conn.execute(
            f"SELECT COUNT(*) FROM jobs j {sql_where(where)}", args
        ).fetchone()[0]

    def known_services(self) -> list[str]:
        rows = self.conn.execute(
            "SELECT DISTINCT service FROM jobs UNION SELECT service FROM incidents ORDER BY 1"
        )
        return [service for (service,) in rows]

    def job_detail(self, job: int) -> dict[str, Any] | None:
        rows = list(self.db.query("SELECT * FROM jobs WHERE id = ?", [job]))
        if not rows:
            return None
        detail = rows[0]
        detail["details"] = json.loads(detail["details"] or "{}")
        detail["trace"] = json.loads(detail["trace"] or "[]")
        return detail

    def raw_message(self, message: int) -> bytes | None:
        row = self.conn.execute("SELECT raw FROM messages WHERE id = ?", (message,)).fetchone()
        return row[0] if row else None

    def incidents(
        self, *, open_only: bool = False, limit: int = 1000, service: str | None = None
    ) -> list[Incident]:
        where, args = incident_filter(open_only, service, "?")
        rows = self.conn.execute(
            f"SELECT {INCIDENT_COLUMNS} FROM incidents {sql_where(where)}"
            " ORDER BY last_seen DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [Incident(*r) for r in rows]

    def count_incidents(self, *, open_only: bool = False, service: str | None = None) -> int:
        where, args = incident_filter(open_only, service, "?")
        return self.conn.execute(
            f"SELECT COUNT(*) FROM incidents {sql_where(where)}", args
        ).fetchone()[0]

    def replay_candidates(self, since: float, limit: int = 100_000) -> list[dict[str, Any]]:
        """Decided jobs of mail received since `since` whose raw bytes are still stored."""
        return list(
            self.db.query(
                "SELECT j.id AS job, j.message, j.service, j.outcome, j.rule, j.action,"
                " j.incident_key, m.raw, m.mail_from, m.received_at FROM jobs j"
                " JOIN messages m ON m.id = j.message WHERE m.received_at >= ?"
                " AND j.state = 'done' AND m.raw IS NOT NULL ORDER BY j.id LIMIT ?",
                [since, limit],
            )
        )

    # -- health and the status page --------------------------------------------------------

    def oldest_pending_job(self) -> float | None:
        """When the oldest mail still waiting for its decision was accepted."""
        row = self.conn.execute(
            "SELECT m.received_at FROM jobs j JOIN messages m ON m.id = j.message"
            " WHERE j.state = 'pending' ORDER BY j.id LIMIT 1"
        ).fetchone()
        return row[0] if row else None

    def dead_letter_stats(self) -> tuple[int, float | None]:
        """(dead letters, when the newest of them died)."""
        row = self.conn.execute(
            "SELECT COUNT(*), MAX(updated_at) FROM outbox WHERE state = 'dead'"
        ).fetchone()
        return row[0], row[1]

    def mail_minutes(self, since: float) -> list[MinuteCount]:
        """Mails received since `since` per minute and outcome; ranges over the window only
        (messages by their time index, their jobs by `jobs(message)`)."""
        rows = self.conn.execute(
            "SELECT CAST(m.received_at / 60 AS INTEGER) * 60, COALESCE(j.outcome, 'pending'),"
            " COUNT(*) FROM messages m CROSS JOIN jobs j ON j.message = m.id"
            " WHERE m.received_at >= ? GROUP BY 1, 2"
            " UNION ALL SELECT CAST(received_at / 60 AS INTEGER) * 60, ?, COUNT(*) FROM messages"
            " WHERE received_at >= ? AND duplicate_of IS NOT NULL GROUP BY 1 ORDER BY 1, 2",
            (since, REDELIVERED, since),
        ).fetchall()
        return [MinuteCount(float(minute), outcome, count) for minute, outcome, count in rows]

    def delivery_minutes(self, since: float) -> list[MinuteLatency]:
        """Per minute of receipt since `since`: how many PagerDuty events were delivered and
        the p50/p99 (nearest rank) of end of DATA -> 2xx recorded, computed in SQL."""
        rows = self.conn.execute(
            "WITH l AS (SELECT CAST(m.received_at / 60 AS INTEGER) * 60 AS minute,"
            "   o.updated_at - m.received_at AS s FROM messages m"  # CROSS JOIN: this order
            "   CROSS JOIN jobs j ON j.message = m.id CROSS JOIN outbox o ON o.job = j.id"
            "   WHERE m.received_at >= ? AND o.kind = 'pagerduty' AND o.state = 'done'),"
            " r AS (SELECT minute, s, ROW_NUMBER() OVER (PARTITION BY minute ORDER BY s) AS rn,"
            "   COUNT(*) OVER (PARTITION BY minute) AS n FROM l)"
            " SELECT minute, n, MAX(CASE WHEN rn = (n * 50 + 99) / 100 THEN s END),"
            " MAX(CASE WHEN rn = (n * 99 + 99) / 100 THEN s END) FROM r GROUP BY minute, n"
            " ORDER BY minute",
            (since,),
        ).fetchall()
        return [MinuteLatency(float(m), n, max(0.0, p50), max(0.0, p99)) for m, n, p50, p99 in rows]

    def message(self, message: int) -> MessageRecord | None:
        row = self.conn.execute(
            "SELECT id, received_at, source, peer, mail_from, rcpt_tos, message_id, size,"
            " duplicate_of, node FROM messages WHERE id = ?",
            (message,),
        ).fetchone()
        if row is None:
            return None
        jobs = self.conn.execute("SELECT id FROM jobs WHERE message = ? ORDER BY id", (message,))
        rcpt = tuple(json.loads(row[5] or "[]"))
        return MessageRecord(*row[:5], rcpt, *row[6:9], jobs=tuple(j for (j,) in jobs), node=row[9])

    def incident_jobs(
        self, service: str, key: str, limit: int = 200, head_bytes: int = 16384
    ) -> list[JobHistory]:
        """The newest jobs decided for the incident key (a scan of the jobs: on demand)."""
        rows = self.conn.execute(
            f"SELECT {JOB_RECORD_COLUMNS}, j.decided_at, substr(m.raw, 1, ?)"
            " FROM jobs j JOIN messages m ON m.id = j.message"
            " WHERE j.service = ? AND j.incident_key = ? ORDER BY j.id DESC LIMIT ?",
            (head_bytes, service, key, limit),
        ).fetchall()
        return [JobHistory(JobRecord(*r[:12]), r[12], bytes(r[13] or b"")) for r in rows]

    def outbox_of_keys(
        self, order_keys: Sequence[str], since: float = 0.0, limit: int = 200
    ) -> list[OutboxItem]:
        """The newest items of these order keys created at or after `since`, in any state."""
        if not order_keys:
            return []
        marks = ",".join("?" * len(order_keys))
        rows = self.conn.execute(  # state IN (...) lets the (state, order_key) index serve this
            f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE state IN ('pending', 'dead', 'done')"
            f" AND order_key IN ({marks}) AND created_at >= ? ORDER BY id DESC LIMIT ?",
            (*order_keys, since, limit),
        ).fetchall()
        return [outbox_item(r) for r in rows]

    def outbox_of_job(self, job: int) -> list[OutboxItem]:
        """What one decision queued (PagerDuty events, helpdesk mail), oldest first."""
        rows = self.conn.execute(
            f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE job = ? ORDER BY id", (job,)
        ).fetchall()
        return [outbox_item(r) for r in rows]

    def outbox_entry(self, item: int) -> OutboxEntry | None:
        columns = ", ".join(f"o.{c.strip()}" for c in OUTBOX_COLUMNS.split(","))
        row = self.conn.execute(
            f"SELECT {columns}, o.job, j.message FROM outbox o"
            " LEFT JOIN jobs j ON j.id = o.job WHERE o.id = ?",
            (item,),
        ).fetchone()
        return OutboxEntry(outbox_item(row[:-2]), row[-2], row[-1]) if row else None

    def outbox_attempts(self, items: Sequence[int]) -> list[OutboxAttempt]:
        """Every recorded attempt (and re-queue) of these items, in the order they happened."""
        if not items:
            return []
        marks = ",".join("?" * len(items))
        rows = self.conn.execute(
            "SELECT item, at, attempt, state, error, response FROM outbox_attempts"
            f" WHERE item IN ({marks}) ORDER BY id",
            tuple(items),
        ).fetchall()
        return [OutboxAttempt(*r) for r in rows]
