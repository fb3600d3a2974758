"""IMAP positions: (UIDVALIDITY, last UID) per account and folder, and the last good cycle."""

from __future__ import annotations

import time

from gateway.store.sqlite.connection import Connection


class ImapQueries(Connection):
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
        """Advance the position; called only after the batch was committed and marked/moved."""
        self.conn.execute(
            "INSERT INTO imap_state (account, folder, uidvalidity, last_uid) VALUES (?,?,?,?)"
            " ON CONFLICT (account, folder) DO UPDATE SET uidvalidity = excluded.uidvalidity,"
            " last_uid = excluded.last_uid",
            (account, folder, uidvalidity, last_uid),
        )

    def mark_imap_success(self, account: str, folder: str, at: float | None = None) -> None:
        """Record a completed fetch cycle (for health: when did this mailbox last answer?)."""
        self.conn.execute(
            "UPDATE imap_state SET last_success = ? WHERE account = ? AND folder = ?",
            (time.time() if at is None else at, account, folder),
        )
