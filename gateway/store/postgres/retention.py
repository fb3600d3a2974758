"""Retention on PostgreSQL: batched purges keeping what is still needed and counters' sums.

The selection is read into id lists (a batch at a time) instead of SQLite's temp tables: a
pooled connection must not keep per-session state between calls.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.store.postgres.connection import Connection
from gateway.store.postgres.reports import COUNTER_QUERIES

PURGE_LOCK = 0x6761_7465_7761_7902  # advisory lock id: one node purges at a time
_PURGEABLE_MESSAGES = (
    "SELECT m.id FROM messages m WHERE m.received_at < %(cutoff)s AND m.duplicate_of IS NULL"
    " AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.message = m.id AND j.state <> 'done')"
    " AND NOT EXISTS (SELECT 1 FROM incidents i WHERE i.last_message = m.id"
    "   AND i.state IN ('triggered', 'acknowledged'))"
    " AND NOT EXISTS (SELECT 1 FROM jobs j JOIN outbox o ON o.job = j.id"
    "   WHERE j.message = m.id AND o.state <> 'done')"
    " AND NOT EXISTS (SELECT 1 FROM messages d WHERE d.duplicate_of = m.id"
    "   AND d.received_at >= %(cutoff)s)"
    " ORDER BY m.id LIMIT %(limit)s"
)
_PURGEABLE_INCIDENTS = (
    "SELECT service, incident_key FROM incidents WHERE state NOT IN ('triggered', 'acknowledged')"
    " AND last_seen < %(cutoff)s LIMIT %(limit)s"
)
# Webhook deliveries already decided (counted with the event log's "events"); pending ones stay.
_PURGEABLE_WEBHOOKS = (
    "SELECT id FROM pagerduty_events WHERE state = 'done' AND received_at < %(cutoff)s"
    " ORDER BY id LIMIT %(limit)s"
)
Selection = tuple[list[int], list[int], list[int]]  # messages, outbox items, webhook deliveries


class RetentionQueries(Connection):
    def purge_plan(self, cutoff: float) -> dict[str, int]:
        with self.transaction():
            return self._purge_counts(cutoff, None, self._select_purge(cutoff, None))

    def purge(self, cutoff: float, batch: int = 1000) -> dict[str, int]:
        """One node purges at a time: while another holds the lock this one purges nothing
        (all zeros: the caller's loop ends; the other node finishes the work)."""
        with self.transaction():
            locked = self._row("SELECT pg_try_advisory_xact_lock(%s)", (PURGE_LOCK,))
            if not (locked and locked[0]):
                return dict.fromkeys(("messages", "jobs", "outbox", "events", "incidents"), 0)
            selected = self._select_purge(cutoff, batch)
            counts = self._purge_counts(cutoff, batch, selected)
            self._save_metric_offsets(selected)
            self._delete_purged(cutoff, batch, selected)
        return counts

    def _select_purge(self, cutoff: float, limit: int | None) -> Selection:
        args = {"cutoff": cutoff, "limit": limit}
        messages = [r[0] for r in self._rows(_PURGEABLE_MESSAGES, args)]
        messages += [  # duplicates go with their original (all older than the cutoff)
            r[0]
            for r in self._rows("SELECT id FROM messages WHERE duplicate_of = ANY(%s)", (messages,))
        ]
        outbox = [
            r[0]
            for r in self._rows(
                "SELECT id FROM outbox WHERE state = 'done' AND updated_at < %(cutoff)s"
                " ORDER BY id LIMIT %(limit)s",
                args,
            )
        ]
        webhooks = [r[0] for r in self._rows(_PURGEABLE_WEBHOOKS, args)]
        return messages, outbox, webhooks

    def _purge_counts(
        self, cutoff: float, limit: int | None, selected: Selection
    ) -> dict[str, int]:
        messages, outbox, webhooks = selected
        args = {"cutoff": cutoff, "limit": limit, "messages": messages}

        def count(sql: str) -> int:
            row = self._row(sql, args)
            return int(row[0]) if row else 0

        return {
            "messages": len(messages),
            "jobs": count("SELECT COUNT(*) FROM jobs WHERE message = ANY(%(messages)s)"),
            "outbox": len(outbox),
            "events": count(
                "SELECT COUNT(*) FROM (SELECT 1 FROM events WHERE at < %(cutoff)s"
                " LIMIT %(limit)s) e"
            )
            + len(webhooks),
            "incidents": count(f"SELECT COUNT(*) FROM ({_PURGEABLE_INCIDENTS}) i"),
        }

    def _save_metric_offsets(self, selected: Selection) -> None:
        messages, outbox, webhooks = selected
        m = "m.id = ANY(%(messages)s)"
        j = "j.message = ANY(%(messages)s)"
        o = "o.id = ANY(%(outbox)s)"
        w = "w.id = ANY(%(webhooks)s)"
        args: dict[str, Any] = {"messages": messages, "outbox": outbox, "webhooks": webhooks}
        for metric, sql in COUNTER_QUERIES:
            for row in self._rows(sql.format(m=m, j=j, o=o, w=w), args):
                if not row[-1]:
                    continue
                self._exec(
                    "INSERT INTO metric_offsets (metric, labels, value) VALUES (%s, %s, %s)"
                    " ON CONFLICT (metric, labels) DO UPDATE"
                    " SET value = metric_offsets.value + excluded.value",
                    (metric, json.dumps([str(v) for v in row[:-1]]), row[-1]),
                )

    def _delete_purged(self, cutoff: float, limit: int, selected: Selection) -> None:
        messages, outbox, webhooks = selected
        args = {"cutoff": cutoff, "limit": limit, "messages": messages, "outbox": outbox}
        self._exec("DELETE FROM jobs WHERE message = ANY(%(messages)s)", args)
        self._exec("DELETE FROM messages WHERE id = ANY(%(messages)s)", args)
        self._exec("DELETE FROM outbox WHERE id = ANY(%(outbox)s)", args)
        self._exec(
            "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE at < %(cutoff)s"
            " LIMIT %(limit)s)",
            args,
        )
        self._exec(
            f"DELETE FROM incidents WHERE (service, incident_key) IN ({_PURGEABLE_INCIDENTS})",
            args,
        )
        self._exec("DELETE FROM pagerduty_events WHERE id = ANY(%s)", (webhooks,))
