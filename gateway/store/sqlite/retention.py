"""Retention: delete old rows in batches, keeping what is still needed and the counters' sums."""

from __future__ import annotations

import json
from typing import Any

from gateway.store.sqlite.connection import Connection
from gateway.store.sqlite.reports import COUNTER_QUERIES

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

# Webhook deliveries already decided (counted with the event log's "events"; their counters
# move to metric_offsets); pending ones stay.
_PURGEABLE_WEBHOOKS = (
    "SELECT id FROM pagerduty_events WHERE state = 'done' AND received_at < ? ORDER BY id LIMIT ?"
)


class RetentionQueries(Connection):
    def purge_plan(self, cutoff: float) -> dict[str, int]:
        """What `purge(cutoff)` would delete, changing nothing (for `gateway purge --dry-run`)."""
        self._select_purge(cutoff, -1)
        try:
            return self._purge_counts(cutoff, -1)
        finally:
            self.conn.execute("DELETE FROM temp.purge_messages")
            self.conn.execute("DELETE FROM temp.purge_outbox")
            self.conn.execute("DELETE FROM temp.purge_webhooks")

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
        for table in ("purge_messages", "purge_outbox", "purge_webhooks"):
            self.conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {table} (id INTEGER PRIMARY KEY)")
            self.conn.execute(f"DELETE FROM temp.{table}")
        self.conn.execute(
            f"INSERT INTO temp.purge_messages {_PURGEABLE_MESSAGES}", (cutoff, cutoff, limit)
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
        self.conn.execute(f"INSERT INTO temp.purge_webhooks {_PURGEABLE_WEBHOOKS}", (cutoff, limit))

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
            )
            + count("SELECT COUNT(*) FROM temp.purge_webhooks"),
            "incidents": count(f"SELECT COUNT(*) FROM ({_PURGEABLE_INCIDENTS})", cutoff, limit),
        }

    def _save_metric_offsets(self) -> None:
        m = "m.id IN (SELECT id FROM temp.purge_messages)"
        j = "j.message IN (SELECT id FROM temp.purge_messages)"
        o = "o.id IN (SELECT id FROM temp.purge_outbox)"
        w = "w.id IN (SELECT id FROM temp.purge_webhooks)"
        for metric, sql in COUNTER_QUERIES:
            for row in self.conn.execute(sql.format(m=m, j=j, o=o, w=w)).fetchall():
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
            f"DELETE FROM incidents WHERE rowid IN ({_PURGEABLE_INCIDENTS})",
            (cutoff, limit),
        )
        self.conn.execute(
            "DELETE FROM pagerduty_events WHERE id IN (SELECT id FROM temp.purge_webhooks)"
        )
