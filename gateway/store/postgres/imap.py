"""IMAP positions, owed UIDs and due after-actions on PostgreSQL (see the SQLite module)."""

from __future__ import annotations

import json
import time

from gateway.store.postgres.events import EventQueries
from gateway.store.records import ImapFailure, ImapPosition

FAILURE_COLUMNS = (
    "account, folder, uid, attempts, first_failed_at, last_failed_at, next_attempt_at, error,"
    " reported_at"
)


class ImapQueries(EventQueries):
    def imap_position(self, account: str, folder: str) -> tuple[int, int] | None:
        row = self._row(
            "SELECT uidvalidity, last_uid FROM imap_state WHERE account = %s AND folder = %s",
            (account, folder),
        )
        return (row[0], row[1]) if row else None

    def save_imap_position(
        self, account: str, folder: str, uidvalidity: int, last_uid: int
    ) -> None:
        with self.transaction():
            stored = self.imap_position(account, folder)
            if stored is not None and stored[0] != uidvalidity:
                self._exec(
                    "DELETE FROM imap_failures WHERE account = %s AND folder = %s",
                    (account, folder),
                )
            self._advance_imap(ImapPosition(account, folder, uidvalidity, last_uid))

    def _advance_imap(self, position: ImapPosition) -> None:
        p = position
        self._exec(
            "INSERT INTO imap_state (account, folder, uidvalidity, last_uid, unfinished)"
            " VALUES (%s,%s,%s,%s,%s) ON CONFLICT (account, folder) DO UPDATE SET"
            " uidvalidity = excluded.uidvalidity, last_uid = excluded.last_uid,"
            " unfinished = excluded.unfinished",
            (p.account, p.folder, p.uidvalidity, p.last_uid, json.dumps(list(p.unfinished))),
        )
        self._many(
            "DELETE FROM imap_failures WHERE account = %s AND folder = %s AND uid = %s",
            [(p.account, p.folder, uid) for uid in p.resolved],
        )

    def mark_imap_success(self, account: str, folder: str, at: float | None = None) -> None:
        self._exec(
            "UPDATE imap_state SET last_success = %s WHERE account = %s AND folder = %s",
            (time.time() if at is None else at, account, folder),
        )

    def imap_unfinished(self, account: str, folder: str) -> list[int]:
        row = self._row(
            "SELECT unfinished FROM imap_state WHERE account = %s AND folder = %s",
            (account, folder),
        )
        return [int(uid) for uid in json.loads(row[0])] if row else []

    def imap_after_done(self, account: str, folder: str) -> None:
        self._exec(
            "UPDATE imap_state SET unfinished = '[]' WHERE account = %s AND folder = %s",
            (account, folder),
        )

    def imap_owed(self, account: str, folder: str) -> list[ImapFailure]:
        rows = self._rows(
            f"SELECT {FAILURE_COLUMNS} FROM imap_failures WHERE account = %s AND folder = %s"
            " ORDER BY uid",
            (account, folder),
        )
        return [ImapFailure(*row) for row in rows]

    def record_imap_failure(
        self, account: str, folder: str, uid: int, error: str, retry_at: float
    ) -> int:
        now = time.time()
        row = self._row(
            f"INSERT INTO imap_failures ({FAILURE_COLUMNS})"
            " VALUES (%s,%s,%s,1,%s,%s,%s,%s,NULL)"
            " ON CONFLICT (account, folder, uid) DO UPDATE SET"
            " attempts = imap_failures.attempts + 1,"
            " last_failed_at = excluded.last_failed_at,"
            " next_attempt_at = excluded.next_attempt_at, error = excluded.error"
            " RETURNING attempts",
            (account, folder, uid, now, now, retry_at, error),
        )
        assert row is not None
        return int(row[0])

    def report_imap_failure(
        self, account: str, folder: str, uid: int, *, service: str, detail: str
    ) -> None:
        now = time.time()
        with self.transaction():
            self._exec(
                "UPDATE imap_failures SET reported_at = %s WHERE account = %s AND folder = %s"
                " AND uid = %s",
                (now, account, folder, uid),
            )
            self._event("imap_unreadable", service, None, None, detail, now)

    def forget_imap_failure(
        self, account: str, folder: str, uid: int, *, service: str, detail: str
    ) -> None:
        now = time.time()
        with self.transaction():
            self._exec(
                "DELETE FROM imap_failures WHERE account = %s AND folder = %s AND uid = %s",
                (account, folder, uid),
            )
            self._event("imap_vanished", service, None, None, detail, now)

    def imap_failures(self) -> list[ImapFailure]:
        rows = self._rows(
            f"SELECT {FAILURE_COLUMNS} FROM imap_failures ORDER BY first_failed_at, uid"
        )
        return [ImapFailure(*row) for row in rows]

    def _imap_gauges(self) -> list[tuple[str, tuple[str, ...], float]]:
        gauges: list[tuple[str, tuple[str, ...], float]] = []
        for account, failing, unreadable in self._rows(
            "SELECT s.account, COUNT(f.uid), COUNT(f.reported_at)"
            " FROM (SELECT DISTINCT account FROM imap_state) s"
            " LEFT JOIN imap_failures f ON f.account = s.account GROUP BY s.account"
        ):
            gauges.append(("imap_failing", (account,), failing))
            gauges.append(("imap_unreadable", (account,), unreadable))
        return gauges
