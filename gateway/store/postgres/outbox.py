"""The outbox on PostgreSQL: per-key order across nodes, leases on the database's clock.

Per order key only the oldest pending item is ever due or in flight, decided in one SQL
statement (`_HEADS`), and claims take rows with `FOR UPDATE SKIP LOCKED`, so two nodes never
wait on each other nor take the same item. Items of one key get their ids in commit order
(`add_outbox` holds the key's advisory lock until the commit), so "oldest" means "first
committed" even when two nodes queue for the same key at once. Every time a caller passes is
moved onto the database clock (`on_db_clock`): leases are compared on one clock only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from gateway.node import this_node
from gateway.store.postgres.connection import Connection
from gateway.store.postgres.rows import DB_NOW, OUTBOX_COLUMNS, on_db_clock, outbox_item
from gateway.store.postgres.wakeups import OUTBOX_CHANNEL, notify_outbox
from gateway.store.records import OutboxItem, OutboxResult, StormState
from gateway.store.requeue import Refusal, Requeued, not_requeueable, out_of_order

_HEADS = (  # the oldest pending item of each key (of one kind)
    "SELECT DISTINCT ON (order_key) id FROM outbox WHERE state = 'pending' {kind}"
    " ORDER BY order_key, id"
)
_PREFIXED = ", ".join(f"o.{c.strip()}" for c in OUTBOX_COLUMNS.split(","))
_PICKED = ", ".join(f"picked.{c.strip()}" for c in OUTBOX_COLUMNS.split(","))
_CLAIM_ORDER = "o.priority, o.next_attempt_at, o.id"  # new cases first, then due time
# how many due heads a rate limit (`admit`) chooses from per claim, as on SQLite
ADMIT_CANDIDATES = 500


def _filters(kind: str | None, exclude: Sequence[int]) -> tuple[str, str]:
    return (
        "AND kind = %(kind)s" if kind else "",
        "AND o.id <> ALL(%(exclude)s)" if exclude else "",
    )


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
        with self.transaction():
            # the key's lock first (the row comes from it), as `_locked_item`: one round trip
            row = self._row(
                "INSERT INTO outbox (kind, service, order_key, payload, job, created_at,"
                " next_attempt_at, updated_at, priority) SELECT %(kind)s::text,"
                " %(service)s::text, %(key)s::text, %(payload)s::text, %(job)s::bigint,"
                f" {on_db_clock('now')}, {on_db_clock('now')}, {on_db_clock('now')},"
                " %(priority)s::integer"
                " FROM (SELECT pg_advisory_xact_lock(hashtextextended(%(key)s, 1))) AS locked"
                " RETURNING id",
                self._clock_args(
                    kind=kind,
                    service=service,
                    key=order_key,
                    payload=json.dumps(payload),
                    job=job,
                    priority=priority,
                ),
            )
            self._notify_outbox()
        assert row is not None
        return int(row[0])

    def due_outbox(
        self, now: float, limit: int = 100, kind: str | None = None, exclude: Sequence[int] = ()
    ) -> list[OutboxItem]:
        kind_filter, skip = _filters(kind, exclude)
        rows = self._rows(
            f"SELECT {_PREFIXED} FROM outbox o WHERE o.id IN ({_HEADS.format(kind=kind_filter)})"
            f" AND o.next_attempt_at <= {on_db_clock('due')} {skip}"
            f" ORDER BY {_CLAIM_ORDER} LIMIT %(limit)s",
            self._clock_args(due=now, kind=kind, exclude=list(exclude), limit=limit),
        )
        return [outbox_item(r) for r in rows]

    def take_send_slot(self, key: str, interval: float) -> bool:
        """On the database's clock, so nodes whose clocks differ share one pace. A slot that
        another claim is taking right now (its transaction holds the key's advisory lock) counts
        as taken: a claim never waits for another, so two claims taking slots of two keys in
        opposite orders cannot deadlock."""
        row = self._row(
            f"INSERT INTO send_slots (key_hash, next_at) SELECT %(key)s, {DB_NOW} + %(interval)s"
            " WHERE pg_try_advisory_xact_lock(hashtextextended(%(key)s, 3))"
            " ON CONFLICT (key_hash) DO UPDATE SET next_at = excluded.next_at"
            f" WHERE send_slots.next_at <= {DB_NOW} RETURNING 1",
            {"key": key, "interval": interval},
        )
        return row is not None

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
        """Due heads, locked with SKIP LOCKED and leased until the database's now + lease.

        `admit` (a rate limit) picks, in claim order, which of up to `ADMIT_CANDIDATES` locked
        due heads to take; the others are unlocked again at the commit, untouched."""
        if limit <= 0:
            return []
        if admit is not None:
            return self._claim_admitted(now, limit, kind, lease_seconds, exclude, owner, admit)
        kind_filter, skip = _filters(kind, exclude)
        with self.transaction(durable=False):
            rows = self._rows(
                f"WITH picked AS (SELECT {_PREFIXED} FROM outbox o"
                f"  WHERE o.id IN ({_HEADS.format(kind=kind_filter)}) AND o.state = 'pending'"
                f"  AND o.next_attempt_at <= {on_db_clock('due')} {skip}"
                f"  ORDER BY {_CLAIM_ORDER} LIMIT %(limit)s FOR UPDATE OF o SKIP LOCKED)"
                f" UPDATE outbox SET next_attempt_at = {on_db_clock('due')} + %(lease)s,"
                f" lease_owner = %(owner)s FROM picked WHERE outbox.id = picked.id"
                f" RETURNING {_PICKED}",
                self._clock_args(
                    due=now,
                    kind=kind,
                    exclude=list(exclude),
                    limit=limit,
                    lease=lease_seconds,
                    owner=owner,
                ),
            )
        items = [outbox_item(r) for r in rows]
        return sorted(items, key=lambda i: (i.priority, i.next_attempt_at, i.id))

    def _claim_admitted(
        self,
        now: float,
        limit: int,
        kind: str | None,
        lease_seconds: float,
        exclude: Sequence[int],
        owner: str,
        admit: Callable[[list[OutboxItem]], list[OutboxItem]],
    ) -> list[OutboxItem]:
        kind_filter, skip = _filters(kind, exclude)
        with self.transaction(durable=False):
            rows = self._rows(
                f"SELECT {_PREFIXED} FROM outbox o"
                f" WHERE o.id IN ({_HEADS.format(kind=kind_filter)}) AND o.state = 'pending'"
                f" AND o.next_attempt_at <= {on_db_clock('due')} {skip}"
                f" ORDER BY {_CLAIM_ORDER} LIMIT %(limit)s FOR UPDATE OF o SKIP LOCKED",
                self._clock_args(
                    due=now,
                    kind=kind,
                    exclude=list(exclude),
                    limit=ADMIT_CANDIDATES,
                ),
            )
            items = admit([outbox_item(r) for r in rows])[:limit]
            if items:
                self._exec(
                    f"UPDATE outbox SET next_attempt_at = {on_db_clock('due')} + %(lease)s,"
                    " lease_owner = %(owner)s WHERE id = ANY(%(items)s)",
                    self._clock_args(
                        due=now, lease=lease_seconds, owner=owner, items=[i.id for i in items]
                    ),
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
        """`record_outbox` then `claim_outbox` in one transaction (one synchronous commit
        when there are results to keep); the claim sees the results, so a recorded head's next
        item is claimable at once. Recorded items must not be in `exclude`."""
        with self.transaction(durable=bool(results)):
            self.record_outbox(results, owner)
            return self.claim_outbox(now, limit, kind, lease_seconds, exclude, owner, admit)

    def coalesce_outbox(self, item: int, payload: dict[str, Any]) -> bool:
        """Replace the payload of `item` if it is pending and not claimed (a claim by another
        node holds the row until it commits; then `lease_owner` is set and this changes
        nothing). Its key now storms, so it gives up priority 0."""
        return (
            self._exec(
                f"UPDATE outbox SET payload = %(payload)s, updated_at = {on_db_clock('now')},"
                " priority = 1 WHERE id = %(id)s AND state = 'pending' AND lease_owner = ''",
                self._clock_args(payload=json.dumps(payload), id=item),
            )
            == 1
        )

    def key_outbox(self, order_key: str, since: float, limit: int = 20) -> list[OutboxItem]:
        """The newest items of one order key created at or after `since` (the caller's
        clock, moved onto the database's), newest first."""
        rows = self._rows(
            f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE state IN ('pending', 'dead', 'done')"
            f" AND order_key = %(key)s AND created_at >= {on_db_clock('since')}"
            " ORDER BY id DESC LIMIT %(limit)s",
            self._clock_args(key=order_key, since=since, limit=limit),
        )
        return [outbox_item(r) for r in rows]

    def renew_outbox_leases(self, items: Sequence[int], owner: str, until: float) -> int:
        if not items:
            return 0
        with self.transaction(durable=False):
            return self._exec(
                f"UPDATE outbox SET next_attempt_at = {on_db_clock('until')}"
                " WHERE state = 'pending' AND lease_owner = %(owner)s AND id = ANY(%(items)s)",
                self._clock_args(until=until, owner=owner, items=list(items)),
            )

    def outbox_lease_owners(self, kind: str | None = None) -> list[str]:
        kind_filter = "AND kind = %s" if kind else ""
        rows = self._rows(
            "SELECT DISTINCT lease_owner FROM outbox WHERE state = 'pending'"
            f" AND lease_owner <> '' {kind_filter}",
            (kind,) if kind else (),
        )
        return [row[0] for row in rows]

    def release_outbox_leases(self, owner: str, now: float) -> int:
        with self.transaction(durable=False):
            released = self._exec(
                f"UPDATE outbox SET next_attempt_at = LEAST(next_attempt_at, {on_db_clock('now')}),"
                " lease_owner = '' WHERE state = 'pending' AND lease_owner = %(owner)s",
                self._clock_args(owner=owner, now=now),
            )
            if released:
                self._notify_outbox()
        return released

    def next_outbox_due(self, kind: str | None = None) -> float | None:
        """When the earliest head of a key becomes due (an item behind its head waits for the
        head, not for a time), on the caller's clock again (it sleeps until then)."""
        kind_filter = "AND kind = %(kind)s" if kind else ""
        row = self._row(
            "SELECT MIN(next_attempt_at) - %(shift)s FROM outbox"
            f" WHERE id IN ({_HEADS.format(kind=kind_filter)})",
            self._clock_args(kind=kind),
        )
        return None if row is None or row[0] is None else float(row[0])

    def record_outbox(self, results: Sequence[OutboxResult], owner: str = "") -> None:
        node = this_node()
        with self.transaction():
            self._many(  # pipelined: one round trip for the batch
                "UPDATE outbox SET state = %(state)s, attempts = attempts + 1,"
                " response = %(response)s, last_error = %(error)s,"
                f" next_attempt_at = COALESCE({on_db_clock('next')}, next_attempt_at),"
                " lease_owner = '', delivered_by = %(node)s,"
                f" updated_at = {on_db_clock('now')}"
                " WHERE id = %(id)s AND state = 'pending'"
                " AND (%(owner)s = '' OR lease_owner = %(owner)s)",
                [
                    self._clock_args(
                        state=r.state,
                        response=r.response,
                        error=r.error,
                        next=r.next_attempt_at,
                        id=r.id,
                        node=node,
                        owner=owner,
                    )
                    for r in results
                ],
            )
            if any(r.state != "pending" for r in results):
                self._notify_outbox()  # the next item of those keys is due now, on any node

    def outbox(
        self, states: Sequence[str] = ("pending", "dead"), limit: int = 1000
    ) -> list[OutboxItem]:
        rows = self._rows(
            f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE state = ANY(%s) ORDER BY id LIMIT %s",
            (list(states), limit),
        )
        return [outbox_item(r) for r in rows]

    def outbox_item(self, item: int) -> OutboxItem | None:
        row = self._row(f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE id = %s", (item,))
        return outbox_item(row) if row else None

    def requeue_outbox(self, item: int | None = None) -> int:
        return len(self.retry_outbox(item).requeued)

    def retry_outbox(self, item: int | None = None, *, force: bool = False) -> Requeued:
        now = self.clock()
        requeued: list[int] = []
        refused: list[Refusal] = []
        forced: list[Refusal] = []
        with self.transaction():
            for wanted in [item] if item is not None else self._dead_ids():
                found = self._locked_item(wanted)
                refusal = not_requeueable(wanted, found)
                if refusal is None and found is not None:
                    refusal = out_of_order(found, self._key_moved_on(found, now))
                    if refusal is not None and force:
                        forced.append(refusal)
                        refusal = None
                if refusal is not None:
                    refused.append(refusal)
                    continue
                self._exec(
                    f"UPDATE outbox SET state = 'pending', next_attempt_at = {on_db_clock('now')},"
                    f" updated_at = {on_db_clock('now')}, requeued_at = {on_db_clock('now')},"
                    " lease_owner = '' WHERE id = %(id)s AND state = 'dead'",
                    self._clock_args(now=now, id=wanted),
                )
                requeued.append(wanted)
            if requeued:
                self._notify_outbox()
        return Requeued(tuple(requeued), tuple(refused), tuple(forced))

    def _notify_outbox(self) -> None:
        """Inside the transaction: every node's dispatchers look again once it commits (once
        per transaction: the server folds a channel's repeats into one anyway)."""
        if OUTBOX_CHANNEL in self._notified:
            return
        with self._connection() as conn:
            notify_outbox(conn)
        if self._held is not None:
            self._notified.add(OUTBOX_CHANNEL)

    def _locked_item(self, item: int) -> OutboxItem | None:
        """The item, its key locked as `add_outbox` does: nothing joins the key meanwhile."""
        found = self.outbox_item(item)
        if found is not None:
            self._exec("SELECT pg_advisory_xact_lock(hashtextextended(%s, 1))", (found.order_key,))
            found = self.outbox_item(item)
        return found

    def _dead_ids(self) -> list[int]:
        return [r[0] for r in self._rows("SELECT id FROM outbox WHERE state = 'dead' ORDER BY id")]

    def _key_moved_on(self, item: OutboxItem, now: float) -> OutboxItem | None:
        row = self._row(
            f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE state IN ('done', 'pending')"
            " AND order_key = %(key)s AND id > %(id)s AND (state = 'done' OR (lease_owner <> ''"
            f" AND next_attempt_at > {on_db_clock('now')})) ORDER BY id LIMIT 1",
            self._clock_args(key=item.order_key, id=item.id, now=now),
        )
        return outbox_item(row) if row else None

    def expedite_outbox(self, now: float, kind: str | None = None) -> int:
        kind_filter = "AND kind = %(kind)s" if kind else ""
        with self.transaction(durable=False):
            moved = self._exec(
                f"UPDATE outbox SET next_attempt_at = {on_db_clock('now')} WHERE state = 'pending'"
                f" AND next_attempt_at > {on_db_clock('now')} AND lease_owner = '' {kind_filter}",
                self._clock_args(now=now, kind=kind),
            )
            if moved:
                self._notify_outbox()
        return moved

    def outbox_stats(self) -> tuple[int, float | None]:
        row = self._row("SELECT COUNT(*), MIN(created_at) FROM outbox WHERE state = 'pending'")
        assert row is not None
        return int(row[0]), row[1]

    def storm_state(self, now: float) -> list[StormState]:
        """Per service with PagerDuty events pending or repeats absorbed: the storm figures."""
        queued: dict[str, tuple[int, int, float | None]] = {}
        for service, count, throttled, oldest in self._rows(
            "SELECT service, COUNT(*), SUM(CASE WHEN next_attempt_at <= "
            f"{on_db_clock('now')} AND lease_owner = ''"
            f" AND id IN ({_HEADS.format(kind='AND kind = %(kind)s')}) THEN 1 ELSE 0 END),"
            " MIN(created_at) FROM outbox WHERE state = 'pending' AND kind = %(kind)s"
            " GROUP BY service",
            self._clock_args(now=now, kind="pagerduty"),
        ):
            queued[service] = (int(count), int(throttled or 0), oldest)
        coalesced = {
            service: int(total)
            for service, total in self._rows(
                "SELECT service, SUM(coalesced) FROM incidents WHERE coalesced > 0"
                " AND state IN ('triggered', 'acknowledged') GROUP BY service"
            )
        }
        return [
            StormState(
                name,
                *queued.get(name, (0, 0, None))[:2],
                coalesced.get(name, 0),
                queued.get(name, (0, 0, None))[2],
            )
            for name in sorted(queued.keys() | coalesced.keys())
        ]
