"""Queries for operations: listings, health and metrics (status page, /metrics, the CLI)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from gateway.store.records import Incident, JobRecord, ListedJob
from gateway.store.sqlite.connection import Connection
from gateway.store.sqlite.imap import imap_gauges
from gateway.store.sqlite.rows import INCIDENT_COLUMNS, JOB_RECORD_COLUMNS

# Counter queries: label columns, then the value. {m} {j} {o} restrict messages, jobs and
# outbox rows: "1" for the live totals, the purge selection for retention's offsets.
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
            for row in self.conn.execute(sql.format(m="1", j="1", o="1")):
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
        gauges: list[tuple[str, tuple[str, ...], float]] = []
        for kind, pending, oldest, dead in self.conn.execute(
            "SELECT kind, SUM(state = 'pending'), MIN(CASE WHEN state = 'pending'"
            " THEN created_at END), SUM(state = 'dead') FROM outbox GROUP BY kind"
        ):
            gauges += [("outbox_depth", (kind,), pending), ("outbox_dead", (kind,), dead)]
            if oldest is not None:
                gauges.append(("outbox_oldest_created", (kind,), oldest))
        pending_jobs = self.conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'pending'")
        gauges.append(("jobs_pending", (), pending_jobs.fetchone()[0]))
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
        self, limit: int = 50, head_bytes: int = 16384
    ) -> list[tuple[JobRecord, bytes]]:
        """Newest jobs with the first bytes of their mail (enough for the Subject header)."""
        rows = self.conn.execute(
            f"SELECT {JOB_RECORD_COLUMNS}, substr(m.raw, 1, ?)"
            " FROM jobs j JOIN messages m ON m.id = j.message ORDER BY j.id DESC LIMIT ?",
            (head_bytes, limit),
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
        where, args = _job_filter(outcomes, service)
        if before_job is not None:
            where, args = [*where, "j.id < ?"], [*args, before_job]
        rows = self.conn.execute(
            f"SELECT {JOB_RECORD_COLUMNS}, m.mail_from, substr(m.raw, 1, ?)"
            f" FROM jobs j JOIN messages m ON m.id = j.message {_where(where)}"
            " ORDER BY j.id DESC LIMIT ?",
            (head_bytes, *args, limit),
        ).fetchall()
        return [ListedJob(JobRecord(*r[:12]), r[12], bytes(r[13] or b"")) for r in rows]

    def count_jobs(
        self, *, outcomes: Sequence[str] | None = None, service: str | None = None
    ) -> int:
        where, args = _job_filter(outcomes, service)
        return self.conn.execute(f"SELECT COUNT(*) FROM jobs j {_where(where)}", args).fetchone()[0]

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
        where, args = _incident_filter(open_only, service)
        rows = self.conn.execute(
            f"SELECT {INCIDENT_COLUMNS} FROM incidents {_where(where)}"
            " ORDER BY last_seen DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [Incident(*r) for r in rows]

    def count_incidents(self, *, open_only: bool = False, service: str | None = None) -> int:
        where, args = _incident_filter(open_only, service)
        return self.conn.execute(
            f"SELECT COUNT(*) FROM incidents {_where(where)}", args
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


def _job_filter(outcomes: Sequence[str] | None, service: str | None) -> tuple[list[str], list[Any]]:
    """WHERE conditions (and their arguments) on jobs `j`; 'pending' means not decided yet."""
    where: list[str] = []
    args: list[Any] = []
    if outcomes:
        decided = [o for o in outcomes if o != "pending"]
        either = [f"j.outcome IN ({','.join('?' * len(decided))})"] if decided else []
        if "pending" in outcomes:
            either.append("j.state = 'pending'")
        where.append(f"({' OR '.join(either)})")
        args += decided
    if service is not None:
        where.append("j.service = ?")
        args.append(service)
    return where, args


def _incident_filter(open_only: bool, service: str | None) -> tuple[list[str], list[Any]]:
    where: list[str] = ["state IN ('triggered','acknowledged')"] if open_only else []
    if service is None:
        return where, []
    return [*where, "service = ?"], [service]


def _where(conditions: Sequence[str]) -> str:
    return f"WHERE {' AND '.join(conditions)}" if conditions else ""
