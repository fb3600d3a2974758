"""The outbox: items queued with decisions, delivered per order key in order, under leases."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from gateway.store.records import OutboxItem, OutboxResult
from gateway.store.sqlite.connection import Connection
from gateway.store.sqlite.rows import OUTBOX_COLUMNS, outbox_item


class OutboxQueries(Connection):
    def add_outbox(
        self, kind: str, service: str, order_key: str, payload: dict[str, Any], job: int | None
    ) -> int:
        now = time.time()
        cursor = self.conn.execute(
            "INSERT INTO outbox (kind, service, order_key, payload, job, created_at,"
            " next_attempt_at, updated_at) VALUES (?,?,?,?,?,?,?,?)",
            (kind, service, order_key, json.dumps(payload), job, now, now, now),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def due_outbox(
        self,
        now: float,
        limit: int = 100,
        kind: str | None = None,
        exclude: Sequence[int] = (),
    ) -> list[OutboxItem]:
        """The oldest pending item of each order key, if it is due: per-key order is kept.

        `exclude`d items (already tried by this caller) also hold back the rest of their key.
        """
        kind_filter = "AND kind = ?" if kind else ""
        skip = f"AND id NOT IN ({','.join('?' * len(exclude))})" if exclude else ""
        args: list[Any] = [kind] if kind else []
        rows = self.conn.execute(
            f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE id IN ("
            f"  SELECT MIN(id) FROM outbox WHERE state = 'pending' {kind_filter} GROUP BY order_key"
            f") AND next_attempt_at <= ? {skip} ORDER BY next_attempt_at, id LIMIT ?",
            (*args, now, *exclude, limit),
        ).fetchall()
        return [outbox_item(r) for r in rows]

    def claim_outbox(
        self,
        now: float,
        limit: int,
        kind: str | None,
        lease_seconds: float,
        exclude: Sequence[int] = (),
    ) -> list[OutboxItem]:
        """Take due items for `lease_seconds` so no other worker (process or host) sends them
        too; a worker that dies mid-attempt loses the lease and the item becomes due again."""
        with self.transaction(durable=False):
            items = self.due_outbox(now, limit, kind, exclude)
            self.conn.executemany(
                "UPDATE outbox SET next_attempt_at = ? WHERE id = ?",
                [(now + lease_seconds, item.id) for item in items],
            )
        return items

    def next_outbox_due(self, kind: str | None = None) -> float | None:
        """When the earliest pending item becomes due, so workers can sleep until then."""
        kind_filter = "AND kind = ?" if kind else ""
        row = self.conn.execute(
            f"SELECT MIN(next_attempt_at) FROM outbox WHERE state = 'pending' {kind_filter}",
            (kind,) if kind else (),
        ).fetchone()
        return row[0]

    def record_outbox(self, results: Sequence[OutboxResult]) -> None:
        """Apply delivery attempts' results in one commit (one fsync for a whole batch)."""
        now = time.time()
        with self.transaction():
            for r in results:
                self.conn.execute(
                    "UPDATE outbox SET state = ?, attempts = attempts + 1, response = ?,"
                    " last_error = ?, next_attempt_at = COALESCE(?, next_attempt_at),"
                    " updated_at = ? WHERE id = ? AND state = 'pending'",
                    (r.state, r.response, r.error, r.next_attempt_at, now, r.id),
                )

    def outbox(
        self, states: Sequence[str] = ("pending", "dead"), limit: int = 1000
    ) -> list[OutboxItem]:
        marks = ",".join("?" * len(states))
        rows = self.conn.execute(
            f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE state IN ({marks}) ORDER BY id LIMIT ?",
            (*states, limit),
        ).fetchall()
        return [outbox_item(r) for r in rows]

    def requeue_outbox(self, item: int | None = None) -> int:
        """Put dead letters (one, or all with None) back in the queue; returns how many."""
        now = time.time()
        where, args = ("AND id = ?", (item,)) if item is not None else ("", ())
        with self.transaction():
            cursor = self.conn.execute(
                "UPDATE outbox SET state = 'pending', next_attempt_at = ?, updated_at = ?,"
                f" created_at = ? WHERE state = 'dead' {where}",
                (now, now, now, *args),
            )
        return cursor.rowcount

    def outbox_stats(self) -> tuple[int, float | None]:
        """(pending count, created_at of the oldest pending item)."""
        row = self.conn.execute(
            "SELECT COUNT(*), MIN(created_at) FROM outbox WHERE state = 'pending'"
        ).fetchone()
        return row[0], row[1]
