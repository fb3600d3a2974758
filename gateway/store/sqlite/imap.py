"""IMAP positions per account and folder, the UIDs still owed, and the after-actions still due.

The position, (UIDVALIDITY, last UID), moves only inside an acceptance commit
(`SpoolQueries.accept` calls `_advance_imap`), so "accepted" and "position saved" are one step.
A UID the position passes without having been read is owed in `imap_failures` first.
"""

from __future__ import annotations

import json
import sqlite3
import time

from gateway.store.records import ImapFailure, ImapPosition
from gateway.store.sqlite.events import EventQueries

FAILURE_COLUMNS = (
    "account, folder, uid, attempts, first_failed_at, last_failed_at, next_attempt_at, error,"
    " reported_at"
)


class ImapQueries(EventQueries):
    def imap_position(self, account: str, folder: str) -> tuple[int, int] | None:
        """(UIDVALIDITY, last processed UID) of a mailbox folder, or None if never polled."""
        row = self.conn.execute(
            "SELECT uidvalidity, last_uid FROM imap_state WHERE account = ? AND folder = ?",
            (account, folder),
        ).fetchone()
        return (row[0], row[1]) if row else None

    def save_imap_position(
        self, account: str, folder: str, uidvalidity: int, last_uid: int
    ) -> None:
        """Set the position; under a new UIDVALIDITY the old UIDs mean nothing, so what they
        owed (failures, after-actions) goes too: the rescan finds those messages again."""
        with self.transaction():
            stored = self.imap_position(account, folder)
            if stored is not None and stored[0] != uidvalidity:
                self.conn.execute(
                    "DELETE FROM imap_failures WHERE account = ? AND folder = ?", (account, folder)
                )
            self._advance_imap(ImapPosition(account, folder, uidvalidity, last_uid))

    def _advance_imap(self, position: ImapPosition) -> None:
        """Inside the acceptance transaction: the new position, and what it no longer owes."""
        p = position
        self.conn.execute(
            "INSERT INTO imap_state (account, folder, uidvalidity, last_uid, unfinished)"
            " VALUES (?,?,?,?,?) ON CONFLICT (account, folder) DO UPDATE SET"
            " uidvalidity = excluded.uidvalidity, last_uid = excluded.last_uid,"
            " unfinished = excluded.unfinished",
            (p.account, p.folder, p.uidvalidity, p.last_uid, json.dumps(list(p.unfinished))),
        )
        self.conn.executemany(
            "DELETE FROM imap_failures WHERE account = ? AND folder = ? AND uid = ?",
            [(p.account, p.folder, uid) for uid in p.resolved],
        )

    def mark_imap_success(self, account: str, folder: str, at: float | None = None) -> None:
        """Record a completed fetch cycle (for health: when did this mailbox last answer?)."""
        self.conn.execute(
            "UPDATE imap_state SET last_success = ? WHERE account = ? AND folder = ?",
            (time.time() if at is None else at, account, folder),
        )

    def imap_unfinished(self, account: str, folder: str) -> list[int]:
        row = self.conn.execute(
            "SELECT unfinished FROM imap_state WHERE account = ? AND folder = ?",
            (account, folder),
        ).fetchone()
        return [int(uid) for uid in json.loads(row[0])] if row else []

    def imap_after_done(self, account: str, folder: str) -> None:
        self.conn.execute(
            "UPDATE imap_state SET unfinished = '[]' WHERE account = ? AND folder = ?",
            (account, folder),
        )

    def imap_owed(self, account: str, folder: str) -> list[ImapFailure]:
        rows = self.conn.execute(
            f"SELECT {FAILURE_COLUMNS} FROM imap_failures WHERE account = ? AND folder = ?"
            " ORDER BY uid",
            (account, folder),
        )
        return [ImapFailure(*row) for row in rows]

    def record_imap_failure(
        self, account: str, folder: str, uid: int, error: str, retry_at: float
    ) -> int:
        now = time.time()
        with self.transaction():
            self.conn.execute(
                f"INSERT INTO imap_failures ({FAILURE_COLUMNS}) VALUES (?,?,?,1,?,?,?,?,NULL)"
                " ON CONFLICT (account, folder, uid) DO UPDATE SET attempts = attempts + 1,"
                " last_failed_at = excluded.last_failed_at,"
                " next_attempt_at = excluded.next_attempt_at, error = excluded.error",
                (account, folder, uid, now, now, retry_at, error),
            )
            row = self.conn.execute(
                "SELECT attempts FROM imap_failures WHERE account = ? AND folder = ? AND uid = ?",
                (account, folder, uid),
            ).fetchone()
        return int(row[0])

    def report_imap_failure(
        self, account: str, folder: str, uid: int, *, service: str, detail: str
    ) -> None:
        now = time.time()
        with self.transaction():
            self.conn.execute(
                "UPDATE imap_failures SET reported_at = ? WHERE account = ? AND folder = ?"
                " AND uid = ?",
                (now, account, folder, uid),
            )
            self._event("imap_unreadable", service, None, None, detail, now)

    def forget_imap_failure(
        self, account: str, folder: str, uid: int, *, service: str, detail: str
    ) -> None:
        now = time.time()
        with self.transaction():
            self.conn.execute(
                "DELETE FROM imap_failures WHERE account = ? AND folder = ? AND uid = ?",
                (account, folder, uid),
            )
            self._event("imap_vanished", service, None, None, detail, now)

    def imap_failures(self) -> list[ImapFailure]:
        rows = self.conn.execute(
            f"SELECT {FAILURE_COLUMNS} FROM imap_failures ORDER BY first_failed_at, uid"
        )
        return [ImapFailure(*row) for row in rows]


def imap_gauges(conn: sqlite3.Connection) -> list[tuple[str, tuple[str, ...], float]]:
    """Owed and reported-unreadable messages per account (for `metric_gauges`); 0 for every
    polled account, so an alert on them has a series to watch."""
    gauges: list[tuple[str, tuple[str, ...], float]] = []
    for account, failing, unreadable in conn.execute(
        "SELECT s.account, COUNT(f.uid), COUNT(f.reported_at)"
        " FROM (SELECT DISTINCT account FROM imap_state) s"
        " LEFT JOIN imap_failures f ON f.account = s.account GROUP BY s.account"
    ):
        gauges.append(("imap_failing", (account,), failing))
        gauges.append(("imap_unreadable", (account,), unreadable))
    return gauges
