"""One node at a time: a session-level advisory lock held on a connection of its own.

The IMAP poller of an account runs only while it holds the account's lock; the worker decides
jobs only while it holds the "decide" turn (decisions stay in acceptance order, as with one
SQLite writer: a resolve is never decided before the trigger accepted ahead of it). The lock lives as
long as the session: a node that dies (kill -9, crash) loses it the moment the server sees its
connection close; a host that vanishes is noticed through TCP keepalives (the server probes
an idle holder after 5 s, every 5 s, 3 times), so a standby node, which retries every few
seconds, takes over within about 25 s. A holder checks its lock before each fetch cycle and
stops polling when its connection to the lock is gone.
"""

from __future__ import annotations

import contextlib
from typing import Any

import psycopg

from gateway.errors import StoreError
from gateway.store.postgres.connection import CONNECT_TIMEOUT, describe
from gateway.store.postgres.rows import DB_NOW
from gateway.store.postgres.wakeups import WORKER_SESSION, worker_session

# `Turn.others_delivering`: how long a failed attempt of another node counts against it
FAILING_SECONDS = 60.0
_KEEPALIVES = "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3"


class Turn:
    """`acquire()` without waiting, `held()` before each round of work, `release()` at the end."""

    def __init__(self, url: str, name: str, *, silence: float | None = None) -> None:
        """`silence`: the server ends the holder's session (and so its turn) after that many
        seconds without a statement, so a frozen holder (SIGSTOP, a hung host whose kernel
        still answers keepalives) loses the turn too; the holder must call `acquire` or
        `held` more often than that."""
        self._url = url
        self.name = name
        self._options = _KEEPALIVES
        if silence is not None:
            self._options += f" -c idle_session_timeout={int(silence * 1000)}"
        self._conn: psycopg.Connection[Any] | None = None  # kept between tries: one round trip
        self._locked = False

    def acquire(self) -> bool:
        """True if this node holds the turn now (already, or just taken); False while another
        node holds it; StoreError when the database cannot be asked."""
        if self._locked and self.held():
            return True  # (a broken lock connection was dropped: ask again below)
        try:
            if self._conn is None:
                self._conn = psycopg.connect(
                    self._url,
                    autocommit=True,
                    connect_timeout=CONNECT_TIMEOUT,
                    options=self._options,
                    keepalives_idle=5,
                    keepalives_interval=5,
                    keepalives_count=3,
                    application_name=f"email-pager-gateway {self.name}",
                )
            row = self._conn.execute(
                "SELECT pg_try_advisory_lock(hashtextextended(%s, 2))", (self.name,)
            ).fetchone()
        except psycopg.Error as exc:
            self._drop()
            raise StoreError(
                f"cannot ask {describe(self._url)} for the {self.name} turn: {exc}"
            ) from exc
        self._locked = bool(row and row[0])
        return self._locked

    def held(self) -> bool:
        """Still ours: the lock's connection answers (the server keeps the lock as long)."""
        if self._conn is None or not self._locked:
            return False
        try:
            self._conn.execute("SELECT 1")
        except psycopg.Error:
            self._drop()
            return False
        return True

    def others_delivering(self, node: str) -> bool:
        """Whether another node's worker is connected to the store now (its LISTEN session)
        and the other nodes' deliveries go through: no item that another node attempted in the
        last `FAILING_SECONDS` waits for a retry (a node that cannot reach PagerDuty, or a
        PagerDuty that refuses, is not left the new items). Asked on this turn's connection;
        False when it cannot be asked."""
        if self._conn is None:
            return False
        try:
            row = self._conn.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity"
                "  WHERE datname = current_database() AND application_name LIKE %(workers)s"
                "  AND application_name <> %(me)s)"
                " AND NOT EXISTS (SELECT 1 FROM outbox WHERE state = 'pending' AND attempts > 0"
                f"  AND delivered_by <> %(node)s AND updated_at > {DB_NOW} - %(failing)s)",
                {
                    "workers": WORKER_SESSION + "%",
                    "me": worker_session(node),
                    "node": node,
                    "failing": FAILING_SECONDS,
                },
            ).fetchone()
        except psycopg.Error:  # a broken connection: `held` finds it before the next round
            return False
        return bool(row and row[0])

    def release(self) -> None:
        """Give the turn back (closing the session releases the lock)."""
        self._drop()

    def _drop(self) -> None:
        self._locked = False
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None
