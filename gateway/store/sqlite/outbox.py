"""The outbox: items queued with decisions, delivered per order key in order, under leases.

A claim sets `next_attempt_at` to the end of the lease and `lease_owner` to the claiming
worker; a result clears the owner. So a pending item with an owner and a future
`next_attempt_at` is in flight, and the claims of a worker known to be dead can be released.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from gateway.node import this_node
from gateway.store.records import OutboxItem, OutboxResult, StormState
from gateway.store.requeue import Refusal, Requeued, not_requeueable, out_of_order
from gateway.store.sqlite.connection import Connection
from gateway.store.sqlite.rows import OUTBOX_COLUMNS, outbox_item

# how many due heads a rate limit chooses from per claim
ADMIT_CANDIDATES = 500


class OutboxQueries(Connection):
    def add_outbox(
        self,
        kind: str,
        service: str,
        order_key: str,
        payload: dict[str, Any],
        job: int | None,
        priority: int = 1,
    ) -> int:
        """`priority` 0: claimed ahead of every priority-1 head (a trigger opening an incident)."""
        now = time.time()
        cursor = self.conn.execute(
            "INSERT INTO outbox (kind, service, order_key, payload, job, created_at,"
            " next_attempt_at, updated_at, priority) VALUES (?,?,?,?,?,?,?,?,?)",
            (kind, service, order_key, json.dumps(payload), job, now, now, now, priority),
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
        Heads of priority 0 (new cases) come first, then the rest by due time and id.

        `exclude`d items (already tried by this caller) also hold back the rest of their key.
        """
        kind_filter = "AND kind = ?" if kind else ""
        skip = f"AND id NOT IN ({','.join('?' * len(exclude))})" if exclude else ""
        args: list[Any] = [kind] if kind else []
        rows = self.conn.execute(
            f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE id IN ("
            f"  SELECT MIN(id) FROM outbox WHERE state = 'pending' {kind_filter} GROUP BY order_key"
            f") AND next_attempt_at <= ? {skip} ORDER BY priority, next_attempt_at, id"
            " LIMIT ?",
            (*args, now, *exclude, limit),
        ).fetchall()
        return [outbox_item(r) for r in rows]

    def take_send_slot(self, key: str, interval: float) -> bool:
        now = time.time()
        taken = self.conn.execute(
            "INSERT INTO send_slots (key_hash, next_at) VALUES (?, ?) ON CONFLICT (key_hash)"
            " DO UPDATE SET next_at = excluded.next_at WHERE send_slots.next_at <= ?",
            (key, now + interval, now),
        )
        return taken.rowcount == 1

    def claim_outbox(
        self,
        now: float,
        limit: int,
        kind: str | None,
        lease_seconds: float,
        exclude: Sequence[int] = (),
        owner: str = "",
        admit: Callable[[list[OutboxItem]], list[OutboxItem]] | None = None,
    ) -> list[OutboxItem]:
        """Take due items for `lease_seconds` so no other worker (process or host) sends them
        too; a worker that dies mid-attempt loses the lease and the item becomes due again.

        `admit` (a rate limit) picks, in claim order, which of the due items to take now; it
        sees up to `ADMIT_CANDIDATES` of them, so one throttled routing key holds up no other.
        """
        if limit <= 0:
            return []
        with self.transaction(durable=False):
            if admit is None:
                items = self.due_outbox(now, limit, kind, exclude)
            else:
                candidates = self.due_outbox(now, max(limit, ADMIT_CANDIDATES), kind, exclude)
                items = admit(candidates[:ADMIT_CANDIDATES])[:limit]
            self.conn.executemany(
                "UPDATE outbox SET next_attempt_at = ?, lease_owner = ? WHERE id = ?",
                [(now + lease_seconds, owner, item.id) for item in items],
            )
        return items

    def record_and_claim_outbox(
        self,
        results: Sequence[OutboxResult],
        now: float,
        limit: int,
        kind: str | None,
        lease_seconds: float,
        exclude: Sequence[int] = (),
        owner: str = "",
        admit: Callable[[list[OutboxItem]], list[OutboxItem]] | None = None,
    ) -> list[OutboxItem]:
        """`record_outbox` then `claim_outbox` in one transaction: a delivery round costs one
        commit (durable only with results to keep), and a recorded head's next item can be
        claimed at once. Recorded items must not be in `exclude`."""
        with self.transaction(durable=bool(results)):
            self.record_outbox(results, owner)
            return self.claim_outbox(now, limit, kind, lease_seconds, exclude, owner, admit)

    def coalesce_outbox(self, item: int, payload: dict[str, Any]) -> bool:
        """Replace the payload of `item` if it is pending and not claimed (nothing on the
        wire can differ from what is recorded); False: it is in flight or finished. Its key is
        now a busy one (a storm), so it gives up priority 0 to cases that are new and quiet."""
        cursor = self.conn.execute(
            "UPDATE outbox SET payload = ?, updated_at = ?, priority = 1 WHERE id = ?"
            " AND state = 'pending' AND lease_owner = ''",
            (json.dumps(payload), time.time(), item),
        )
        return cursor.rowcount == 1

    def key_outbox(self, order_key: str, since: float, limit: int = 20) -> list[OutboxItem]:
        """The newest items of one order key created at or after `since`, newest first."""
        rows = self.conn.execute(
            f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE state IN ('pending', 'dead', 'done')"
            " AND order_key = ? AND created_at >= ? ORDER BY id DESC LIMIT ?",
            (order_key, since, limit),
        ).fetchall()
        return [outbox_item(r) for r in rows]

    def renew_outbox_leases(self, items: Sequence[int], owner: str, until: float) -> int:
        """Extend `owner`'s claims on `items` (still pending and still its own) to `until`."""
        if not items:
            return 0
        marks = ",".join("?" * len(items))
        with self.transaction(durable=False):
            cursor = self.conn.execute(
                "UPDATE outbox SET next_attempt_at = ? WHERE state = 'pending'"
                f" AND lease_owner = ? AND id IN ({marks})",
                (until, owner, *items),
            )
        return cursor.rowcount

    def outbox_lease_owners(self, kind: str | None = None) -> list[str]:
        """The workers holding claims on pending items (of `kind`)."""
        kind_filter = "AND kind = ?" if kind else ""
        rows = self.conn.execute(
            "SELECT DISTINCT lease_owner FROM outbox WHERE state = 'pending'"
            f" AND lease_owner != '' {kind_filter}",
            (kind,) if kind else (),
        )
        return [row[0] for row in rows]

    def release_outbox_leases(self, owner: str, now: float) -> int:
        """Make the items a dead worker (`owner`) had claimed due again at `now`."""
        with self.transaction(durable=False):
            cursor = self.conn.execute(
                "UPDATE outbox SET next_attempt_at = MIN(next_attempt_at, ?), lease_owner = ''"
                " WHERE state = 'pending' AND lease_owner = ?",
                (now, owner),
            )
        return cursor.rowcount

    def next_outbox_due(self, kind: str | None = None) -> float | None:
        """When the earliest head of a key becomes due, so workers can sleep until then: an
        item waiting behind its key's head (in flight, or waiting for a retry) is not due
        before the head is recorded, so its own time would only wake the worker in vain."""
        kind_filter = "AND kind = ?" if kind else ""
        row = self.conn.execute(
            "SELECT MIN(next_attempt_at) FROM outbox WHERE id IN (SELECT MIN(id) FROM outbox"
            f" WHERE state = 'pending' {kind_filter} GROUP BY order_key)",
            (kind,) if kind else (),
        ).fetchone()
        return row[0]

    def record_outbox(self, results: Sequence[OutboxResult], owner: str = "") -> None:
        """Apply delivery attempts' results in one commit (one fsync for a whole batch)."""
        now, node = time.time(), this_node()
        with self.transaction():
            for r in results:
                self.conn.execute(
                    "UPDATE outbox SET state = ?, attempts = attempts + 1, response = ?,"
                    " last_error = ?, next_attempt_at = COALESCE(?, next_attempt_at),"
                    " lease_owner = '', delivered_by = ?, updated_at = ?"
                    " WHERE id = ? AND state = 'pending' AND (? = '' OR lease_owner = ?)",
                    (
                        r.state,
                        r.response,
                        r.error,
                        r.next_attempt_at,
                        node,
                        now,
                        r.id,
                        owner,
                        owner,
                    ),
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

    def outbox_item(self, item: int) -> OutboxItem | None:
        row = self.conn.execute(
            f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE id = ?", (item,)
        ).fetchone()
        return outbox_item(row) if row else None

    def requeue_outbox(self, item: int | None = None) -> int:
        """Put dead letters (one, or all with None) back in the queue; returns how many."""
        return len(self.retry_outbox(item).requeued)

    def retry_outbox(self, item: int | None = None, *, force: bool = False) -> Requeued:
        """Re-queue dead letters (one, or every one with None) ahead of their key's waiting
        items, keeping `created_at`; refused while a later item of the key was delivered or
        is in flight, unless `force` (`gateway.store.requeue`)."""
        now = time.time()
        requeued: list[int] = []
        refused: list[Refusal] = []
        forced: list[Refusal] = []
        with self.transaction():
            for wanted in [item] if item is not None else self._dead_ids():
                found = self.outbox_item(wanted)
                refusal = not_requeueable(wanted, found)
                if refusal is None and found is not None:
                    refusal = out_of_order(found, self._key_moved_on(found, now))
                    if refusal is not None and force:
                        forced.append(refusal)
                        refusal = None
                if refusal is not None:
                    refused.append(refusal)
                    continue
                self.conn.execute(
                    "UPDATE outbox SET state = 'pending', next_attempt_at = ?, updated_at = ?,"
                    " requeued_at = ?, lease_owner = '' WHERE id = ? AND state = 'dead'",
                    (now, now, now, wanted),
                )
                requeued.append(wanted)
        return Requeued(tuple(requeued), tuple(refused), tuple(forced))

    def _dead_ids(self) -> list[int]:
        return [r[0] for r in self.conn.execute("SELECT id FROM outbox WHERE state = 'dead'")]

    def _key_moved_on(self, item: OutboxItem, now: float) -> OutboxItem | None:
        """The first later item of `item`'s key that was delivered or is in flight."""
        row = self.conn.execute(
            f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE state IN ('done', 'pending')"
            " AND order_key = ? AND id > ? AND (state = 'done' OR (lease_owner != ''"
            " AND next_attempt_at > ?)) ORDER BY id LIMIT 1",
            (item.order_key, item.id, now),
        ).fetchone()
        return outbox_item(row) if row else None

    def expedite_outbox(self, now: float, kind: str | None = None) -> int:
        """Make every pending item that is waiting for a retry due at `now` (`outbox flush
        --all`); items in flight keep their claim. Returns how many were moved up."""
        kind_filter = "AND kind = ?" if kind else ""
        with self.transaction(durable=False):
            cursor = self.conn.execute(
                "UPDATE outbox SET next_attempt_at = ? WHERE state = 'pending'"
                f" AND next_attempt_at > ? AND lease_owner = '' {kind_filter}",
                (now, now, *([kind] if kind else [])),
            )
        return cursor.rowcount

    def outbox_stats(self) -> tuple[int, float | None]:
        """(pending count, created_at of the oldest pending item)."""
        row = self.conn.execute(
            "SELECT COUNT(*), MIN(created_at) FROM outbox WHERE state = 'pending'"
        ).fetchone()
        return row[0], row[1]

    def storm_state(self, now: float) -> list[StormState]:
        """Per service with PagerDuty events pending or repeats absorbed: the storm figures."""
        queued: dict[str, tuple[int, int, float | None]] = {}
        for service, count, throttled, oldest in self.conn.execute(
            "SELECT service, COUNT(*), SUM(CASE WHEN next_attempt_at <= ? AND lease_owner = ''"
            " AND id IN (SELECT MIN(id) FROM outbox WHERE state = 'pending'"
            " AND kind = 'pagerduty' GROUP BY order_key) THEN 1 ELSE 0 END), MIN(created_at)"
            " FROM outbox WHERE state = 'pending' AND kind = 'pagerduty' GROUP BY service",
            (now,),
        ):
            queued[service] = (count, throttled or 0, oldest)
        coalesced = dict(
            self.conn.execute(
                "SELECT service, SUM(coalesced) FROM incidents WHERE coalesced > 0"
                " AND state IN ('triggered', 'acknowledged') GROUP BY service"
            ).fetchall()
        )
        return [
            StormState(
                name,
                *queued.get(name, (0, 0, None))[:2],
                coalesced.get(name, 0),
                queued.get(name, (0, 0, None))[2],
            )
            for name in sorted(queued.keys() | coalesced.keys())
        ]
