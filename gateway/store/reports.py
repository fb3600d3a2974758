"""Queries for operations: health, metrics, retention and replay (a part of `Store`)."""

from __future__ import annotations

import json
import time
from typing import Any

from gateway.store.records import JobRecord


class ReportQueries:
    """Mixed into `Store`; uses its `conn`, `db` and `transaction()`."""

    # Counter queries: label columns, then the value. {m} {j} {o} restrict messages, jobs and
    # outbox rows: "1" for the live totals, the purge selection for retention's offsets.
    _COUNTER_QUERIES = (
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
    # Old mail that nothing still needs (args: cutoff, cutoff, limit).
    _PURGEABLE_MESSAGES = (
        "SELECT m.id FROM messages m WHERE m.received_at < ? AND m.duplicate_of IS NULL"
        " AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.message = m.id AND j.state <> 'done')"
        " AND NOT EXISTS (SELECT 1 FROM incidents i WHERE i.last_message = m.id"
        "   AND i.state IN ('triggered', 'acknowledged'))"
        " AND NOT EXISTS (SELECT 1 FROM jobs j JOIN outbox o ON o.job = j.id"
        "   WHERE j.message = m.id AND o.state <> 'done')"
        " AND NOT EXISTS (SELECT 1 FROM messages d WHERE d.duplicate_of = m.id"
        "   AND d.received_at >= ?)"
        " ORDER BY m.id LIMIT ?"
    )
    _PURGEABLE_INCIDENTS = (
        "SELECT rowid FROM incidents WHERE state NOT IN ('triggered', 'acknowledged')"
        " AND last_seen < ? LIMIT ?"
    )

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
        for metric, sql in self._COUNTER_QUERIES:
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
        return gauges

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
            "SELECT j.id, j.message, j.service, j.state, j.outcome, j.rule, j.action,"
            " j.incident_key, j.summary, j.reason, m.received_at, m.source, substr(m.raw, 1, ?)"
            " FROM jobs j JOIN messages m ON m.id = j.message ORDER BY j.id DESC LIMIT ?",
            (head_bytes, limit),
        ).fetchall()
        return [(JobRecord(*r[:12]), bytes(r[12] or b"")) for r in rows]

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

    def purge_plan(self, cutoff: float) -> dict[str, int]:
        """What `purge(cutoff)` would delete, changing nothing (for `gateway purge --dry-run`)."""
        self._select_purge(cutoff, -1)
        try:
            return self._purge_counts(cutoff, -1)
        finally:
            self.conn.execute("DELETE FROM temp.purge_messages")
            self.conn.execute("DELETE FROM temp.purge_outbox")

    def purge(self, cutoff: float, batch: int = 1000) -> dict[str, int]:
        """Delete one batch of rows older than `cutoff`; call until it returns all zeros.

        Kept whatever its age: mail with a pending job, the last message of an open incident,
        mail whose PagerDuty/mail item is still pending or dead, pending and dead outbox items,
        open incidents. Counters lost with the rows are added to `metric_offsets` first.
        """
        with self.transaction():
            self._select_purge(cutoff, batch)
            counts = self._purge_counts(cutoff, batch)
            self._save_metric_offsets()
            self._delete_purged(cutoff, batch)
        return counts

    def _select_purge(self, cutoff: float, limit: int) -> None:
        for table in ("purge_messages", "purge_outbox"):
            self.conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {table} (id INTEGER PRIMARY KEY)")
            self.conn.execute(f"DELETE FROM temp.{table}")
        self.conn.execute(
            f"INSERT INTO temp.purge_messages {self._PURGEABLE_MESSAGES}", (cutoff, cutoff, limit)
        )
        self.conn.execute(  # duplicates go with their original (all older than the cutoff)
            "INSERT OR IGNORE INTO temp.purge_messages SELECT id FROM messages"
            " WHERE duplicate_of IN (SELECT id FROM temp.purge_messages)"
        )
        self.conn.execute(
            "INSERT INTO temp.purge_outbox SELECT id FROM outbox WHERE state = 'done'"
            " AND updated_at < ? ORDER BY id LIMIT ?",
            (cutoff, limit),
        )

    def _purge_counts(self, cutoff: float, limit: int) -> dict[str, int]:
        def count(sql: str, *args: Any) -> int:
            return self.conn.execute(sql, args).fetchone()[0]

        return {
            "messages": count("SELECT COUNT(*) FROM temp.purge_messages"),
            "jobs": count(
                "SELECT COUNT(*) FROM jobs WHERE message IN (SELECT id FROM temp.purge_messages)"
            ),
            "outbox": count("SELECT COUNT(*) FROM temp.purge_outbox"),
            "events": count(
                "SELECT COUNT(*) FROM (SELECT 1 FROM events WHERE at < ? LIMIT ?)", cutoff, limit
            ),
            "incidents": count(
                f"SELECT COUNT(*) FROM ({self._PURGEABLE_INCIDENTS})", cutoff, limit
            ),
        }

    def _save_metric_offsets(self) -> None:
        m = "m.id IN (SELECT id FROM temp.purge_messages)"
        j = "j.message IN (SELECT id FROM temp.purge_messages)"
        o = "o.id IN (SELECT id FROM temp.purge_outbox)"
        for metric, sql in self._COUNTER_QUERIES:
            for row in self.conn.execute(sql.format(m=m, j=j, o=o)).fetchall():
                if not row[-1]:
                    continue
                self.conn.execute(
                    "INSERT INTO metric_offsets (metric, labels, value) VALUES (?, ?, ?)"
                    " ON CONFLICT (metric, labels) DO UPDATE SET value = value + excluded.value",
                    (metric, json.dumps([str(v) for v in row[:-1]]), row[-1]),
                )

    def _delete_purged(self, cutoff: float, limit: int) -> None:
        selected = "(SELECT id FROM temp.purge_messages)"
        self.conn.execute(f"DELETE FROM jobs WHERE message IN {selected}")
        self.conn.execute(f"DELETE FROM messages WHERE id IN {selected}")
        self.conn.execute("DELETE FROM outbox WHERE id IN (SELECT id FROM temp.purge_outbox)")
        self.conn.execute(
            "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE at < ? LIMIT ?)",
            (cutoff, limit),
        )
        self.conn.execute(
            f"DELETE FROM incidents WHERE rowid IN ({self._PURGEABLE_INCIDENTS})",
            (cutoff, limit),
        )
